// The compiled (dtype, layout) entries of the sm_90 LoRA GEMM, one per gemm_sm90_<dtype>_<layout>.cu.
// LORA_KERNELS_HAVE_SM90_GEMM is set by setup.py when the CUTLASS headers are found.
#pragma once
#include "gemm_sm90.h"

#ifndef LORA_KERNELS_HAVE_SM90_GEMM
#define LORA_KERNELS_HAVE_SM90_GEMM 0
#endif

namespace lora_kernels::sm90 {
#if LORA_KERNELS_HAVE_SM90_GEMM
using RunFn = cudaError_t (*)(const LoraGemmArgs&, GemmConfig, int, int, int, cudaStream_t);
cudaError_t run_bf16_nk(const LoraGemmArgs&, GemmConfig, int, int, int, cudaStream_t);
cudaError_t run_bf16_kn(const LoraGemmArgs&, GemmConfig, int, int, int, cudaStream_t);
cudaError_t run_fp16_nk(const LoraGemmArgs&, GemmConfig, int, int, int, cudaStream_t);
cudaError_t run_fp16_kn(const LoraGemmArgs&, GemmConfig, int, int, int, cudaStream_t);
#endif
}  // namespace lora_kernels::sm90
