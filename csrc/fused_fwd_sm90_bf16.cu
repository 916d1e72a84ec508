// The fused sm_90 LoRA forward (fused_fwd_sm90.cuh) for bf16 x: one translation unit, so that the build compiles the
// heavy CUTLASS instances in parallel. Without CUTLASS (LORA_KERNELS_HAVE_SM90_GEMM = 0) it defines nothing.
#include "gemm_sm90_instances.h"  // LORA_KERNELS_HAVE_SM90_GEMM

#if LORA_KERNELS_HAVE_SM90_GEMM
#include "fused_fwd_sm90.cuh"

namespace lora_kernels::sm90fused {
cudaError_t run_fused_bf16(const Operands& o, const FusedParams& f, int64_t K, int sms, cudaStream_t s) {
  return FusedFwd<cutlass::bfloat16_t, false>::run(o, f, K, sms, s);
}
}  // namespace lora_kernels::sm90fused
#endif
