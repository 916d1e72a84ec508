// Inline-PTX wrappers of the tensor-core kernels (sm_80+): ldmatrix, mma.sync.m16n8k16 and cp.async, and the
// per-lane offsets of the ldmatrix address patterns. Writing the PTX directly fixes the fragment layouts, so the
// kernels' epilogues write straight from the accumulators.
#pragma once
#include "common.cuh"

namespace lora_kernels {
namespace detail {

#if LK_TC_ARCH
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix x4: lane l gives the address of row l % 8 of the 8x8 matrix l / 8; r[i] gets matrix i's fragment
// (row lane / 4, columns 2 * (lane % 4) and +1), or of its transpose with .trans.
// (p: a generic pointer into shared memory, or its shared-window address.)
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) { ldsm4(r, smem_addr(p)); }
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16 x 8, fp32) += a (16 x 16) b (16 x 8). Fragments (g = lane / 4, t = lane % 4): a[0..3] = A rows g, g+8,
// g, g+8 x columns 2t, 2t+1 (+8 for a[2], a[3]); b0 / b1 = B rows 2t, 2t+1 (+8 for b1) x column g;
// c[0..1] = C row g, columns 2t, 2t+1; c[2..3] = row g + 8.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Zeroed mma accumulators.
template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;
}

// acc += part with fp32 adds (round to nearest). The tensor cores' fp32 accumulation truncates; kernels that must
// match fp32 FFMA accuracy (the bf16x3 pieces) keep their mma chains to one tile in `part` and add it here.
template <int N>
__device__ __forceinline__ void add_acc(float (&acc)[N][4], const float (&part)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[n][q] += part[n][q];
}

// c0 += a b[0..1] and c1 += a b[2..3]: a 16 x 16 B block from one ldmatrix.x4, as its two 8-column halves.
template <typename T>
__device__ __forceinline__ void mma16816x2(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[4]) {
  mma16816<T>(c0, a, b[0], b[1]);
  mma16816<T>(c1, a, b[2], b[3]);
}

// The two ldmatrix.x4 address patterns (element row / column offsets of this lane inside a 16 x 16 block):
//  P1 (row lane % 16, column 8 * (lane / 16)): the A operand of a row-major [m][k] tile (ldsm4), and the two
//     8-column B fragments of a [k][n] tile (ldsm4_t): r[0], r[1] = columns 0-7, r[2], r[3] = columns 8-15.
//  P2 (row lane % 8 + 8 * (lane / 16), column 8 * (lane / 8 % 2)): the A operand of a [k][m] tile (A^T,
//     ldsm4_t), and the two 8-column B fragments of an [n][k] tile (B^T stored, ldsm4).
// The 16-bit pair v times the pair m, each half of m 1 or 0 in T, exactly x * keep: fma.rn with -0 added (the
// product is exact; -0 leaves it and its sign as they are). fma.rn.{bf16x2,f16x2}: sm_80+.
template <typename T>
__device__ __forceinline__ uint32_t mul_keep_pair(uint32_t v, uint32_t m) {
  uint32_t d;
  if constexpr (std::is_same<T, __half>::value)
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(v), "r"(m), "r"(0x80008000u));
  else
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(v), "r"(m), "r"(0x80008000u));
  return d;
}

// mul_keep_pair with the keep flags as bits: (bit 0 of two, bit 1 of two) for the (low, high) half.
template <typename T>
__device__ __forceinline__ uint32_t mul_keep2(uint32_t v, uint32_t two) {
  constexpr uint32_t kOne = std::is_same<T, __half>::value ? 0x3C00u : 0x3F80u;
  return mul_keep_pair<T>(v, (two & 1u) * kOne | (two >> 1) * (kOne << 16));
}

struct LaneOffsets {
  int r1, c1, r2, c2, g, t;
  __device__ __forceinline__ LaneOffsets() {
    const int lane = threadIdx.x & 31;
    r1 = lane & 15;
    c1 = (lane >> 4) * 8;
    r2 = (lane & 7) + (lane >> 4) * 8;
    c2 = ((lane >> 3) & 1) * 8;
    g = lane >> 2;
    t = lane & 3;
  }
};

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// 4 bytes (cp.async.ca: .cg takes 16 only); src 4-byte aligned; src_bytes 0 zero-fills.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's cp.async groups are pending; a memory clobber, since the thread then
// reads the landed data itself (dropout in place) before the next barrier.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// 16 bytes of shared memory at its shared-window address; volatile with a memory clobber, so that it stays after the
// cp.async wait whose group wrote them.
__device__ __forceinline__ uint4 lds128(uint32_t smem) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem)
               : "memory");
  return v;
}
#endif  // LK_TC_ARCH

}  // namespace detail
}  // namespace lora_kernels
