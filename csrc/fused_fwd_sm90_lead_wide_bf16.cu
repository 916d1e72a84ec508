// The fused sm_90 LoRA forward's lead-tile variant on 128 x 256 tiles with the cooperative schedule (the wide
// variant: no dropout) for bf16 x: one translation unit (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE(lead_wide_bf16, cutlass::bfloat16_t, true, false, true)
