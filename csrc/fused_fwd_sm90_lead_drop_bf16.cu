// The fused sm_90 LoRA forward's lead-tile variant with dropout, for bf16 x and fp32 adapters: one translation unit
// (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE(lead_drop_bf16, cutlass::bfloat16_t, true, true, false)
