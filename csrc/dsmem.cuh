// Distributed shared memory on sm_90 clusters: another CTA's shared memory by address (mapa, ld.shared::cluster),
// the cluster barrier, and mbarriers arrived at from any CTA of the cluster. Used by the small-M Hopper kernel
// (csrc/small_m_sm90.cu: its K split's sums) and the fused forward's split variant (csrc/fused_fwd_sm90.cuh: u's
// partial sums). The bodies exist only for sm_90 device code; elsewhere these are never called.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LK_DSMEM 1
#else
#define LK_DSMEM 0
#endif

namespace lora_kernels {
namespace detail {

// The cluster barrier: every thread of every CTA of the cluster takes part.
__device__ __forceinline__ void cluster_sync() {
#if LK_DSMEM
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ int cluster_rank() {
  uint32_t r = 0;
#if LK_DSMEM
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return (int)r;
}
// The shared::cluster address of this CTA's shared address `addr` in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_addr(uint32_t addr, int rank) {
  uint32_t out = addr;
#if LK_DSMEM
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
#endif
  return out;
}
// 16 bytes of another CTA's shared memory. The loads of one batch are issued back to back (nothing reads them
// until the batch's last one is out), so a batch costs one round trip.
__device__ __forceinline__ float4 ld_cluster4(uint32_t addr) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#if LK_DSMEM
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
#endif
  return v;
}
// One arrive at the mbarrier at this CTA's shared address `bar` in CTA `rank`, with release at cluster scope: the
// arriving thread's writes (and those it has synchronised with) are visible to whoever waits there with acquire.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, int rank) {
#if LK_DSMEM
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr(bar, rank))
               : "memory");
#endif
}
// Waits until this CTA's mbarrier `bar` has completed the phase of the given parity, with acquire at cluster scope.
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
#if LK_DSMEM
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

}  // namespace detail
}  // namespace lora_kernels
