// The grad of DoRA's magnitude (the C++ entry of dora_autograd.h; the math of lora_kernels/dora.py):
//
//   dmag_n = Σ_s part[s, n] / q / norm_n                 (the column sums of dora_colsum.cu; q = 1 − p)
//   p = 0, where y cannot give z (dora_recompute_z: g_n = 0, where y = b; a bias and |g_n| < 1/2, where (y − b)/g
//   amplifies y's rounding; or big_adapter_n, where y's LoRA part carries the 16-bit operands' rounding at a scale
//   past the base's):  dmag_n = Σ_m dy_mn (x_m·W_n + u_m·B_n) / norm_n
//   (g null: no such recompute, as at p > 0, where the sums come from z itself)
//
// Two launches at p = 0. The recompute: grid (column blocks, row splits); a block without a flagged column returns
// after reading g, the bias and the flags (the common case: DoRA keeps g near 1 and the adapter small against W);
// otherwise it runs a GEMM tile loop of x Wᵀ over its rows and K, adds u Bᵀ in float32 and sums the tile's dy ⊙ z
// per column into the block's partial (rpart, the rows of part after the colsum's). Where every column is flagged (an
// adapter larger than W, as in a benchmark's random init) that costs one GEMM of M×N×K, at tensor-core speed:
//   16-bit x on sm_80+ (K a multiple of 8, x and W 16-byte aligned): dora_dmag_recompute_tc_kernel, 128 × 128 × 32
//     tiles through a 4-stage cp.async ring, ldmatrix + mma.sync.m16n8k16 (exact products, float32 sums), 8 warps
//     of 64 × 32; u and B staged in float32 by 32-column chunks of r for the epilogue.
//   otherwise: dora_dmag_recompute_kernel, 64 × 64 tiles in float32 FMA (float32 x, misaligned rows, below sm_80).
// Then dora_dmag_kernel, one thread per column: the colsum's partials, or the recompute's in a flagged column.
// scale_dy (dy itself, or null): where the colsum pass overwrote dy with dy_c in place, it kept dy in the flagged
// columns for this recompute; the recompute block that reads a (row, flagged column) element of dy writes
// dy_c = g ⊙ dy there (no other launch reads those elements in between).
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

__device__ __forceinline__ bool flagged_column(const float* g, float b, const uint8_t* big_adapter, int64_t c) {
  return dora_recompute_z(g[c], b, big_adapter != nullptr && big_adapter[c]);
}

// ---- The tensor-core recompute (16-bit x) ----
// Tiling: a block owns 128 columns (n0..) and the row tiles of its split; 8 warps, 2 along M × 4 along N, each
// 64 × 32 of the tile (4 × 4 m16n8 accumulators). Per K-tile of 32, x's and W's 128 rows land in one stage of the
// ring (x's rows first, then W's, pitch 40 elements: 80-byte rows, so the 8 rows of every ldmatrix fall in distinct
// bank groups), 16-byte cp.async pieces, zero-filled past the split's rows, N or K.
constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32, kTcStagesRc = 4;
constexpr int kTcLds = kTcBK + 8;
constexpr int kTcStageElems = (kTcBM + kTcBN) * kTcLds;
constexpr size_t kTcSmem = (size_t)kTcStagesRc * kTcStageElems * 2;  // 80 KB
constexpr int kTcRc = 32, kTcRcLd = kTcRc + 1;  // the epilogue's chunk of r (u's and B's columns), float32
static_assert(2 * kTcBM * kTcRcLd * 4 <= (int)kTcSmem, "the epilogue's u and B chunks reuse the ring");

