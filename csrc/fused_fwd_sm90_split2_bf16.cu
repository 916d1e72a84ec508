// The fused sm_90 LoRA forward's split variant on clusters of 1 x 2 tiles (A/B timing against clusters of 4:
// set_fused_split(2)) for bf16 x: one translation unit (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_SPLIT_INSTANCE(split2_bf16, cutlass::bfloat16_t, 2)
