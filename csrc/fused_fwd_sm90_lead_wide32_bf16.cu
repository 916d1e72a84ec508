// Development (A/B timing): the wide lead-tile variant with 128 x 32 epilogue subtiles and 3 main-loop stages, bf16 x;
// LORA_KERNELS_FUSED_DEBUG bit 7 selects it (fused_fwd_sm90.cu).
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE_EPI(lead_wide32_bf16, cutlass::bfloat16_t, 32)
