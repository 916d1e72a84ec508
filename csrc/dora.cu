// DoRA's passes around the LoRA kernels (p = 0; the C++ entry of csrc/dora_autograd.h, the math of
// lora_kernels/dora.py):
//
//   norm:     ‖W_n + s(BA)_n‖² = ‖W_n‖² + 2s·B_n·(W Aᵀ)_n + s²·B_n (A Aᵀ) B_nᵀ      (W Aᵀ from the shrink over W)
//             g = magnitude / norm,  Bg = g ⊙ B (rounded to B's dtype)               launch_dora_combine
//   backward: dy_c = g ⊙ dy,  part[s] = Σ_{m in split s} dy ⊙ (y − b) / g           launch_dora_colsum
//             dmag = Σ_s part[s] / norm, and where g = 0 (y = b: z is lost from y)  launch_dora_dmag
//             dmag_n = Σ_m dy_mn (x_m·W_n + u_m·B_n) / norm_n (z recomputed for those columns only)
//
// Tiling: combine runs one warp per row n (r ≤ 256 columns of B in shared memory); colsum runs blocks of 32·V columns
// (V consecutive columns per lane: 16-byte accesses, V = 8 for 16-bit dy, 4 for fp32; V = 4 with scalar fallbacks
// where N or a pointer is not aligned) whose 8 warps take every 8th row of a row split, partial sums reduced over the
// warps in a fixed order (deterministic, no atomics); dmag runs one thread per column, then each block recomputes
// its zero-g columns (none in practice: the launch costs a read of g). Math in fp32; each output rounded once.
#include "common.cuh"
#include "plans.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kColsumCols = 32 * 4;  // columns per colsum block: 4 per lane

__device__ __forceinline__ float load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per row n of B: the row's squared norm from ‖W_n‖² (wsq), W Aᵀ (wa, N × r fp32) and A Aᵀ (aat, r × r
// fp32); then g_n = magnitude_n / norm_n and Bg_n = g_n B_n.
__global__ void __launch_bounds__(kThreads)
dora_combine_kernel(const float* __restrict__ wa, const float* __restrict__ wsq, const void* __restrict__ B, DType b_dt,
                    const float* __restrict__ aat, const void* __restrict__ mag, DType m_dt, float s, int64_t N,
                    int r, float* __restrict__ norm, float* __restrict__ g, void* __restrict__ Bg) {
  __shared__ float rows[kWarps][kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = (int64_t)blockIdx.x * kWarps + warp;
  if (n >= N) return;
  float* b = rows[warp];
  float lin = 0.f;
  for (int j = lane; j < r; j += 32) {
    b[j] = load_any(B, b_dt, n * r + j);
    lin = fmaf(b[j], wa[n * r + j], lin);
  }
  __syncwarp();
  // quad = Σ_j b_j Σ_k (A Aᵀ)_jk b_k, lane j reading column j of the symmetric A Aᵀ: at each k the lanes read
  // consecutive floats of row k (coalesced), where reading row j of their own would touch 32 rows per load (at
  // r = 64 that read dominated the forward's norm: +70 to +220 us per call on the H200, twentieth session)
  float quad = 0.f;
  for (int j = lane; j < r; j += 32) {
    float t = 0.f;
    for (int k = 0; k < r; ++k) t = fmaf(aat[(int64_t)k * r + j], b[k], t);
    quad = fmaf(b[j], t, quad);
  }
  lin = warp_sum(lin);
  quad = warp_sum(quad);
  const float sq = wsq[n] + 2.f * s * lin + (s * s) * quad;
  const float nn = sqrtf(fmaxf(sq, 0.f));
  const float gn = load_any(mag, m_dt, n) / nn;
  if (lane == 0) {
    norm[n] = nn;
    g[n] = gn;
  }
  for (int j = lane; j < r; j += 32) store_any(Bg, b_dt, n * r + j, b[j] * gn);
}

// Blocks of 128 columns × one row split: dy_c = g ⊙ dy (when dyc is not null) and part[split, n] =
// Σ_m dy (y − b) / g_n (0 where g_n = 0; launch_dora_dmag fills those columns), when part is not null.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_colsum_kernel(const T* __restrict__ dy, const T* __restrict__ y, const float* __restrict__ g,
                   const T* __restrict__ bias, T* __restrict__ dyc, float* __restrict__ part, int64_t M, int64_t N,
                   int64_t rows_per_split) {
  __shared__ float sums[kWarps][kColsumCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t)blockIdx.x * kColsumCols + lane * 4;
  const int valid = n0 < N ? (int)min64(4, N - n0) : 0;
  float gv[4], bv[4] = {0.f, 0.f, 0.f, 0.f}, acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int q = 0; q < 4; ++q) gv[q] = q < valid ? g[n0 + q] : 0.f;
  if (bias != nullptr && valid > 0) load4<T>(bias + n0, valid, bv);
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
  if (part == nullptr) return;
#pragma unroll
  for (int q = 0; q < 4; ++q) sums[warp][lane * 4 + q] = acc[q];
  __syncthreads();
  if (threadIdx.x < kColsumCols) {
    const int64_t n = (int64_t)blockIdx.x * kColsumCols + threadIdx.x;
    if (n < N) {
      float t = 0.f;
      for (int w = 0; w < kWarps; ++w) t += sums[w][threadIdx.x];
      const float gn = g[n];
      part[(int64_t)blockIdx.y * N + n] = gn != 0.f ? t / gn : 0.f;
    }
  }
}

