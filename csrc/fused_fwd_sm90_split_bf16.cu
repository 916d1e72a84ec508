// The fused sm_90 LoRA forward's split variant (clusters of 1 x 2 tiles of 128 x 256 sharing u's K-tiles,
// fused_fwd_sm90.cuh) for bf16 x: one translation unit (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_SPLIT_INSTANCE(split_bf16, cutlass::bfloat16_t, false)
