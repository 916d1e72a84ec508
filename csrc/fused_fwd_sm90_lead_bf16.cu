// The fused sm_90 LoRA forward's lead-tile variant for bf16 x: one translation unit (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE(lead_bf16, cutlass::bfloat16_t, true, false, false)