// The same pass with 16-byte accesses (8 columns of a 16-bit dy per lane, 4 of an fp32 one: a block takes 32·V
// columns), four rows in flight per warp; for N a multiple of V and 16-byte aligned dy, y and dy_c (the usual case).
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_colsum_vec_kernel(const T* __restrict__ dy, const T* __restrict__ y, const float* __restrict__ g,
                       const T* __restrict__ bias, T* __restrict__ dyc, float* __restrict__ part, int64_t M, int64_t N,
                       int64_t rows_per_split) {
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
  if (part == nullptr) return;
#pragma unroll
  for (int q = 0; q < V; ++q) sums[warp][lane * V + q] = acc[q];
  __syncthreads();
  for (int c = threadIdx.x; c < kCols; c += kThreads) {
    const int64_t n = (int64_t)blockIdx.x * kCols + c;
    if (n < N) {
      float t = 0.f;
      for (int w = 0; w < kWarps; ++w) t += sums[w][c];
      const float gn = g[n];
      part[(int64_t)blockIdx.y * N + n] = gn != 0.f ? t / gn : 0.f;
    }
  }
}

// One thread per column: dmag_n = Σ_s part[s, n] / norm_n. Then the block's columns with g_n = 0, one at a time:
// z_mn = x_m·W_n + u_m·B_n recomputed (a warp per row, lanes over K) and dmag_n = Σ_m dy_mn z_mn / norm_n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_dmag_kernel(const float* __restrict__ part, int64_t splits, const float* __restrict__ g,
                 const float* __restrict__ norm, const T* __restrict__ dy, const T* __restrict__ x,
                 const T* __restrict__ W, const float* __restrict__ u, const void* __restrict__ B, DType b_dt,
                 void* __restrict__ dmag, DType m_dt, int64_t M, int64_t K, int64_t N, int r) {
  __shared__ float sums[kWarps];
  __shared__ int zero_any;
  const int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (threadIdx.x == 0) zero_any = 0;
  __syncthreads();
  if (n < N) {
    float t = 0.f;
    for (int64_t s = 0; s < splits; ++s) t += part[s * N + n];
    store_any(dmag, m_dt, n, t / norm[n]);
    if (g[n] == 0.f) zero_any = 1;
  }
  __syncthreads();
  if (!zero_any) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t end = min64(N, (int64_t)(blockIdx.x + 1) * kThreads);
  for (int64_t c = (int64_t)blockIdx.x * kThreads; c < end; ++c) {
    if (g[c] != 0.f) continue;  // uniform over the block
    float acc = 0.f;
    for (int64_t m = warp; m < M; m += kWarps) {
      float z = 0.f;
      for (int64_t k = lane; k < K; k += 32) z = fmaf(to_f<T>(x[m * K + k]), to_f<T>(W[c * K + k]), z);
      for (int j = lane; j < r; j += 32) z = fmaf(u[m * r + j], load_any(B, b_dt, c * r + j), z);
      z = warp_sum(z);
      acc = fmaf(to_f<T>(dy[m * N + c]), z, acc);
    }
    if (lane == 0) sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f;
      for (int w = 0; w < kWarps; ++w) t += sums[w];
      store_any(dmag, m_dt, c, t / norm[c]);
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_dora_combine(const float* wa, const float* wsq, const void* B, DType b_dtype, const float* aat,
                                const void* magnitude, DType m_dtype, float scaling, int64_t N, int r, float* norm,
                                float* g, void* Bg, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  return launch_kernel(dora_combine_kernel, dim3((unsigned)ceil_div(N, kWarps)), kThreads, 0, stream, wa, wsq, B,
                       b_dtype, aat, magnitude, m_dtype, scaling, N, r, norm, g, Bg);
}

int64_t dora_colsum_splits(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 1;
  const int64_t blocks = ceil_div(N, kColsumCols);
  const int64_t want = std::max<int64_t>(1, 4 * (int64_t)num_sms() / blocks);  // about 4 blocks of 256 per SM
  return std::max<int64_t>(1, std::min(want, ceil_div(M, 64)));               // at least 64 rows per split
}

cudaError_t launch_dora_colsum(const void* dy, const void* y, DType dtype, const float* g, const void* bias,
                               void* dyc, float* part, int64_t M, int64_t N, int64_t splits, cudaStream_t stream) {
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
                           static_cast<const T*>(y), g, static_cast<const T*>(bias), static_cast<T*>(dyc), part, M,
                           N, rows);
    }
    const dim3 grid((unsigned)ceil_div(N, kColsumCols), (unsigned)splits);
    return launch_kernel(dora_colsum_kernel<T>, grid, kThreads, 0, stream, static_cast<const T*>(dy),
                         static_cast<const T*>(y), g, static_cast<const T*>(bias), static_cast<T*>(dyc), part, M, N,
                         rows);
  });
}

cudaError_t launch_dora_dmag(const float* part, int64_t splits, const float* g, const float* norm, const void* dy,
                             const void* x, const void* W, DType dtype, const float* u, const void* B, DType b_dtype,
                             void* dmag, DType m_dtype, int64_t M, int64_t K, int64_t N, int r, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return launch_kernel(dora_dmag_kernel<T>, dim3((unsigned)ceil_div(N, kThreads)), kThreads, 0, stream, part,
                         splits, g, norm, static_cast<const T*>(dy), static_cast<const T*>(x),
                         static_cast<const T*>(W), u, B, b_dtype, dmag, m_dtype, M, K, N, r);
  });
}

}  // namespace lora_kernels
