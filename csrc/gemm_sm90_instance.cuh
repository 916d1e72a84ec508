// What one instance file gemm_sm90_<dtype>_<layout>[_coop].cu compiles: LORA_KERNELS_GEMM_SM90_INSTANCE(dtype,
// layout, cfg) defines sm90::run_<dtype>_<layout>_c<cfg> (declared in gemm_sm90_instances.h) as gemm_sm90.cuh's
// run_one for that element type, B layout and GemmConfig. Each is its own translation unit so that the build
// compiles the heavy CUTLASS instances in parallel. Without CUTLASS (LORA_KERNELS_HAVE_SM90_GEMM = 0) the macro
// defines nothing.
//   dtype : bf16 (cutlass::bfloat16_t), fp16 (cutlass::half_t)
//   layout: nk, B (N, K) row-major, CUTLASS's ColumnMajor B: the forward y = x W^T + (s u) B^T + b;
//           kn, B (K, N) row-major, CUTLASS's RowMajor B: the backward dx = dy W + v A.
#pragma once
#include "gemm_sm90_instances.h"

#if LORA_KERNELS_HAVE_SM90_GEMM
#include "gemm_sm90.cuh"

namespace lora_kernels::sm90::instance {
using Element_bf16 = cutlass::bfloat16_t;
using Element_fp16 = cutlass::half_t;
using LayoutB_nk = cutlass::layout::ColumnMajor;
using LayoutB_kn = cutlass::layout::RowMajor;
}  // namespace lora_kernels::sm90::instance

#define LORA_KERNELS_GEMM_SM90_INSTANCE(dtype, layout, cfg)                                                         \
  namespace lora_kernels::sm90 {                                                                                    \
  cudaError_t run_##dtype##_##layout##_c##cfg(const LoraGemmArgs& a, int swizzle, int raster, int sms,             \
                                              cudaStream_t s) {                                                     \
    return run_one<instance::Element_##dtype, instance::LayoutB_##layout, cfg>(a, swizzle, raster, sms, s);        \
  }                                                                                                                 \
  }
#else
#define LORA_KERNELS_GEMM_SM90_INSTANCE(dtype, layout, cfg)
#endif
