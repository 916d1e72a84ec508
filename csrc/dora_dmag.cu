// The grad of DoRA's magnitude (the C++ entry of dora_autograd.h; the math of lora_kernels/dora.py):
//
//   dmag_n = Σ_s part[s, n] / q / norm_n                 (the column sums of dora_colsum.cu; q = 1 − p)
//   p = 0, where y cannot give z (dora_recompute_z: g_n = 0, where y = b; a bias and |g_n| < 1/2, where (y − b)/g
//   amplifies y's rounding; or big_adapter_n, where y's LoRA part carries the 16-bit operands' rounding at a scale
//   past the base's):  dmag_n = Σ_m dy_mn (x_m·W_n + u_m·B_n) / norm_n
//   (g null: no such recompute, as at p > 0, where the sums come from z itself)
//
// Two launches at p = 0. The recompute (dora_dmag_recompute_kernel): grid (64-column blocks, row splits), a block
// without a flagged column returns after reading g, the bias and the flags (the common case: DoRA keeps g near 1 and
// the adapter small against W); otherwise 64 × 64 tiles of x Wᵀ over K (tensor-core WMMA for 16-bit x, exact
// products and float32 sums; float32 FMA for float32 x), u Bᵀ added in float32, and the tile's Σ dy ⊙ z into the
// block's partial (rpart, the rows of part after the colsum's). Where every column is flagged (an adapter larger
// than W, as in a benchmark's random init) that costs about one GEMM, not a pass over x per column. Then
// dora_dmag_kernel, one thread per column: the colsum's partials, or the recompute's in a flagged column.
// scale_dy (dy itself, or null): where the colsum pass overwrote dy with dy_c in place, it kept dy in the flagged
// columns for this recompute; the recompute block that reads a (row, flagged column) element of dy writes
// dy_c = g ⊙ dy there (no other launch reads those elements in between).
#include "common.cuh"
#include "plans.cuh"

#if LK_TC_ARCH
#include <mma.h>
#endif

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kRcBM = 64, kRcBN = 64, kRcBK = 32, kRcThreads = 128;
constexpr int kRcLdz = kRcBN + 4;  // float32 row pitch of the z tile

template <typename T>
struct RcTile {  // 16-byte pieces: 8 elements of a 16-bit T, 4 of float32
  static constexpr int kVec = 16 / (int)sizeof(T);
  static constexpr int kLds = kRcBK + kVec;  // row pitch: a multiple of 16 bytes (and of 8 elements for WMMA)
};

__device__ __forceinline__ bool flagged_column(const float* g, float b, const uint8_t* big_adapter, int64_t c) {
  return dora_recompute_z(g[c], b, big_adapter != nullptr && big_adapter[c]);
}

// dst (64 rows × kRcBK, pitch kLds) = src rows row0.. (< rows_end), columns k0.. (< K), zero outside.
template <typename T>
__device__ __forceinline__ void rc_load_tile(T* dst, const T* __restrict__ src, int64_t K, int64_t row0,
                                             int64_t rows_end, int64_t k0, bool vec) {
  constexpr int V = RcTile<T>::kVec, LDS = RcTile<T>::kLds, PER_ROW = kRcBK / V;
  for (int i = threadIdx.x; i < kRcBM * PER_ROW; i += kRcThreads) {
    const int row = i / PER_ROW, c = i % PER_ROW * V;
    T* d = dst + row * LDS + c;
    const int64_t gr = row0 + row, gk = k0 + c;
    if (gr < rows_end && vec && gk + V <= K) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + gr * K + gk);
    } else {
      for (int e = 0; e < V; ++e) d[e] = (gr < rows_end && gk + e < K) ? src[gr * K + gk + e] : from_f<T>(0.f);
    }
  }
}

