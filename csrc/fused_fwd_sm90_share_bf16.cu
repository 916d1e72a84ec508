// The fused sm_90 LoRA forward's shared-u variant (FusedParams::share: the wide lead kernel's tiles, each of a row
// block's first clusters summing u over its share of the K-tiles) for bf16 x: one translation unit
// (fused_fwd_sm90_instance.cuh). Opt-in (LORA_KERNELS_FUSED_SHARE) until measured.
#include "fused_fwd_sm90_instance.cuh"

LORA_KERNELS_FUSED_SM90_INSTANCE(share_bf16, cutlass::bfloat16_t, true, false, true, true)
