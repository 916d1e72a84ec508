// Programmatic dependent launch (PDL, sm_90+): a kernel launched with the programmatic-stream-serialization
// attribute (with_pdl) may start while the kernel before it on the stream still runs, and waits with
// pdl_wait() before it touches global memory; the kernel before it lets it start early with pdl_launch_dependents().
// So a launch's latency and its prologue (barrier setup, descriptor prefetch, the cluster's handshake) overlap the
// small launch before it: the fused forward after its prep, the K-extended GEMM after its pack, the streaming passes
// (shrink, dy pass, dA) after theirs. Both instructions are no-ops where the
// launch had no such dependency, and below sm_90 the helpers compile to nothing.
#pragma once
#include <cuda_runtime.h>

#include "lora_kernels.cuh"  // env_switch_on

namespace lora_kernels {

// First thing (before any global load or store) in a kernel launched with with_pdl: waits until the kernels
// before it on the stream have completed and their memory is visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// In a kernel that a with_pdl launch follows: from here on this block no longer holds the next kernel back.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether the launches take programmatic dependent launch: not with LORA_KERNELS_PDL=0 (read once: A/B timing).
inline bool pdl_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_PDL");
  return on;
}

// Appends to attrs[0, n) the launch attribute that lets a kernel start before the one ahead of it on the stream
// has finished, unless pdl_enabled() says not; returns the new count.
inline unsigned with_pdl(cudaLaunchAttribute* attrs, unsigned n) {
  if (!pdl_enabled()) return n;
  attrs[n] = cudaLaunchAttribute{};
  attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[n].val.programmaticStreamSerializationAllowed = 1;
  return n + 1;
}

}  // namespace lora_kernels
