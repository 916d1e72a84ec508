"""Writes csrc/wgmma.cuh, the wgmma wrappers of the hand-written sm_90 kernels (one per dtype and N: each asm
statement lists its N / 2 accumulator registers).  python3 bench/dev/gen_wgmma.py"""
import os
NS = [16, 32, 48, 64, 96, 192]
TYPES = [("__nv_bfloat16", "bf16"), ("__half", "f16")]
out = []
out.append("""// wgmma (sm_90a) wrappers of the hand-written Hopper kernels: warpgroup-wide D (64 x N, fp32) = A (64 x 16) B (16 x N)
// (+ D when scale_d != 0), both operands in shared memory through their descriptors (mma), or A from registers (mma_rs),
// for the N of those kernels.
// Written by bench/dev/gen_wgmma.py.
// TnspA = 0: A is K-major; 1: A is MN-major (a tile read transposed). B is always K-major. Each asm statement
// lists its N / 2 accumulator registers, so every N is written out (this header is generated, one function per
// (type, N); the register order is the PTX fragment order: d[4 c + 2 h + e] = row 16 w + lane / 4 + 8 h of the
// warpgroup's warp w, column 8 c + 2 (lane % 4) + e).
// Also: the descriptor of a 128-byte-swizzled tile, the fences, the group commit / wait and the mbarrier calls.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace lora_kernels {
namespace detail {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LK_WGMMA 1
#else
#define LK_WGMMA 0
#endif

#if LK_WGMMA
// Descriptor of an operand tile at shared address `addr` in the canonical 128-byte-swizzle layout: rows of 128
// bytes (64 16-bit elements), 16-byte chunk c of row i stored at chunk c ^ (i % 8), 8-row groups 1024 bytes apart
// (the group stride, SBO), base 1024-byte aligned. K-major: a row per M (or N) index, K along the row; MN-major:
// a row per K index. Advancing `addr` by 32 bytes moves a K-major operand 16 elements along K.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// Byte offset of 16-byte chunk c (0..7) of row i in such a tile: the 128-byte swizzle the descriptor describes.
__device__ __forceinline__ uint32_t sw128_offset(int i, int c) { return i * 128 + ((c ^ (i & 7)) << 4); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\\n" ::"n"(N) : "memory"); }
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory"); }
// Keeps the compiler from moving accesses of the accumulators across a wgmma_wait.
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// mbarrier (shared::cta): init with an arrival count, arrive, wait for the completion of the phase of a parity
// (a fresh barrier counts as having completed the phase of parity 1), and an arrival made when all of this thread's
// earlier cp.async copies have landed (noinc: it is one of the counted arrivals).
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\\n.reg .pred done;\\nLK_WAIT:\\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\\n"
      "@!done bra LK_WAIT;\\n}\\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\\n" ::"r"(bar) : "memory");
}

template <typename T, int N>
struct Wgmma;
""")
for T, s in TYPES:
    for N in NS:
        R = N // 2
        regs = ", ".join(f"%{i}" for i in range(R))
        outs = ", ".join(f'"+f"(d[{i}])' for i in range(R))
        out.append(f"""template <>
struct Wgmma<{T}, {N}> {{
  template <int TnspA>
  __device__ __forceinline__ static void mma(float (&d)[{R}], uint64_t a, uint64_t b, int scale_d) {{
    asm volatile(
        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{R + 2}, 0;\\n"
        "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{s}.{s} {{{regs}}}, %{R}, %{R + 1}, p, 1, 1, %{R + 3}, 0;\\n}}\\n"
        : {outs}
        : "l"(a), "l"(b), "r"(scale_d), "n"(TnspA));
  }}
  // A from registers: a[4], the warp's m16 x k16 fragment as mma.sync.m16n8k16 holds it (rows lane / 4 and + 8 of
  // the warp's 16, columns 2 (lane % 4) and + 8), B from shared memory (K-major).
  __device__ __forceinline__ static void mma_rs(float (&d)[{R}], const uint32_t (&a)[4], uint64_t b, int scale_d) {{
    asm volatile(
        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{R + 5}, 0;\\n"
        "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{s}.{s} {{{regs}}}, {{%{R}, %{R + 1}, %{R + 2}, %{R + 3}}}, %{R + 4}, p, 1, 1, 0;\\n}}\\n"
        : {outs}
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));
  }}
}};
""")
out.append("""#endif  // LK_WGMMA

}  // namespace detail
}  // namespace lora_kernels
""")
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "wgmma.cuh"), "w").write("\n".join(out))
