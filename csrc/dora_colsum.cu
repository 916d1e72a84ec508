// DoRA's backward pass over dy (the C++ entry of dora_autograd.h; the math of lora_kernels/dora.py):
//
//   dy_c = c ⊙ dy,   part[s] = Σ_{m in split s} dy ⊙ (z − b) / div      (div null: no division)
//
// p = 0: z is the output y itself, b its bias, c = div = g: part sums dy ⊙ (y − b)/g, the z = (y − b)/g of the
// LoRA output. p > 0: z is the recomputed LoRA output of x_k (no bias), c = (g − 1)/q and no division; dy_c may
// then be written over z.
// One read of dy and z, one write of dy_c. dy_c may be dy itself (the node's backward overwrites a dy that it owns:
// no M×N buffer) or z; each element is read and then written by the same thread, so dy, z and dy_c are not
// __restrict__.
// Tiling: blocks of 32·V columns (V consecutive columns per lane: 16-byte accesses, V = 8 for 16-bit dy, 4 for fp32;
// V = 4 with scalar fallbacks where N or a pointer is not aligned) by one row split, whose 8 warps take every 8th row;
// the warps' sums reduced in a fixed order (deterministic, no atomics).
// Columns with div = 0 get 0 in part here; launch_dora_dmag (dora_dmag.cu) recomputes them and those where y
// cannot give z accurately (dora_recompute_z: a bias and a small g, or big_adapter). With keep_recomputed those
// columns' dy_c keeps dy
// for that recompute, which then writes g ⊙ dy there.
#include "common.cuh"
#include "plans.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kColsumCols = 32 * 4;  // columns per block of the scalar kernel: 4 per lane

// Both kernels' end: part[split, n] = (Σ over the block's warps, in warp order: deterministic) / div_n, 0 where
// div_n = 0 (div null: the sum itself), for the block's COLS columns from col0; lane l of each warp holds the sums of
// columns l·V .. l·V + V − 1.
template <int COLS, int V>
__device__ __forceinline__ void colsum_part_store(float (&sums)[kWarps][COLS], const float (&acc)[V],
                                                  const float* __restrict__ div, float* __restrict__ part,
                                                  int64_t col0, int64_t N) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q < V; ++q) sums[warp][lane * V + q] = acc[q];
  __syncthreads();
  for (int c = threadIdx.x; c < COLS; c += kThreads) {
    const int64_t n = col0 + c;
    if (n < N) {
      float t = 0.f;
      for (int w = 0; w < kWarps; ++w) t += sums[w][c];
      if (div == nullptr) {
        part[(int64_t)blockIdx.y * N + n] = t;
      } else {
        const float dn = div[n];
        part[(int64_t)blockIdx.y * N + n] = dn != 0.f ? t / dn : 0.f;
      }
    }
  }
}

// Blocks of 128 columns × one row split: dy_c = c ⊙ dy (when dyc is not null) and part[split, n] =
// Σ_m dy (y − b) / div_n (0 where div_n = 0; launch_dora_dmag fills those columns), when part is not null.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_colsum_kernel(const T* dy, const T* y, const float* __restrict__ g, const float* __restrict__ div,
                   const T* __restrict__ bias, const uint8_t* __restrict__ big_adapter, T* dyc,
                   float* __restrict__ part, int64_t M, int64_t N, int64_t rows_per_split, bool keep_recomputed) {
  __shared__ float sums[kWarps][kColsumCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t)blockIdx.x * kColsumCols + lane * 4;
  const int valid = n0 < N ? (int)min64(4, N - n0) : 0;
  float gv[4], bv[4] = {0.f, 0.f, 0.f, 0.f}, acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int q = 0; q < 4; ++q) gv[q] = q < valid ? g[n0 + q] : 0.f;
  if (bias != nullptr && valid > 0) load4<T>(bias + n0, valid, bv);
  if (keep_recomputed) {  // dy_c = dy in the columns launch_dora_dmag recomputes, until it runs
    for (int q = 0; q < valid; ++q) {
      const bool big = big_adapter != nullptr && big_adapter[n0 + q];
      gv[q] = dora_recompute_z(gv[q], bv[q], big) ? 1.f : gv[q];
    }
  }
  const Span rows = block_span(blockIdx.y, rows_per_split, M);
  if (valid > 0) {
#pragma unroll 4
    for (int64_t m = rows.begin + warp; m < rows.end; m += kWarps) {
      float d[4];
      load4<T>(dy + m * N + n0, valid, d);
      if (part != nullptr) {
        float v[4];
        load4<T>(y + m * N + n0, valid, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] = fmaf(d[q], v[q] - bv[q], acc[q]);
      }
      if (dyc != nullptr) {
        float o[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) o[q] = d[q] * gv[q];
        store4<T>(dyc + m * N + n0, valid, o);
      }
    }
  }
  if (part != nullptr) colsum_part_store(sums, acc, div, part, (int64_t)blockIdx.x * kColsumCols, N);
}