// zs (64 × 64 float32, pitch kRcLdz) = x[m0.., :] · W[n0.., :]ᵀ (rows past m_end and columns past N are zeros).
template <typename T>
__device__ __forceinline__ void rc_tile_product(T* xs, T* ws, float* zs, const T* __restrict__ x,
                                                const T* __restrict__ W, int64_t m0, int64_t m_end, int64_t n0,
                                                int64_t N, int64_t K, bool vec) {
  constexpr int LDS = RcTile<T>::kLds;
#if LK_TC_ARCH
  if constexpr (sizeof(T) == 2) {  // WMMA 16 × 16 × 16: each warp a 32 × 32 quarter of the tile
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2 * 32, wn = warp % 2 * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += kRcBK) {
      __syncthreads();  // every warp has loaded its fragments of the previous K tile
      rc_load_tile(xs, x, K, m0, m_end, k0, vec);
      rc_load_tile(ws, W, K, n0, N, k0, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kRcBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];  // Wᵀ: (k, n) at ws[n][k]
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm + 16 * i) * LDS + kk, LDS);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wn + 16 * j) * LDS + kk, LDS);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(zs + (wm + 16 * i) * kRcLdz + wn + 16 * j, acc[i][j], kRcLdz, wmma::mem_row_major);
    return;
  }
#endif
  // float32 FMA (float32 x; 16-bit x below sm_80): each thread 8 rows × 4 columns of the tile
  const int tr = threadIdx.x / 16 * 8, tc = threadIdx.x % 16 * 4;
  float acc[8][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kRcBK) {
    __syncthreads();
    rc_load_tile(xs, x, K, m0, m_end, k0, vec);
    rc_load_tile(ws, W, K, n0, N, k0, vec);
    __syncthreads();
    for (int kk = 0; kk < kRcBK; ++kk) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = to_f<T>(xs[(tr + i) * LDS + kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = to_f<T>(ws[(tc + j) * LDS + kk]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) zs[(tr + i) * kRcLdz + tc + j] = acc[i][j];
}

// rpart[split, n] = Σ_{m in the split} dy_mn (x_m·W_n + u_m·B_n) for the 64 columns of a block with a flagged
// column (every column of that block is written; dora_dmag_kernel reads the flagged ones). scale_dy: dy_c = g ⊙ dy
// in the flagged columns of the rows read.
template <typename T>
__global__ void __launch_bounds__(kRcThreads)
dora_dmag_recompute_kernel(const float* __restrict__ g, const T* __restrict__ bias,
                           const uint8_t* __restrict__ big_adapter, const T* dy, const T* __restrict__ x,
                           const T* __restrict__ W, const float* __restrict__ u, const void* __restrict__ B,
                           DType b_dt, float* __restrict__ rpart, T* scale_dy, int64_t rows_per_split, int64_t M,
                           int64_t K, int64_t N, int r) {
  constexpr int LDS = RcTile<T>::kLds;
  __shared__ __align__(32) T xs[kRcBM * LDS];
  __shared__ __align__(32) T ws[kRcBN * LDS];
  __shared__ __align__(32) float zs[kRcBM * kRcLdz];
  __shared__ float halves[kRcThreads];
  const int64_t n0 = (int64_t)blockIdx.x * kRcBN;
  const int col = threadIdx.x % kRcBN, half = threadIdx.x / kRcBN;  // the epilogue's column, every other row
  const int64_t n = n0 + col;
  const bool mine = n < N && flagged_column(g, bias != nullptr ? to_f<T>(bias[n]) : 0.f, big_adapter, n);
  if (!__syncthreads_or(mine)) return;
  const int64_t m_begin = (int64_t)blockIdx.y * rows_per_split, m_end = min64(M, m_begin + rows_per_split);
  const bool vec =
      K % RcTile<T>::kVec == 0 && (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(W)) % 16 == 0;
  const float gn = mine ? g[n] : 0.f;
  float sum = 0.f;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kRcBM) {
    rc_tile_product<T>(xs, ws, zs, x, W, m0, m_end, n0, N, K, vec);
    __syncthreads();
    if (n < N) {
      for (int i = half; i < kRcBM && m0 + i < m_end; i += 2) {
        const int64_t m = m0 + i;
        float z = zs[i * kRcLdz + col];
        for (int j = 0; j < r; ++j) z = fmaf(u[m * r + j], load_any(B, b_dt, n * r + j), z);
        const float d = to_f<T>(dy[m * N + n]);
        sum = fmaf(d, z, sum);
        if (scale_dy != nullptr && mine) scale_dy[m * N + n] = from_f<T>(d * gn);
      }
    }
    __syncthreads();  // zs is written again by the next tile
  }
  halves[threadIdx.x] = sum;
  __syncthreads();
  if (half == 0 && n < N) rpart[(int64_t)blockIdx.y * N + n] = halves[threadIdx.x] + halves[threadIdx.x + kRcBN];
}

// One thread per column: dmag_n = Σ_s part[s, n] / q / norm_n, or in a flagged column (g not null) the recompute's
// Σ_s rpart[s, n] / norm_n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_dmag_kernel(const float* __restrict__ part, int64_t splits, const float* __restrict__ rpart, int64_t rsplits,
                 const float* __restrict__ g, const float* __restrict__ norm, float q, const T* __restrict__ bias,
                 const uint8_t* __restrict__ big_adapter, void* __restrict__ dmag, DType m_dt, int64_t N) {
  const int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (n >= N) return;
  float t = 0.f;
  if (g != nullptr && flagged_column(g, bias != nullptr ? to_f<T>(bias[n]) : 0.f, big_adapter, n)) {
    for (int64_t s = 0; s < rsplits; ++s) t += rpart[s * N + n];
  } else {
    for (int64_t s = 0; s < splits; ++s) t += part[s * N + n];
    if (q != 1.f) t = t / q;
  }
  store_any(dmag, m_dt, n, t / norm[n]);
}