// rpart[split, n] = Σ_{m in the split} dy_mn (x_m·W_n + u_m·B_n) for the 128 columns of a block with a flagged
// column (every column of that block is written; dora_dmag_kernel reads the flagged ones). scale_dy: dy_c = g ⊙ dy
// in the flagged columns of the rows read.
template <typename T>
__global__ void __launch_bounds__(kTcThreads, 2)
dora_dmag_recompute_tc_kernel(const float* __restrict__ g, const T* __restrict__ bias,
                              const uint8_t* __restrict__ big_adapter, const T* dy, const T* __restrict__ x,
                              const T* __restrict__ W, const float* __restrict__ u, const void* __restrict__ B,
                              DType b_dt, float* __restrict__ rpart, T* scale_dy, int64_t rows_per_split, int64_t M,
                              int64_t K, int64_t N, int r) {
#if LK_TC_ARCH
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* ring = reinterpret_cast<T*>(lk_smem);
  __shared__ float gcol[kTcBN];
  __shared__ bool flag[kTcBN];
  __shared__ float halves[2][kTcBN];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t n0 = (int64_t)blockIdx.x * kTcBN;
  bool mine = false;
  if (tid < kTcBN) {
    const int64_t n = n0 + tid;
    mine = n < N && flagged_column(g, bias != nullptr ? to_f<T>(bias[n]) : 0.f, big_adapter, n);
    flag[tid] = mine;
    gcol[tid] = mine ? g[n] : 0.f;
  }
  if (!__syncthreads_or(mine)) return;
  const int64_t m_begin = (int64_t)blockIdx.y * rows_per_split, m_end = min64(M, m_begin + rows_per_split);
  const int k_tiles = (int)((K + kTcBK - 1) / kTcBK);
  const LaneOffsets lo;
  const int wm = warp / 4 * 64, wn = warp % 4 * 32;
  float sums[4][2] = {};  // this thread's columns wn + 8 ni + 2 t + e, over its rows of every tile

  for (int64_t m0 = m_begin; m0 < m_end; m0 += kTcBM) {
    // this thread's 16-byte pieces of a stage: column c of x's rows lr and lr + 64 and of W's rows lr and lr + 64
    const int lr = tid / 4, c = tid % 4 * 8;
    const T* xp = x + (m0 + lr) * K + c;
    const T* wp = W + (n0 + lr) * K + c;
    const int64_t step = 64 * K;
    const bool x0 = m0 + lr < m_end, x1 = m0 + lr + 64 < m_end, w0 = n0 + lr < N, w1 = n0 + lr + 64 < N;
    const uint32_t dst0 = smem_addr(ring + lr * kTcLds + c);
    auto load_stage = [&](int stage, int kt) {
      const int k0 = kt * kTcBK;
      const bool kin = k0 + c < K;
      const uint32_t d = dst0 + (uint32_t)(stage * kTcStageElems * 2);
      constexpr uint32_t kRows64 = 64 * kTcLds * 2;  // bytes of 64 rows of a stage
      cp_async16(d, x0 && kin ? xp + k0 : x, x0 && kin ? 16 : 0);
      cp_async16(d + kRows64, x1 && kin ? xp + step + k0 : x, x1 && kin ? 16 : 0);
      cp_async16(d + 2 * kRows64, w0 && kin ? wp + k0 : W, w0 && kin ? 16 : 0);
      cp_async16(d + 3 * kRows64, w1 && kin ? wp + step + k0 : W, w1 && kin ? 16 : 0);
    };
    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) zero_acc(acc[mi]);
#pragma unroll
    for (int s = 0; s < kTcStagesRc - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<kTcStagesRc - 2>();  // K-tile kt has landed (this thread's pieces) ...
      __syncthreads();                   // ... everyone's, and every warp is done with K-tile kt - 1's stage
      const int next = kt + kTcStagesRc - 1;
      if (next < k_tiles) load_stage(next % kTcStagesRc, next);
      cp_async_commit();
      const T* xs = ring + (kt % kTcStagesRc) * kTcStageElems;
      const T* ws = xs + kTcBM * kTcLds;
#pragma unroll
      for (int kk = 0; kk < kTcBK; kk += 16) {
        uint32_t a[4][4], b[2][4];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) ldsm4(a[mi], xs + (wm + 16 * mi + lo.r1) * kTcLds + kk + lo.c1);
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) ldsm4(b[nj], ws + (wn + 16 * nj + lo.r2) * kTcLds + kk + lo.c2);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
            mma16816<T>(acc[mi][ni], a[mi], b[ni / 2][2 * (ni % 2)], b[ni / 2][2 * (ni % 2) + 1]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is free: the epilogue stages u and B in it

    // z += u Bᵀ in float32, by chunks of 32 of r (u: M × r float32; B: N × r in b_dt), the same order of j as the
    // float32 kernel below
    float* us = reinterpret_cast<float*>(lk_smem);
    float* bs = us + kTcBM * kTcRcLd;
    for (int j0 = 0; j0 < r; j0 += kTcRc) {
      const int jn = min(kTcRc, r - j0);
      for (int i = tid; i < kTcBM * kTcRc; i += kTcThreads) {
        const int row = i / kTcRc, j = i % kTcRc;
        const int64_t m = m0 + row, n = n0 + row;
        us[row * kTcRcLd + j] = (j < jn && m < m_end) ? u[m * r + j0 + j] : 0.f;
        bs[row * kTcRcLd + j] = (j < jn && n < N) ? load_any(B, b_dt, n * r + j0 + j) : 0.f;
      }
      __syncthreads();
      for (int j = 0; j < jn; ++j) {
        float uv[4][2], bv[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) uv[mi][h] = us[(wm + 16 * mi + lo.g + 8 * h) * kTcRcLd + j];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) bv[ni][e] = bs[(wn + 8 * ni + 2 * lo.t + e) * kTcRcLd + j];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mi][ni][q] = fmaf(uv[mi][q / 2], bv[ni][q % 2], acc[mi][ni][q]);
      }
      __syncthreads();  // the chunk is read: the next chunk, or the next tile's ring, overwrites it
    }

    // Σ dy ⊙ z per column over the tile's rows; dy_c = g ⊙ dy in the flagged columns
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm + 16 * mi + lo.g + 8 * h;
        if (m >= m_end) continue;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = wn + 8 * ni + 2 * lo.t + e;
            const int64_t n = n0 + c;
            if (n >= N) continue;
            const float d = to_f<T>(dy[m * N + n]);
            sums[ni][e] = fmaf(d, acc[mi][ni][2 * h + e], sums[ni][e]);
            if (scale_dy != nullptr && flag[c]) scale_dy[m * N + n] = from_f<T>(d * gcol[c]);
          }
      }
  }

  // the column sums: over the 8 row lanes of each column (shuffles), then the two warps along M (fixed order)
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = sums[ni][e];
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lo.g == 0) halves[warp / 4][wn + 8 * ni + 2 * lo.t + e] = v;
    }
  __syncthreads();
  if (tid < kTcBN && n0 + tid < N) rpart[(int64_t)blockIdx.y * N + n0 + tid] = halves[0][tid] + halves[1][tid];
