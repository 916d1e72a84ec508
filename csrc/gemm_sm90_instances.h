// The compiled (dtype, layout, config) entries of the sm_90 LoRA GEMM, one per gemm_sm90_<dtype>_<layout>[_coop].cu.
// LORA_KERNELS_HAVE_SM90_GEMM is set by setup.py when the CUTLASS headers are found.
#pragma once
#include "gemm_sm90.h"

#ifndef LORA_KERNELS_HAVE_SM90_GEMM
#define LORA_KERNELS_HAVE_SM90_GEMM 0
#endif

namespace lora_kernels::sm90 {
#if LORA_KERNELS_HAVE_SM90_GEMM
// The configs the extension compiles (GemmConfig): 1, the 128 x 128 ping-pong tile (gemm_sm90_<dtype>_<layout>.cu),
// and 4, the 128 x 256 cooperative tile (gemm_sm90_<dtype>_<layout>_coop.cu).
using RunFn = cudaError_t (*)(const LoraGemmArgs&, int, int, int, cudaStream_t);
#define LK_SM90_RUN(dt, lay)                                                            \
  cudaError_t run_##dt##_##lay##_c4(const LoraGemmArgs&, int, int, int, cudaStream_t); \
  cudaError_t run_##dt##_##lay##_c1(const LoraGemmArgs&, int, int, int, cudaStream_t);
LK_SM90_RUN(bf16, nk)
LK_SM90_RUN(bf16, kn)
LK_SM90_RUN(fp16, nk)
LK_SM90_RUN(fp16, kn)
#undef LK_SM90_RUN
// dA as a GEMM (dA_gemm_sm90.cu), on `sms` SMs
cudaError_t run_dA_bf16(const DaGemmArgs&, int sms, cudaStream_t);
cudaError_t run_dA_fp16(const DaGemmArgs&, int sms, cudaStream_t);
#endif
}  // namespace lora_kernels::sm90
