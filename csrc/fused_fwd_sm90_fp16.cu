// The fused sm_90 LoRA forward for fp16 x: one translation unit (fused_fwd_sm90_instance.cuh).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE(fp16, cutlass::half_t, false, false, false)