#else
  __trap();
#endif
}

// ---- The float32 recompute (float32 x; 16-bit x with misaligned rows or below sm_80) ----
// Tiling: a block owns 64 columns and the 64-row tiles of its split; each thread 8 rows × 4 columns of a 64 × 64 z
// tile in float32 FMA over K-tiles of 32 (x's and W's rows in shared memory, zero outside).
constexpr int kRcBM = 64, kRcBN = 64, kRcBK = 32, kRcThreads = 128;
constexpr int kRcLdz = kRcBN + 4;  // float32 row pitch of the z tile

template <typename T>
struct RcTile {  // 16-byte pieces: 8 elements of a 16-bit T, 4 of float32
  static constexpr int kVec = 16 / (int)sizeof(T);
  static constexpr int kLds = kRcBK + kVec;  // row pitch: a multiple of 16 bytes
};

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

// As dora_dmag_recompute_tc_kernel, for 64 columns per block.
template <typename T>
__global__ void __launch_bounds__(kRcThreads)
dora_dmag_recompute_kernel(const float* __restrict__ g, const T* __restrict__ bias,
                           const uint8_t* __restrict__ big_adapter, const T* dy, const T* __restrict__ x,
                           const T* __restrict__ W, const float* __restrict__ u, const void* __restrict__ B,
                           DType b_dt, float* __restrict__ rpart, T* scale_dy, int64_t rows_per_split, int64_t M,
                           int64_t K, int64_t N, int r) {
  constexpr int LDS = RcTile<T>::kLds;
  __shared__ __align__(16) T xs[kRcBM * LDS];
  __shared__ __align__(16) T ws[kRcBN * LDS];
  __shared__ float zs[kRcBM * kRcLdz];
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

// Rows per split of the recompute (both kernels): about two blocks per SM over the tensor-core kernel's 128-column
// blocks, whole 128-row tiles.
int64_t recompute_rows_per_split(int64_t M, int64_t N) {
  const int64_t blocks = ceil_div(N, kTcBN), tiles = ceil_div(M, kTcBM);
  const int64_t want = std::max<int64_t>(1, 2 * (int64_t)num_sms() / blocks);
  return ceil_div(tiles, std::min(want, tiles)) * kTcBM;
}

// The recompute's launch: the tensor-core kernel where it runs (16-bit x, sm_80+, its 80 KB of shared memory, K a
// multiple of 8 and 16-byte aligned rows), else the float32 one.
template <typename T>
cudaError_t launch_recompute(const float* g, const T* bias, const uint8_t* big_adapter, const T* dy, const T* x,
                             const T* W, const float* u, const void* B, DType b_dtype, float* rpart, T* scale_dy,
                             int64_t rsplits, int64_t M, int64_t K, int64_t N, int r, cudaStream_t stream) {
  const int64_t rows_per_split = recompute_rows_per_split(M, N);
  if constexpr (sizeof(T) == 2) {
    if (tc_supported() && kTcSmem <= smem_per_block() && K % 8 == 0 &&
        (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(W)) % 16 == 0)
      return launch_kernel(dora_dmag_recompute_tc_kernel<T>, dim3((unsigned)ceil_div(N, kTcBN), (unsigned)rsplits),
                           kTcThreads, kTcSmem, stream, g, bias, big_adapter, dy, x, W, u, B, b_dtype, rpart,
                           scale_dy, rows_per_split, M, K, N, r);
  }
  return launch_kernel(dora_dmag_recompute_kernel<T>, dim3((unsigned)ceil_div(N, kRcBN), (unsigned)rsplits),
                       kRcThreads, 0, stream, g, bias, big_adapter, dy, x, W, u, B, b_dtype, rpart, scale_dy,
                       rows_per_split, M, K, N, r);
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
      const cudaError_t e = launch_recompute<T>(g, static_cast<const T*>(bias), big_adapter, static_cast<const T*>(dy),
                                                static_cast<const T*>(x), static_cast<const T*>(W), u, B, b_dtype,
                                                rpart, static_cast<T*>(scale_dy), rsplits, M, K, N, r, stream);
      if (e != cudaSuccess) return e;
    }
    return launch_kernel(dora_dmag_kernel<T>, dim3((unsigned)ceil_div(N, kThreads)), kThreads, 0, stream, part,
                         splits, rpart, rsplits, g, norm, q, static_cast<const T*>(bias), big_adapter, dmag, m_dtype,
                         N);
  });
}

}  // namespace lora_kernels
