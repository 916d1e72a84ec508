// What one instance file fused_fwd_sm90[_lead[_drop|_wide]|_split]_<dtype>.cu compiles:
// LORA_KERNELS_FUSED_SM90_INSTANCE(name, element, lead, drop, wide) defines sm90fused::run_fused_<name> (declared in
// fused_fwd_sm90.h) as fused_fwd_sm90.cuh's FusedFwd<element, lead, drop, wide>::run, and
// LORA_KERNELS_FUSED_SM90_SPLIT_INSTANCE(name, element, drop) as the split variant's FusedFwd<element, true, drop,
// true, true>::run (drop: with dropout). Each is its own translation unit so that the build
// compiles the heavy CUTLASS instances in parallel (as gemm_sm90_instance.cuh). Without CUTLASS
// (LORA_KERNELS_HAVE_SM90_GEMM = 0) the macro defines nothing.
#pragma once
#include "gemm_sm90_instances.h"  // LORA_KERNELS_HAVE_SM90_GEMM

#if LORA_KERNELS_HAVE_SM90_GEMM
#include "fused_fwd_sm90.cuh"

#define LORA_KERNELS_FUSED_SM90_INSTANCE(name, element, lead, drop, wide)                                      \
  namespace lora_kernels::sm90fused {                                                                           \
  cudaError_t run_fused_##name(const Operands& o, const FusedParams& f, int64_t K, int sms, cudaStream_t s) {  \
    return FusedFwd<element, lead, drop, wide>::run(o, f, K, sms, s);                                           \
  }                                                                                                             \
  }
#define LORA_KERNELS_FUSED_SM90_SPLIT_INSTANCE(name, element, drop)                                           \
  namespace lora_kernels::sm90fused {                                                                           \
  cudaError_t run_fused_##name(const Operands& o, const FusedParams& f, int64_t K, int sms, cudaStream_t s) {  \
    return FusedFwd<element, true, drop, true, true>::run(o, f, K, sms, s);                                     \
  }                                                                                                             \
  }
#else
#define LORA_KERNELS_FUSED_SM90_INSTANCE(name, element, lead, drop, wide)
#define LORA_KERNELS_FUSED_SM90_SPLIT_INSTANCE(name, element, drop)
#endif