// Rows per split of the recompute: about two blocks per SM over the 64-column blocks, whole 64-row tiles.
int64_t recompute_rows_per_split(int64_t M, int64_t N) {
  const int64_t blocks = ceil_div(N, kRcBN), tiles = ceil_div(M, kRcBM);
  const int64_t want = std::max<int64_t>(1, 2 * (int64_t)num_sms() / blocks);
  return ceil_div(tiles, std::min(want, tiles)) * kRcBM;
}

}  // namespace

int64_t dora_dmag_recompute_splits(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 1;
  return ceil_div(M, recompute_rows_per_split(M, N));
}

cudaError_t launch_dora_dmag(float* part, int64_t splits, const float* g, const float* norm, float q,
                             const void* dy, const void* x, const void* W, const void* bias,
                             const uint8_t* big_adapter, DType dtype, const float* u, const void* B, DType b_dtype,
                             void* dmag, DType m_dtype, void* scale_dy, int64_t M, int64_t K, int64_t N, int r,
                             cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const bool recompute = g != nullptr && M > 0;
  const int64_t rsplits = recompute ? dora_dmag_recompute_splits(M, N) : 0;
  float* rpart = recompute ? part + splits * N : nullptr;  // the rows after the colsum's (the caller's part)
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (recompute) {
      const int64_t rows_per_split = recompute_rows_per_split(M, N);
      const cudaError_t e = launch_kernel(
          dora_dmag_recompute_kernel<T>, dim3((unsigned)ceil_div(N, kRcBN), (unsigned)rsplits), kRcThreads, 0,
          stream, g, static_cast<const T*>(bias), big_adapter, static_cast<const T*>(dy), static_cast<const T*>(x),
          static_cast<const T*>(W), u, B, b_dtype, rpart, static_cast<T*>(scale_dy),
          rows_per_split, M, K, N, r);
      if (e != cudaSuccess) return e;
    }
    return launch_kernel(dora_dmag_kernel<T>, dim3((unsigned)ceil_div(N, kThreads)), kThreads, 0, stream, part,
                         splits, rpart, rsplits, g, norm, q, static_cast<const T*>(bias), big_adapter, dmag, m_dtype,
                         N);
  });
}

}  // namespace lora_kernels
