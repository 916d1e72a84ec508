// One (dtype, layout) of the sm_90 LoRA GEMM (gemm_sm90.cuh): bf16, B (K, N) row-major: the backward dx = dy W + v A.
// Each pair is its own translation unit so that the build compiles them in parallel.
#include "gemm_sm90_instances.h"

#if LORA_KERNELS_HAVE_SM90_GEMM
#include "gemm_sm90.cuh"
namespace lora_kernels::sm90 {
cudaError_t run_bf16_kn(const LoraGemmArgs& a, GemmConfig cfg, int swizzle, int raster, int sms, cudaStream_t s) {
  return run_config<cutlass::bfloat16_t, cutlass::layout::RowMajor>(a, cfg, swizzle, raster, sms, s);
}
}  // namespace lora_kernels::sm90
#endif
