// The fused sm_90 LoRA forward's lead-tile variant for fp16 x: one translation unit (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE(lead_fp16, cutlass::half_t, true, false, false)