// The same pass with 16-byte accesses (8 columns of a 16-bit dy per lane, 4 of an fp32 one: a block takes 32·V
// columns), four rows in flight per warp; for N a multiple of V and 16-byte aligned dy, y and dy_c (the usual case).
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_colsum_vec_kernel(const T* dy, const T* y, const float* __restrict__ g, const float* __restrict__ div,
                       const T* __restrict__ bias, const uint8_t* __restrict__ big_adapter, T* dyc,
                       float* __restrict__ part, int64_t M, int64_t N, int64_t rows_per_split,
                       bool keep_recomputed) {
  constexpr int V = 16 / sizeof(T), kCols = 32 * V, kRows = 4;
  __shared__ float sums[kWarps][kCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t)blockIdx.x * kCols + lane * V;
  const bool valid = n0 < N;  // V divides N: a lane's columns are all in range or all out
  float gv[V], bv[V], acc[V];
#pragma unroll
  for (int q = 0; q < V; ++q) {
    gv[q] = valid ? g[n0 + q] : 0.f;
    bv[q] = valid && bias != nullptr ? to_f<T>(bias[n0 + q]) : 0.f;
    // dy_c = dy in the columns launch_dora_dmag recomputes, until it runs
    const bool big = valid && big_adapter != nullptr && big_adapter[n0 + q];
    if (keep_recomputed && dora_recompute_z(gv[q], bv[q], big)) gv[q] = 1.f;
    acc[q] = 0.f;
  }
  auto unpack = [](const uint4& u, float* f) {
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int q = 0; q < V; ++q) f[q] = to_f<T>(e[q]);
  };
  auto rows_step = [&](int64_t m, const uint4& du, const uint4& yu) {
    float d[V];
    unpack(du, d);
    if (part != nullptr) {
      float v[V];
      unpack(yu, v);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = fmaf(d[q], v[q] - bv[q], acc[q]);
    }
    if (dyc != nullptr) {
      uint4 o;
      T* e = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int q = 0; q < V; ++q) e[q] = from_f<T>(d[q] * gv[q]);
      *reinterpret_cast<uint4*>(dyc + m * N + n0) = o;
    }
  };
  const Span rows = block_span(blockIdx.y, rows_per_split, M);
  if (valid) {
    int64_t m = rows.begin + warp;
    for (; m + (kRows - 1) * kWarps < rows.end; m += kRows * kWarps) {  // kRows rows' loads issued together
      uint4 du[kRows], yu[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        du[i] = *reinterpret_cast<const uint4*>(dy + (m + i * kWarps) * N + n0);
        if (part != nullptr) yu[i] = *reinterpret_cast<const uint4*>(y + (m + i * kWarps) * N + n0);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) rows_step(m + i * kWarps, du[i], yu[i]);
    }
    for (; m < rows.end; m += kWarps) {
      const uint4 du = *reinterpret_cast<const uint4*>(dy + m * N + n0);
      const uint4 yu = part != nullptr ? *reinterpret_cast<const uint4*>(y + m * N + n0) : du;
      rows_step(m, du, yu);
    }
  }
  if (part != nullptr) colsum_part_store(sums, acc, div, part, (int64_t)blockIdx.x * kCols, N);
}

}  // namespace

int64_t dora_colsum_splits(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 1;
  const int64_t blocks = ceil_div(N, kColsumCols);
  const int64_t want = std::max<int64_t>(1, 4 * (int64_t)num_sms() / blocks);  // about 4 blocks of 256 per SM
  return std::max<int64_t>(1, std::min(want, ceil_div(M, 64)));               // at least 64 rows per split
}

cudaError_t launch_dora_colsum(const void* dy, const void* y, DType dtype, const float* c, const float* div,
                               const void* bias, const uint8_t* big_adapter, void* dyc, float* part, int64_t M,
                               int64_t N, int64_t splits, bool keep_recomputed, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || (dyc == nullptr && part == nullptr)) return cudaSuccess;
  // grid.y = splits, all of them: every row of part is written (a split past M writes zeros), as launch_dora_dmag
  // sums all `splits` of them
  const int64_t rows = ceil_div(M, splits);
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int V = 16 / sizeof(T);
    if (N % V == 0 && aligned(dy) && aligned(y) && aligned(dyc)) {
      const dim3 grid((unsigned)ceil_div(N, 32 * V), (unsigned)splits);
      return launch_kernel(dora_colsum_vec_kernel<T>, grid, kThreads, 0, stream, static_cast<const T*>(dy),
                           static_cast<const T*>(y), c, div, static_cast<const T*>(bias), big_adapter,
                           static_cast<T*>(dyc), part, M, N, rows, keep_recomputed);
    }
    const dim3 grid((unsigned)ceil_div(N, kColsumCols), (unsigned)splits);
    return launch_kernel(dora_colsum_kernel<T>, grid, kThreads, 0, stream, static_cast<const T*>(dy),
                         static_cast<const T*>(y), c, div, static_cast<const T*>(bias), big_adapter,
                         static_cast<T*>(dyc), part, M, N, rows, keep_recomputed);
  });
}

}  // namespace lora_kernels
