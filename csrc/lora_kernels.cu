// Fused LoRA kernels (see lora_kernels.cuh). No torch headers: compiles with plain nvcc.
//
// Design (the frozen GEMMs stay in cuBLAS): lora_expand_prefill writes y = u B^T + bias once, then cuBLAS runs
// y += x W^T with beta = 1 (it reads y in its epilogue, overlapped with its compute-bound main loop); the same
// for dx (lora_dx_prefill, then dx += dy W). Measured on H200 (bench/results/gemm_probe_h200.md): a Triton
// TMA/persistent main loop reached 0.74-0.86x of cuBLAS, so folding the rank-r step into our own main loop would
// lose far more than the prefill costs. Extra traffic per pass: one write of y (M*N) and one read of x (shrink).
//
// Two implementations of every rank-r kernel:
//  * 16-bit inputs (x dtype T = fp16 / bf16) on sm_80+: tensor cores, ldmatrix + mma.sync.m16n8k16 with fp32
//    accumulators (inline PTX; WMMA's fragment loads compiled to generic 32-bit loads here). Precision policy (the
//    Triton backend's): every mma operand is cast to T in shared memory first (fp32 adapters A / B, the fp32
//    buffers u and g), accumulation is fp32, outputs as documented. The kernels are memory-bound: each streams one
//    big operand (x or dy) or writes one big output (y or dx) once, with 16-byte accesses. The streamed input goes
//    through a 3-deep cp.async ring (two tiles in flight while the tensor cores work on the third); the small side
//    operands (A, B, u, g tiles) are register-prefetched a tile ahead into double-buffered shared memory, so each
//    streamed tile costs one block barrier. r is zero-padded to a multiple of 16 in shared memory; the kernels whose
//    accumulators grow with r (shrink, dy pass, dA) take r in chunks of at most 64 columns (grid.z), so r up to 256
//    costs extra passes over x / dy rather than registers.
//  * fp32 inputs (and 16-bit inputs on GPUs below sm_80): the FFMA kernels with fp32 shared memory (lora_*_kernel).
// The dropout mask is regenerated from philox.cuh identically in every kernel, so forward and backward see the same
// mask: one Philox call per 8-group x[m, k..k+7] (k a multiple of 8) in the tensor-core kernels, one per 4-group
// (half of an 8-group's words) in the FFMA kernels.
// Every reduction has a fixed order and each output element (or partial-buffer element) has one owner: no atomics.
#include "lora_kernels.cuh"
#include "philox.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

// bf16 mma.sync and cp.async need sm_80: a build for an older architecture compiles the tensor-core kernels to a
// trap, and the launchers never pick them there (tc_supported()).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LK_TC_ARCH 1
#else
#define LK_TC_ARCH 0
#endif

namespace lora_kernels {
namespace {

constexpr int kThreads = 256;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Four consecutive elements p[0..valid-1] (valid <= 4) -> fp32, zero-filled. One vector load (16 B for fp32,
// 8 B for 16-bit types) when all four are in range and the address is aligned; scalar loads otherwise.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int valid, float v[4]) {
  if (valid >= 4 && (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0) {
    if constexpr (sizeof(T) == 4) {
      const float4 t = *reinterpret_cast<const float4*>(p);
      v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
      union { uint2 u; T e[4]; } t;
      t.u = *reinterpret_cast<const uint2*>(p);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = to_f<T>(t.e[q]);
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = q < valid ? to_f<T>(p[q]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int valid, const float v[4]) {
  if (valid >= 4 && (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      union { uint2 u; T e[4]; } t;
#pragma unroll
      for (int q = 0; q < 4; ++q) t.e[q] = from_f<T>(v[q]);
      *reinterpret_cast<uint2*>(p) = t.u;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (q < valid) p[q] = from_f<T>(v[q]);
  }
}

// Loads the 4-group (m, k..k+3) of x (M, K) as fp32, applies the dropout mask (one Philox call), zero outside.
// A dropped element is multiplied by 0, as in the reference (x * keep): NaN and inf become NaN, not 0.
template <typename T>
__device__ __forceinline__ void load_x4_dropout(const T* __restrict__ x, int64_t M, int64_t K, int64_t m, int64_t k,
                                                float p, uint64_t seed, uint64_t offset, float v[4]) {
  if (m < M && k < K) {
    const int valid = (K - k < 4 ? (int)(K - k) : 4);
    load4<T>(x + m * K + k, valid, v);
    if (p > 0.f) {
      bool keep[4];
      dropout_keep4(seed, offset, m, K, k, p, keep);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = keep[q] ? v[q] : v[q] * 0.f;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = 0.f;
  }
}

// ===============================================================================================================
// FFMA kernels: the path for fp32 inputs (and for 16-bit inputs on GPUs below sm_80). fp32 shared memory.
// ---------------------------------------------------------------------------------------------------------------
// lora_shrink: u (M, r) = scale * (x * keep) A^T, scale = scaling / (1 - p). Block = SH_BM rows, loops over K in
// chunks of SH_KC; x chunk (with mask, one Philox call per 4 elements) and A chunk staged in shared memory.
constexpr int SH_BM = 32;
constexpr int SH_KC = 64;
constexpr int SH_MAXO = SH_BM * kMaxRank / kThreads;  // outputs per thread at r = 256

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_shrink_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ u_out, int64_t M, int64_t K,
                   int r, int64_t k_per_split, float scale, float p, uint64_t seed, uint64_t offset) {
  extern __shared__ float smem[];
  float* xs = smem;                  // [SH_BM][SH_KC]
  float* as = smem + SH_BM * SH_KC;  // [r][SH_KC + 1]
  const int tid = threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * SH_BM;
  const int nout = SH_BM * r;
  // K split s (blockIdx.y) owns columns [s * k_per_split, ...) and writes its own partial u_out[s] (M, r).
  const int64_t k_begin = (int64_t)blockIdx.y * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  float* u = u_out + (int64_t)blockIdx.y * M * r;
  float acc[SH_MAXO];
#pragma unroll
  for (int i = 0; i < SH_MAXO; ++i) acc[i] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += SH_KC) {
    for (int gi = tid; gi < SH_BM * (SH_KC / 4); gi += kThreads) {
      const int mm = gi / (SH_KC / 4), g4 = gi % (SH_KC / 4);
      float v[4];
      load_x4_dropout<T>(x, M, K, m0 + mm, k0 + 4 * g4, p, seed, offset, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) xs[mm * SH_KC + 4 * g4 + q] = v[q];
    }
    for (int i = tid; i < r * SH_KC; i += kThreads) {
      const int j = i / SH_KC, kk = i % SH_KC;
      const int64_t k = k0 + kk;
      as[j * (SH_KC + 1) + kk] = k < K ? to_f<TA>(A[(int64_t)j * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < SH_MAXO; ++i) {
      const int o = tid + i * kThreads;
      if (o < nout) {
        const float* xr = xs + (o / r) * SH_KC;
        const float* ar = as + (o % r) * (SH_KC + 1);
        float s = acc[i];
#pragma unroll 16
        for (int kk = 0; kk < SH_KC; ++kk) s = fmaf(xr[kk], ar[kk], s);
        acc[i] = s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < SH_MAXO; ++i) {
    const int o = tid + i * kThreads;
    if (o < nout) {
      const int64_t m = m0 + o / r;
      if (m < M) u[m * r + (o % r)] = acc[i] * scale;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lora_expand_prefill: y (M, N) = u (M, r) B^T + bias, written once (never read): cuBLAS then accumulates x W^T into
// it with beta = 1. Tile EX_BM x EX_BN, r in chunks of EX_RC through shared memory. Each thread owns 2 neighbouring
// columns of EX_BM / 8 rows: thread (mrow = tid / 32, c = tid % 32) covers columns n0 + 2c, n0 + 2c + 1 and rows
// mrow + 8 i.
constexpr int EX_BM = 32;
constexpr int EX_BN = 64;
constexpr int EX_RC = 32;

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
lora_expand_prefill_kernel(T* __restrict__ y, const float* __restrict__ u, const TB* __restrict__ B,
                           const T* __restrict__ bias, int64_t M, int64_t N, int r) {
  __shared__ float us[EX_BM][EX_RC + 1];
  __shared__ float bs[EX_BN][EX_RC + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * EX_BM;
  const int64_t n0 = (int64_t)blockIdx.y * EX_BN;
  const int c = tid % 32, mrow = tid / 32;  // 8 row phases
  float acc[EX_BM / 8][2];
#pragma unroll
  for (int i = 0; i < EX_BM / 8; ++i) acc[i][0] = acc[i][1] = 0.f;

  for (int r0 = 0; r0 < r; r0 += EX_RC) {
    for (int i = tid; i < EX_BM * EX_RC; i += kThreads) {
      const int mm = i / EX_RC, jj = i % EX_RC;
      const int64_t m = m0 + mm;
      us[mm][jj] = (m < M && r0 + jj < r) ? u[m * r + r0 + jj] : 0.f;
    }
    for (int i = tid; i < EX_BN * EX_RC; i += kThreads) {
      const int nn = i / EX_RC, jj = i % EX_RC;
      const int64_t n = n0 + nn;
      bs[nn][jj] = (n < N && r0 + jj < r) ? to_f<TB>(B[n * r + r0 + jj]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < EX_RC; ++jj) {
      const float b0 = bs[2 * c][jj], b1 = bs[2 * c + 1][jj];
#pragma unroll
      for (int i = 0; i < EX_BM / 8; ++i) {
        const float uv = us[mrow + 8 * i][jj];
        acc[i][0] = fmaf(uv, b0, acc[i][0]);
        acc[i][1] = fmaf(uv, b1, acc[i][1]);
      }
    }
    __syncthreads();
  }
  const int64_t n = n0 + 2 * c;
  float bias0 = 0.f, bias1 = 0.f;
  if (bias) {
    if (n < N) bias0 = to_f<T>(bias[n]);
    if (n + 1 < N) bias1 = to_f<T>(bias[n + 1]);
  }
#pragma unroll
  for (int i = 0; i < EX_BM / 8; ++i) {
    const int64_t m = m0 + mrow + 8 * i;
    if (m >= M) continue;
    T* yp = y + m * N + n;
    if (n + 1 < N) {
      yp[0] = from_f<T>(acc[i][0] + bias0);
      yp[1] = from_f<T>(acc[i][1] + bias1);
    } else if (n < N) {
      yp[0] = from_f<T>(acc[i][0] + bias0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dy_pass: one pass over dy. Block (s, c) walks its rows in sub-blocks of DP_BM and its columns in chunks of
// DP_BN: g_out[c][m, :] = sum over its columns dy[m, n] B[n, :] (registers, written once per row sub-block);
// dB_partial[s][n, :] = sum over its rows dy[m, n] u[m, :] (written by the first row sub-block, added to by the
// next ones; every element is owned by one block, so no atomics and a fixed order).
constexpr int DP_BM = 32;
constexpr int DP_BN = 32;
constexpr int DP_MAXO = DP_BM * kMaxRank / kThreads;  // = DP_BN * kMaxRank / kThreads
static_assert(DP_BM == DP_BN, "dy pass assumes square tiles for its per-thread output count");

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
lora_dy_pass_kernel(const T* __restrict__ dy, const TB* __restrict__ B, const float* __restrict__ u,
                    float* __restrict__ g_out, float* __restrict__ dB_partial, int64_t M, int64_t N, int r,
                    int64_t rows_per_split, int64_t cols_per_group) {
  extern __shared__ float smem[];
  float* dys = smem;                          // [DP_BM][DP_BN + 1]
  float* bs = dys + DP_BM * (DP_BN + 1);      // [DP_BN][r]
  float* us = bs + DP_BN * r;                 // [DP_BM][r]
  const int tid = threadIdx.x;
  const int64_t row_begin = (int64_t)blockIdx.x * rows_per_split;
  const int64_t row_end = min64(M, row_begin + rows_per_split);
  const int64_t col_begin = (int64_t)blockIdx.y * cols_per_group;
  const int64_t col_end = min64(N, col_begin + cols_per_group);
  float* g = g_out + (int64_t)blockIdx.y * M * r;
  float* dBp = dB_partial ? dB_partial + (int64_t)blockIdx.x * N * r : nullptr;
  const int nout = DP_BM * r;

  for (int64_t m0 = row_begin; m0 < row_end; m0 += DP_BM) {
    const bool first = (m0 == row_begin);
    if (dBp) {
      for (int i = tid; i < DP_BM * r; i += kThreads) {
        const int64_t m = m0 + i / r;
        us[i] = m < row_end ? u[m * r + (i % r)] : 0.f;
      }
    }
    float gacc[DP_MAXO];
#pragma unroll
    for (int i = 0; i < DP_MAXO; ++i) gacc[i] = 0.f;

    for (int64_t n0 = col_begin; n0 < col_end; n0 += DP_BN) {
      for (int i = tid; i < DP_BM * DP_BN; i += kThreads) {
        const int mm = i / DP_BN, nn = i % DP_BN;
        const int64_t m = m0 + mm, n = n0 + nn;
        dys[mm * (DP_BN + 1) + nn] = (m < row_end && n < col_end) ? to_f<T>(dy[m * N + n]) : 0.f;
      }
      for (int i = tid; i < DP_BN * r; i += kThreads) {
        const int64_t n = n0 + i / r;
        bs[i] = n < col_end ? to_f<TB>(B[n * r + (i % r)]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < DP_MAXO; ++i) {
        const int o = tid + i * kThreads;
        if (o < nout) {
          const int mm = o / r, j = o % r;
          float s = gacc[i];
#pragma unroll 8
          for (int nn = 0; nn < DP_BN; ++nn) s = fmaf(dys[mm * (DP_BN + 1) + nn], bs[nn * r + j], s);
          gacc[i] = s;
        }
      }
      if (dBp) {
#pragma unroll
        for (int i = 0; i < DP_MAXO; ++i) {
          const int o = tid + i * kThreads;
          if (o < nout) {
            const int nn = o / r, j = o % r;
            const int64_t n = n0 + nn;
            if (n < col_end) {
              float s = 0.f;
#pragma unroll 8
              for (int mm = 0; mm < DP_BM; ++mm) s = fmaf(dys[mm * (DP_BN + 1) + nn], us[mm * r + j], s);
              float* dst = dBp + n * r + j;
              *dst = first ? s : *dst + s;
            }
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < DP_MAXO; ++i) {
      const int o = tid + i * kThreads;
      if (o < nout) {
        const int64_t m = m0 + o / r;
        if (m < row_end) g[m * r + (o % r)] = gacc[i];
      }
    }
    __syncthreads();  // us is rewritten by the next row sub-block
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dA: dA_partial[s] (r, K) = sum over rows of s of g[m, :]^T (scale * keep * x[m, :]), scale = scaling/(1-p).
// Block (s, c) walks its rows in sub-blocks of DA_BM (g sub-block in shared memory) and its columns in chunks of
// DA_KC (x chunk with the mask regenerated, one Philox call per 4 elements). Outputs owned by one block: no atomics.
constexpr int DA_BM = 32;
constexpr int DA_KC = 32;
constexpr int DA_MAXO = DA_KC * kMaxRank / kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads)
lora_dA_kernel(const T* __restrict__ x, const float* __restrict__ g, float* __restrict__ dA_partial, int64_t M,
               int64_t K, int r, int64_t rows_per_split, int64_t cols_per_group, float scale, float p,
               uint64_t seed, uint64_t offset) {
  extern __shared__ float smem[];
  float* xs = smem;               // [DA_BM][DA_KC]
  float* gs = xs + DA_BM * DA_KC;  // [DA_BM][r]
  const int tid = threadIdx.x;
  const int64_t row_begin = (int64_t)blockIdx.x * rows_per_split;
  const int64_t row_end = min64(M, row_begin + rows_per_split);
  const int64_t col_begin = (int64_t)blockIdx.y * cols_per_group;
  const int64_t col_end = min64(K, col_begin + cols_per_group);
  float* dAp = dA_partial + (int64_t)blockIdx.x * r * K;
  const int nout = DA_KC * r;

  for (int64_t m0 = row_begin; m0 < row_end; m0 += DA_BM) {
    const bool first = (m0 == row_begin);
    for (int i = tid; i < DA_BM * r; i += kThreads) {
      const int64_t m = m0 + i / r;
      gs[i] = m < row_end ? g[m * r + (i % r)] : 0.f;
    }
    for (int64_t k0 = col_begin; k0 < col_end; k0 += DA_KC) {
      for (int gi = tid; gi < DA_BM * (DA_KC / 4); gi += kThreads) {
        const int mm = gi / (DA_KC / 4), g4 = gi % (DA_KC / 4);
        const int64_t m = m0 + mm;
        float v[4];
        load_x4_dropout<T>(x, m < row_end ? M : 0, K, m, k0 + 4 * g4, p, seed, offset, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) xs[mm * DA_KC + 4 * g4 + q] = v[q] * scale;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < DA_MAXO; ++i) {
        const int o = tid + i * kThreads;
        if (o < nout) {
          const int j = o / DA_KC, kk = o % DA_KC;
          const int64_t k = k0 + kk;
          if (k < col_end) {
            float s = 0.f;
#pragma unroll 8
            for (int mm = 0; mm < DA_BM; ++mm) s = fmaf(gs[mm * r + j], xs[mm * DA_KC + kk], s);
            float* dst = dAp + (int64_t)j * K + k;
            *dst = first ? s : *dst + s;
          }
        }
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
template <typename TO>
__global__ void __launch_bounds__(kThreads)
reduce_partials_kernel(const float* __restrict__ partial, int64_t S, int64_t count, TO* __restrict__ out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int64_t t = 0; t < S; ++t) s += partial[t * count + i];
    out[i] = from_f<TO>(s);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dx_prefill: dx (M, K) = scale * keep * (g A), scale = scaling / (1 - p), written once (never read): cuBLAS
// then accumulates dy W into it with beta = 1. Tile DX_BM x DX_KC; thread owns one 4-group (one Philox call,
// vector store when aligned); r in chunks of DX_RC through shared memory.
constexpr int DX_BM = 32;
constexpr int DX_KC = 32;
constexpr int DX_RC = 32;
static_assert(DX_BM * DX_KC / 4 == kThreads, "one 4-group per thread");

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_dx_prefill_kernel(T* __restrict__ dx, const float* __restrict__ g, const TA* __restrict__ A, int64_t M, int64_t K,
                   int r, float scale, float p, uint64_t seed, uint64_t offset) {
  __shared__ float gs[DX_BM][DX_RC + 1];
  __shared__ float as[DX_RC][DX_KC + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * DX_BM;
  const int64_t k0 = (int64_t)blockIdx.y * DX_KC;
  const int mm = tid / (DX_KC / 4), g4 = tid % (DX_KC / 4);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r0 = 0; r0 < r; r0 += DX_RC) {
    for (int i = tid; i < DX_BM * DX_RC; i += kThreads) {
      const int a = i / DX_RC, jj = i % DX_RC;
      const int64_t m = m0 + a;
      gs[a][jj] = (m < M && r0 + jj < r) ? g[m * r + r0 + jj] : 0.f;
    }
    for (int i = tid; i < DX_RC * DX_KC; i += kThreads) {
      const int jj = i / DX_KC, kk = i % DX_KC;
      const int64_t k = k0 + kk;
      as[jj][kk] = (r0 + jj < r && k < K) ? to_f<TA>(A[(int64_t)(r0 + jj) * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < DX_RC; ++jj) {
      const float gv = gs[mm][jj];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fmaf(gv, as[jj][4 * g4 + q], acc[q]);
    }
    __syncthreads();
  }
  const int64_t m = m0 + mm, k = k0 + 4 * g4;
  if (m >= M || k >= K) return;
  const int valid = (K - k < 4 ? (int)(K - k) : 4);
  bool keep[4] = {true, true, true, true};
  if (p > 0.f) dropout_keep4(seed, offset, m, K, k, p, keep);
  float v[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) v[q] = keep[q] ? acc[q] * scale : acc[q] * scale * 0.f;  // NaN/inf -> NaN
  store4<T>(dx + m * K + k, valid, v);
}

// ===============================================================================================================
// Tensor-core kernels (x dtype T = __half or __nv_bfloat16), sm_80+: ldmatrix + mma.sync.m16n8k16 (fp32
// accumulators) from shared-memory tiles of T, through inline PTX (the fragment layouts are then known, so the
// epilogues write straight from the accumulators). 256 threads = 8 warps per block.
// Shared-memory tiles of T have row pitches of (a multiple of 16) + 8 elements: rows stay 16-byte aligned and the
// 8 rows of every ldmatrix 8x8 matrix fall in distinct 16-byte bank groups (no conflicts).
// The streamed operand (x in shrink / dA, dy in dy_pass) goes through a kStages-deep cp.async ring: two tiles are
// in flight while the third is multiplied. The dropout mask is applied in place by the thread that copied the
// 8-group, after its copy landed (so the Philox work overlaps the loads of the next tiles).
constexpr int kTcThreads = 256;
constexpr int kStages = 3;
// Blocks per SM asked of the compiler (__launch_bounds__): the prefill kernels and the r-chunk 32/64 kernels need
// up to 128 registers per thread (2 blocks); the 16-column r-chunk streaming kernels fit 3 blocks without spills.
constexpr int kPrefillMinBlocks = 2;
constexpr int kStreamMinBlocks = 3;

__host__ __device__ constexpr int round16(int r) { return (r + 15) / 16 * 16; }

#if LK_TC_ARCH  // device helpers of the tensor-core kernels (their bodies are a trap below sm_80)
// Number of valid elements of a group of n whose first element is `left` elements before the end: clamp(left, 0, n).
__device__ __forceinline__ int n_valid(int64_t left, int n) { return left <= 0 ? 0 : (left >= n ? n : (int)left); }

template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T e[4]; };

// p[0..valid-1] raw (no conversion), zero-filled: one 8/16-byte load when all 4 are in range and p is aligned.
template <typename T>
__device__ __forceinline__ Vec4<T> ld4(const T* p, int valid) {
  if (valid >= 4 && (reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<T>)) == 0)
    return *reinterpret_cast<const Vec4<T>*>(p);
  Vec4<T> v;
#pragma unroll
  for (int q = 0; q < 4; ++q) v.e[q] = q < valid ? p[q] : from_f<T>(0.f);
  return v;
}

// 8 consecutive 16-bit elements as raw bits, zero-filled: one 16-byte load when in range and aligned, else two
// 8-byte halves (each vector or scalar).
template <typename T>
__device__ __forceinline__ uint4 ld8_raw(const T* p, int valid) {
  static_assert(sizeof(T) == 2, "16-bit element type");
  if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) % 16) == 0) return *reinterpret_cast<const uint4*>(p);
  union { Vec4<T> v; uint2 u; } lo, hi;
  lo.v = ld4<T>(p, valid);
  hi.v = ld4<T>(p + 4, valid - 4);
  return make_uint4(lo.u.x, lo.u.y, hi.u.x, hi.u.y);
}

// 4 values of TA cast to T (round to nearest), packed for one 8-byte shared-memory store.
template <typename T, typename TA>
__device__ __forceinline__ uint2 to_t4(const Vec4<TA>& v) {
  union { uint2 u; T e[4]; } t;
#pragma unroll
  for (int q = 0; q < 4; ++q) t.e[q] = from_f<T>(to_f<TA>(v.e[q]));
  return t.u;
}

// A dropped 16-bit element (raw bits of T) times 0, as the reference computes x * keep: +0 for a finite value,
// NaN for inf or NaN. (Used on x, and on dx's LoRA term already rounded to T: a finite term that overflowed T at a
// dropped element also becomes NaN; that term overflows at the kept elements too.)
template <typename T>
__device__ __forceinline__ unsigned short dropped16(unsigned short h) {
  constexpr unsigned short kExp = std::is_same<T, __half>::value ? 0x7C00 : 0x7F80;  // all-ones exponent: inf/NaN
  constexpr unsigned short kNaN = std::is_same<T, __half>::value ? 0x7E00 : 0x7FC0;
  return (h & kExp) == kExp ? kNaN : 0;
}

// Applies the dropout mask to the 8 elements x[m, k..k+7] of T (raw 16-bit bits; k a multiple of 4; elements at or
// past k_lim are zero already): dropped ones become dropped16(). With k a multiple of 8 (every tile of the
// tensor-core kernels) they are one 8-group of the mask: one Philox call. Same mask as load_x4_dropout.
template <typename T>
__device__ __forceinline__ uint4 dropout8(uint4 raw, int64_t m, int64_t K, int64_t k, int64_t k_lim, float p,
                                          uint64_t seed, uint64_t offset) {
  union { uint4 u; unsigned short h[8]; } t;
  t.u = raw;
  if (k >= k_lim) return raw;
  if (k % kDropoutGroup == 0) {
    bool keep[8];
    dropout_keep8(seed, dropout_counter(offset, m, K, k / kDropoutGroup), dropout_threshold(p), keep);
#pragma unroll
    for (int q = 0; q < 8; ++q)
      if (!keep[q]) t.h[q] = dropped16<T>(t.h[q]);
    return t.u;
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {  // straddles two 8-groups: one Philox call per 4-group in range
    if (k + 4 * half < k_lim) {
      bool keep[4];
      dropout_keep4(seed, offset, m, K, k + 4 * half, p, keep);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (!keep[q]) t.h[4 * half + q] = dropped16<T>(t.h[4 * half + q]);
    }
  }
  return t.u;
}

// Raw 16-bit bits of the 8-group p[0..valid-1] (zero-filled) stored at p (8 elements, 2-byte aligned): one 16-byte
// store when all 8 are in range and p is aligned.
template <typename T>
__device__ __forceinline__ void st8_raw(T* p, int valid, uint4 v) {
  if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) % 16) == 0) {
    *reinterpret_cast<uint4*>(p) = v;
    return;
  }
  union { uint4 u; unsigned short h[8]; } t;
  t.u = v;
  unsigned short* q = reinterpret_cast<unsigned short*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < valid) q[i] = t.h[i];
}

// Two fp32 values to p[0..valid-1] (valid may be <= 0): one 8-byte store when both are in range and p is aligned.
__device__ __forceinline__ void st2f(float* p, int64_t left, float v0, float v1) {
  if (left >= 2 && (reinterpret_cast<uintptr_t>(p) % 8) == 0) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else if (left >= 1) {
    p[0] = v0;
    if (left >= 2) p[1] = v1;
  }
}

// Two fp32 values rounded to T, packed (lower address first) for one 4-byte store.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float v0, float v1) {
  union { uint32_t u; T e[2]; } t;
  t.e[0] = from_f<T>(v0);
  t.e[1] = from_f<T>(v1);
  return t.u;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix x4: lane l gives the address of row l % 8 of the 8x8 matrix l / 8; r[i] gets matrix i's fragment
// (row lane / 4, columns 2 * (lane % 4) and +1), or of its transpose with .trans.
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
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

// The two ldmatrix.x4 address patterns (element row / column offsets of this lane inside a 16 x 16 block):
//  P1 (row lane % 16, column 8 * (lane / 16)): the A operand of a row-major [m][k] tile (ldsm4), and the two
//     8-column B fragments of a [k][n] tile (ldsm4_t): r[0], r[1] = columns 0-7, r[2], r[3] = columns 8-15.
//  P2 (row lane % 8 + 8 * (lane / 16), column 8 * (lane / 8 % 2)): the A operand of a [k][m] tile (A^T,
//     ldsm4_t), and the two 8-column B fragments of an [n][k] tile (B^T stored, ldsm4).
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
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's cp.async groups are pending; a memory clobber, since the thread then
// reads the landed data itself (dropout in place) before the next barrier.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies the 16-bit 8-group src[0..valid-1] (zero-filled) to the 16-byte aligned shared dst: cp.async when src is
// 16-byte aligned (a partial group is zero-filled by the copy), synchronous loads otherwise.
template <typename T>
__device__ __forceinline__ void copy8_async(T* dst, const T* src, int valid) {
  if (valid > 0 && (reinterpret_cast<uintptr_t>(src) % 16) == 0)
    cp_async16(smem_addr(dst), src, 2 * valid);
  else
    *reinterpret_cast<uint4*>(dst) = ld8_raw<T>(src, valid);
}

// Block-wide copy of a rows x (4 * cols4) tile of TS (row stride lds; rows >= rows_valid and columns >= cols_valid
// read as zeros) into shared memory as T (row pitch ldd). The loads of kBatch 4-groups per thread are all issued
// before their results are stored, so their latencies overlap.
template <typename T, typename TS>
__device__ __forceinline__ void load_tile_as_t(T* dst, int ldd, const TS* src, int64_t lds, int rows, int cols4,
                                               int64_t rows_valid, int cols_valid) {
  constexpr int kBatch = 8;
  const int total = rows * cols4;
  for (int base = threadIdx.x; base < total; base += kTcThreads * kBatch) {
    Vec4<TS> v[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int gi = base + q * kTcThreads, rr = gi / cols4, c = gi % cols4 * 4;
      if (gi < total) v[q] = ld4<TS>(src + rr * lds + c, rr < rows_valid ? n_valid(cols_valid - c, 4) : 0);
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int gi = base + q * kTcThreads, rr = gi / cols4, c = gi % cols4 * 4;
      if (gi < total) *reinterpret_cast<uint2*>(dst + rr * ldd + c) = to_t4<T, TS>(v[q]);
    }
  }
}

#endif  // LK_TC_ARCH

// ---------------------------------------------------------------------------------------------------------------
// lora_shrink (tensor cores).
// Math   : u[c] (M, r) = scale * (keep * x)[:, K-split c] A^T[K-split c], scale = scaling / (1 - p).
// Tiling : block = TS_BM (128) rows x RC = 16*NF (<= 64) columns of u (grid.z walks r in RC-chunks) x one K split
//          (grid.y), looping over K in TS_KC (64)-column tiles: x tiles through the cp.async ring (mask applied
//          in place, one Philox call per 8-group), the A tile (cast to T) register-prefetched two tiles ahead into
//          a double buffer. Warp w: rows 16w..16w+15 x all RC columns (2*NF m16n8 fp32 accumulators), written
//          once at the end (scaled).
// Bytes  : one read of x (M*K*2) per r-chunk; A re-read from L2 once per 128 rows; u (M*r*4) written once per
//          K split (launch_reduce_partials sums the splits).
// Smem   : (3 * 128 + 2 * RC) * 72 * 2 B = 59.9 / 64.5 / 73.7 KB for NF = 1 / 2 / 4.
constexpr int TS_BM = 128;
constexpr int TS_KC = 64;
constexpr int TS_LD = TS_KC + 8;

size_t shrink_tc_smem(int nf) { return (size_t)(kStages * TS_BM + 2 * 16 * nf) * TS_LD * 2; }

template <typename T, typename TA, int NF>
__global__ void __launch_bounds__(kTcThreads, NF == 1 ? kStreamMinBlocks : 2)
lora_shrink_tc_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ u_out, int64_t M,
                      int64_t K, int r, int64_t k_per_split, float scale, float p, uint64_t seed, uint64_t offset) {
#if LK_TC_ARCH
  constexpr int RC = 16 * NF;
  constexpr int XG = TS_BM * TS_KC / 8 / kTcThreads;  // 8-groups of x per thread and tile (4)
  constexpr int AG = RC * TS_KC / 4 / kTcThreads;     // 4-groups of A per thread and tile (NF)
  static_assert(TS_BM == 16 * (kTcThreads / 32), "one 16-row strip per warp");
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* xs = reinterpret_cast<T*>(lk_smem);  // [kStages][TS_BM][TS_LD]: x tiles (A operand, row-major)
  T* as = xs + kStages * TS_BM * TS_LD;   // [2][RC][TS_LD]: A rows j0.. (B operand stored [n][k]), double-buffered
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t m0 = (int64_t)blockIdx.x * TS_BM;
  const int64_t k_begin = (int64_t)blockIdx.y * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  const int j0 = blockIdx.z * RC;
  float* u = u_out + (int64_t)blockIdx.y * M * r;
  const int64_t n_tiles = k_end > k_begin ? (k_end - k_begin + TS_KC - 1) / TS_KC : 0;

  // Full tiles of 16-byte aligned rows take the fast paths (no per-group bounds / alignment checks).
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && K % 8 == 0 && k_begin % 8 == 0;
  const bool a_vec = reinterpret_cast<uintptr_t>(A) % sizeof(Vec4<TA>) == 0 && K % 4 == 0 && k_begin % 4 == 0;
  const bool rows_full = m0 + TS_BM <= M;
  auto issue = [&](int64_t t) {  // cp.async of x tile t into its ring slot
    const int64_t k0 = k_begin + t * TS_KC;
    T* slot = xs + (int)(t % kStages) * TS_BM * TS_LD;
    if (x_vec && rows_full && k0 + TS_KC <= k_end) {
#pragma unroll
      for (int i = 0; i < XG; ++i) {
        const int gi = tid + i * kTcThreads, mm = gi / (TS_KC / 8), c = gi % (TS_KC / 8) * 8;
        cp_async16(smem_addr(slot + mm * TS_LD + c), x + (m0 + mm) * K + k0 + c, 16);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < XG; ++i) {
      const int gi = tid + i * kTcThreads, mm = gi / (TS_KC / 8), c = gi % (TS_KC / 8) * 8;
      const int64_t m = m0 + mm, k = k0 + c;
      copy8_async<T>(slot + mm * TS_LD + c, x + m * K + k, m < M ? n_valid(k_end - k, 8) : 0);
    }
  };
  Vec4<TA> ar[AG];
  auto fetch_a = [&](int64_t t) {  // A tile t into registers
    const int64_t k0 = k_begin + t * TS_KC;
    if (a_vec && j0 + RC <= r && k0 + TS_KC <= k_end) {
#pragma unroll
      for (int i = 0; i < AG; ++i) {
        const int gi = tid + i * kTcThreads, jj = gi / (TS_KC / 4), c = gi % (TS_KC / 4) * 4;
        ar[i] = *reinterpret_cast<const Vec4<TA>*>(A + (int64_t)(j0 + jj) * K + k0 + c);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < AG; ++i) {
      const int gi = tid + i * kTcThreads, jj = gi / (TS_KC / 4), c = gi % (TS_KC / 4) * 4;
      ar[i] = ld4<TA>(A + (int64_t)(j0 + jj) * K + k0 + c, j0 + jj < r ? n_valid(k_end - k0 - c, 4) : 0);
    }
  };

  auto stash_a = [&](int64_t t) {  // registers -> as buffer t % 2 (cast to T)
    T* ab = as + (int)(t % 2) * RC * TS_LD;
#pragma unroll
    for (int i = 0; i < AG; ++i) {
      const int gi = tid + i * kTcThreads, jj = gi / (TS_KC / 4), c = gi % (TS_KC / 4) * 4;
      *reinterpret_cast<uint2*>(ab + jj * TS_LD + c) = to_t4<T, TA>(ar[i]);
    }
  };

  float acc[2 * NF][4];
#pragma unroll
  for (int n = 0; n < 2 * NF; ++n)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;
  if (n_tiles > 0) issue(0);
  cp_async_commit();
  if (n_tiles > 1) issue(1);
  cp_async_commit();
  if (n_tiles > 0) {
    fetch_a(0);
    stash_a(0);
  }
  if (n_tiles > 1) fetch_a(1);
  // Per tile t: wait for x tile t (own copies), mask it in place, one barrier (tile t and A buffer t % 2 complete;
  // tile t-1's reads done), refill the freed ring slot, multiply, then stage A tile t+1 into the other buffer.
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t k0 = k_begin + t * TS_KC;
    const T* slot = xs + (int)(t % kStages) * TS_BM * TS_LD;
    const T* ab = as + (int)(t % 2) * RC * TS_LD;
    cp_async_wait<kStages - 2>();
    if (p > 0.f) {
#pragma unroll
      for (int i = 0; i < XG; ++i) {
        const int gi = tid + i * kTcThreads, mm = gi / (TS_KC / 8), c = gi % (TS_KC / 8) * 8;
        const int64_t m = m0 + mm;
        uint4* q = reinterpret_cast<uint4*>(xs + (int)(t % kStages) * TS_BM * TS_LD + mm * TS_LD + c);
        if (m < M) *q = dropout8<T>(*q, m, K, k0 + c, k_end, p, seed, offset);
      }
    }
    __syncthreads();
    if (t + kStages - 1 < n_tiles) issue(t + kStages - 1);
    cp_async_commit();
#pragma unroll
    for (int ks = 0; ks < TS_KC / 16; ++ks) {
      uint32_t a[4];
      ldsm4(a, slot + (16 * warp + lo.r1) * TS_LD + 16 * ks + lo.c1);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        uint32_t b[4];
        ldsm4(b, ab + (16 * f + lo.r2) * TS_LD + 16 * ks + lo.c2);
        mma16816<T>(acc[2 * f], a, b[0], b[1]);
        mma16816<T>(acc[2 * f + 1], a, b[2], b[3]);
      }
    }
    if (t + 1 < n_tiles) {
      stash_a(t + 1);
      if (t + 2 < n_tiles) fetch_a(t + 2);
    }
  }
#pragma unroll
  for (int n = 0; n < 2 * NF; ++n) {
    const int j = j0 + 8 * n + 2 * lo.t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + 16 * warp + lo.g + 8 * h;
      if (m < M) st2f(u + m * r + j, r - j, acc[n][2 * h] * scale, acc[n][2 * h + 1] * scale);
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Output-writing kernels (expand / dx prefill) share this shape: block = 128 rows x a group of 64-column chunks
// (grid.y); the 128 x r left operand (u or g, fp32 -> T) stays in shared memory; each chunk's right operand (B^T or
// A, -> T) is register-prefetched two chunks ahead into a double buffer (the first kPrefetch 4-groups per thread,
// i.e. all of it for r <= 64; the rest is loaded when staged). Warp w computes rows 16w..16w+15 x 64 columns
// (8 m16n8 fp32 accumulators) over r in 16-steps, rounds them to T into its 16 rows of an output staging tile, and
// writes those rows out with 16-byte stores (each lane 4 x 16 B; a warp covers 4 full 128-byte row segments per
// store). One block barrier per chunk.
constexpr int TO_BM = 128;
constexpr int TO_BN = 64;
constexpr int TO_LDO = TO_BN + 8;
[[maybe_unused]] constexpr int kPrefetch = 4;  // (unused where the tensor-core kernels compile to traps)

// Shared memory of the two prefill kernels: left operand tile + right operand chunk + output staging tile.
size_t expand_tc_smem(int rp) {  // us [128][rp+8], bs [2][64][rp+8], os
  return (size_t)TO_BM * (rp + 8) * 2 + (size_t)2 * TO_BN * (rp + 8) * 2 + (size_t)TO_BM * TO_LDO * 2;
}
size_t dx_tc_smem(int rp) {  // gs [128][rp+8], as [2][rp][72], os
  return (size_t)TO_BM * (rp + 8) * 2 + (size_t)2 * rp * (TO_BN + 8) * 2 + (size_t)TO_BM * TO_LDO * 2;
}

// lora_expand_prefill (tensor cores).
// Math   : y (M, N) = u (M, r) B^T + bias; u and B cast to T, fp32 accumulation, bias added in fp32, y rounded
//          once and written once (never read).
// Tiling : see above; B chunk stored [n][j] (B^T as a col-major operand).
// Bytes  : one write of y (M*N*2); u read once per column group, B once per 128 rows (L2).
// Smem   : 256 * (RP + 8) * 2 + 18 KB (RP = r padded to 16) = 30.7 KB at r = 16, 55.3 KB at r = 64.
template <typename T, typename TB>
__global__ void __launch_bounds__(kTcThreads, kPrefillMinBlocks)
lora_expand_prefill_tc_kernel(T* __restrict__ y, const float* __restrict__ u, const TB* __restrict__ B,
                              const T* __restrict__ bias, int64_t M, int64_t N, int r, int64_t chunks_per_group) {
#if LK_TC_ARCH
  static_assert(TO_BM == 16 * (kTcThreads / 32), "one 16-row strip per warp");
  const int RP = round16(r), LDK = RP + 8, g4 = RP / 4, nb4 = TO_BN * g4;
  const int npre = min(nb4, kPrefetch * kTcThreads / g4 * g4);  // register-prefetched 4-groups: whole rows
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* us = reinterpret_cast<T*>(lk_smem);  // [TO_BM][LDK]: u rows (A operand, row-major)
  T* bs = us + TO_BM * LDK;               // [2][TO_BN][LDK]: B rows n (B operand stored [n][k]), per chunk
  T* os = bs + 2 * TO_BN * LDK;           // [TO_BM][TO_LDO]: output staging
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t m0 = (int64_t)blockIdx.x * TO_BM;
  const int64_t n_chunks = (N + TO_BN - 1) / TO_BN;
  const int64_t c_begin = (int64_t)blockIdx.y * chunks_per_group;
  const int64_t c_end = min64(n_chunks, c_begin + chunks_per_group);

  load_tile_as_t<T, float>(us, LDK, u + m0 * r, r, TO_BM, g4, M - m0, r);
  int pre_row[kPrefetch], pre_col[kPrefetch];  // this thread's prefetched 4-groups: chunk row, column
#pragma unroll
  for (int i = 0; i < kPrefetch; ++i) {
    pre_row[i] = (tid + i * kTcThreads) / g4;
    pre_col[i] = (tid + i * kTcThreads) % g4 * 4;
  }
  // Full, aligned chunks take the fast paths (no per-group bounds / alignment checks).
  const bool b_vec = reinterpret_cast<uintptr_t>(B) % sizeof(Vec4<TB>) == 0 && r == RP;  // no padding columns
  const bool y_vec = reinterpret_cast<uintptr_t>(y) % 16 == 0 && N % 8 == 0 && m0 + TO_BM <= M;
  const bool bias_vec = bias != nullptr && reinterpret_cast<uintptr_t>(bias) % 4 == 0;
  Vec4<TB> br[kPrefetch];
  auto fetch_b = [&](int64_t ch) {
    const int64_t n0 = ch * TO_BN;
    const bool full = b_vec && n0 + TO_BN <= N;
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (tid + i * kTcThreads >= npre) break;
      const TB* src = B + (n0 + pre_row[i]) * r + pre_col[i];
      br[i] = full ? *reinterpret_cast<const Vec4<TB>*>(src)
                   : ld4<TB>(src, n0 + pre_row[i] < N ? n_valid(r - pre_col[i], 4) : 0);
    }
  };
  auto stash_b = [&](int64_t ch) {  // chunk ch's B -> bs buffer (ch - c_begin) % 2 (prefetched part from registers)
    T* bb = bs + (int)((ch - c_begin) % 2) * TO_BN * LDK;
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (tid + i * kTcThreads >= npre) break;
      *reinterpret_cast<uint2*>(bb + pre_row[i] * LDK + pre_col[i]) = to_t4<T, TB>(br[i]);
    }
    if (nb4 > npre) {  // r > 64: the rest of the chunk
      const int row1 = npre / g4;
      load_tile_as_t<T, TB>(bb + row1 * LDK, LDK, B + (ch * TO_BN + row1) * r, r, TO_BN - row1, g4,
                            N - (ch * TO_BN + row1), r);
    }
  };
  if (c_begin < c_end) {
    fetch_b(c_begin);
    stash_b(c_begin);
    if (c_begin + 1 < c_end) fetch_b(c_begin + 1);
  }
  // Per chunk: one barrier (B chunk and u tile complete; every warp is done with the previous chunk), multiply
  // into the warp's 16 rows of the staging tile, write them out (warp-local), stage the next B chunk into the
  // other buffer.
  for (int64_t ch = c_begin; ch < c_end; ++ch) {
    const int64_t n0 = ch * TO_BN;
    const T* bb = bs + (int)((ch - c_begin) % 2) * TO_BN * LDK;
    __syncthreads();
    float acc[TO_BN / 8][4];
#pragma unroll
    for (int n = 0; n < TO_BN / 8; ++n)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;
#pragma unroll 2
    for (int ks = 0; ks < RP / 16; ++ks) {
      uint32_t a[4];
      ldsm4(a, us + (16 * warp + lo.r1) * LDK + 16 * ks + lo.c1);
#pragma unroll
      for (int f = 0; f < TO_BN / 16; ++f) {
        uint32_t b[4];
        ldsm4(b, bb + (16 * f + lo.r2) * LDK + 16 * ks + lo.c2);
        mma16816<T>(acc[2 * f], a, b[0], b[1]);
        mma16816<T>(acc[2 * f + 1], a, b[2], b[3]);
      }
    }
    const bool chunk_full = n0 + TO_BN <= N;
#pragma unroll
    for (int n = 0; n < TO_BN / 8; ++n) {
      const int col = 8 * n + 2 * lo.t;
      float b0 = 0.f, b1 = 0.f;
      if (bias_vec && chunk_full) {
        union { uint32_t u; T e[2]; } bb;
        bb.u = *reinterpret_cast<const uint32_t*>(bias + n0 + col);
        b0 = to_f<T>(bb.e[0]);
        b1 = to_f<T>(bb.e[1]);
      } else if (bias) {
        if (n0 + col < N) b0 = to_f<T>(bias[n0 + col]);
        if (n0 + col + 1 < N) b1 = to_f<T>(bias[n0 + col + 1]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(os + (16 * warp + lo.g + 8 * h) * TO_LDO + col) =
            pack2<T>(acc[n][2 * h] + b0, acc[n][2 * h + 1] + b1);
    }
    __syncwarp();  // each warp writes out its own 16 staged rows: 4 x 16-byte row segments per lane
    if (y_vec && chunk_full) {
#pragma unroll
      for (int i = 0; i < 16 * TO_BN / 8 / 32; ++i) {
        const int gi = (tid & 31) + 32 * i, mm = 16 * warp + gi / (TO_BN / 8), c = gi % (TO_BN / 8) * 8;
        *reinterpret_cast<uint4*>(y + (m0 + mm) * N + n0 + c) = *reinterpret_cast<const uint4*>(os + mm * TO_LDO + c);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16 * TO_BN / 8 / 32; ++i) {
        const int gi = (tid & 31) + 32 * i, mm = 16 * warp + gi / (TO_BN / 8), c = gi % (TO_BN / 8) * 8;
        const int64_t m = m0 + mm, n = n0 + c;
        if (m < M && n < N)
          st8_raw<T>(y + m * N + n, n_valid(N - n, 8), *reinterpret_cast<const uint4*>(os + mm * TO_LDO + c));
      }
    }
    if (ch + 1 < c_end) {
      stash_b(ch + 1);
      if (ch + 2 < c_end) fetch_b(ch + 2);
    }
  }
#else
  __trap();
#endif
}

// lora_dx_prefill (tensor cores).
// Math   : dx (M, K) = scale * keep * (g A), scale = scaling / (1 - p); g and A cast to T, fp32 accumulation,
//          round(acc * scale) then the dropped elements zeroed (one Philox call per 8-group); written once.
// Tiling : see above; A chunk stored [j][k] (row-major B operand).
// Bytes  : one write of dx (M*K*2); g read once per column group, A once per 128 rows (L2).
// Smem   : 128 * (RP + 8) * 2 + 2 * RP * 72 * 2 + 18 KB = 29.2 KB at r = 16, 55.3 KB at r = 64.
template <typename T, typename TA>
__global__ void __launch_bounds__(kTcThreads, kPrefillMinBlocks)
lora_dx_prefill_tc_kernel(T* __restrict__ dx, const float* __restrict__ g, const TA* __restrict__ A, int64_t M,
                          int64_t K, int r, int64_t chunks_per_group, float scale, float p, uint64_t seed,
                          uint64_t offset) {
#if LK_TC_ARCH
  static_assert(TO_BM == 16 * (kTcThreads / 32), "one 16-row strip per warp");
  constexpr int LDA = TO_BN + 8;
  const int RP = round16(r), LDG = RP + 8, g4 = RP / 4, na4 = RP * (TO_BN / 4);
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* gs = reinterpret_cast<T*>(lk_smem);  // [TO_BM][LDG]: g rows (A operand, row-major)
  T* as = gs + TO_BM * LDG;               // [2][RP][LDA]: A chunk (B operand stored [k][n]), per chunk
  T* os = as + 2 * RP * LDA;              // [TO_BM][TO_LDO]: output staging
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t m0 = (int64_t)blockIdx.x * TO_BM;
  const int64_t n_chunks = (K + TO_BN - 1) / TO_BN;
  const int64_t c_begin = (int64_t)blockIdx.y * chunks_per_group;
  const int64_t c_end = min64(n_chunks, c_begin + chunks_per_group);

  load_tile_as_t<T, float>(gs, LDG, g + m0 * r, r, TO_BM, g4, M - m0, r);
  auto load_a = [&](int64_t k0, int gi) {
    const int j = gi / (TO_BN / 4), c = gi % (TO_BN / 4) * 4;
    const int64_t k = k0 + c;
    return ld4<TA>(A + (int64_t)j * K + k, j < r ? n_valid(K - k, 4) : 0);
  };
  // Full, aligned chunks take the fast paths (no per-group bounds / alignment checks).
  const bool a_vec = reinterpret_cast<uintptr_t>(A) % sizeof(Vec4<TA>) == 0 && K % 4 == 0;
  const bool dx_vec = reinterpret_cast<uintptr_t>(dx) % 16 == 0 && K % 8 == 0 && m0 + TO_BM <= M;
  Vec4<TA> ar[kPrefetch];
  auto fetch_a = [&](int64_t ch) {
    const int64_t k0 = ch * TO_BN;
    if (a_vec && k0 + TO_BN <= K) {
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        const int gi = tid + i * kTcThreads, j = gi / (TO_BN / 4), c = gi % (TO_BN / 4) * 4;
        if (gi < na4) ar[i] = j < r ? *reinterpret_cast<const Vec4<TA>*>(A + (int64_t)j * K + k0 + c) : ld4<TA>(A, 0);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i)
      if (tid + i * kTcThreads < na4) ar[i] = load_a(k0, tid + i * kTcThreads);
  };
  auto stash_a = [&](int64_t ch) {  // chunk ch's A -> as buffer (ch - c_begin) % 2 (prefetched part from registers)
    T* ab = as + (int)((ch - c_begin) % 2) * RP * LDA;
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      const int gi = tid + i * kTcThreads;
      if (gi < na4) *reinterpret_cast<uint2*>(ab + gi / (TO_BN / 4) * LDA + gi % (TO_BN / 4) * 4) = to_t4<T, TA>(ar[i]);
    }
    if (na4 > kPrefetch * kTcThreads) {  // r > 64: A rows 64.. of the chunk
      const int row1 = kPrefetch * kTcThreads / (TO_BN / 4);
      load_tile_as_t<T, TA>(ab + row1 * LDA, LDA, A + (int64_t)row1 * K + ch * TO_BN, K, RP - row1, TO_BN / 4,
                            r - row1, (int)min64(K - ch * TO_BN, TO_BN));
    }
  };
  if (c_begin < c_end) {
    fetch_a(c_begin);
    stash_a(c_begin);
    if (c_begin + 1 < c_end) fetch_a(c_begin + 1);
  }
  for (int64_t ch = c_begin; ch < c_end; ++ch) {  // same pipeline as lora_expand_prefill_tc_kernel
    const int64_t k0 = ch * TO_BN;
    const T* ab = as + (int)((ch - c_begin) % 2) * RP * LDA;
    __syncthreads();
    float acc[TO_BN / 8][4];
#pragma unroll
    for (int n = 0; n < TO_BN / 8; ++n)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;
#pragma unroll 2
    for (int ks = 0; ks < RP / 16; ++ks) {
      uint32_t a[4];
      ldsm4(a, gs + (16 * warp + lo.r1) * LDG + 16 * ks + lo.c1);
#pragma unroll
      for (int f = 0; f < TO_BN / 16; ++f) {
        uint32_t b[4];
        ldsm4_t(b, ab + (16 * ks + lo.r1) * LDA + 16 * f + lo.c1);
        mma16816<T>(acc[2 * f], a, b[0], b[1]);
        mma16816<T>(acc[2 * f + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int n = 0; n < TO_BN / 8; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(os + (16 * warp + lo.g + 8 * h) * TO_LDO + 8 * n + 2 * lo.t) =
            pack2<T>(acc[n][2 * h] * scale, acc[n][2 * h + 1] * scale);
    __syncwarp();  // each warp writes out its own 16 staged rows
    if (dx_vec && k0 + TO_BN <= K) {
#pragma unroll
      for (int i = 0; i < 16 * TO_BN / 8 / 32; ++i) {
        const int gi = (tid & 31) + 32 * i, mm = 16 * warp + gi / (TO_BN / 8), c = gi % (TO_BN / 8) * 8;
        uint4 v = *reinterpret_cast<const uint4*>(os + mm * TO_LDO + c);
        if (p > 0.f) v = dropout8<T>(v, m0 + mm, K, k0 + c, K, p, seed, offset);
        *reinterpret_cast<uint4*>(dx + (m0 + mm) * K + k0 + c) = v;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16 * TO_BN / 8 / 32; ++i) {
        const int gi = (tid & 31) + 32 * i, mm = 16 * warp + gi / (TO_BN / 8), c = gi % (TO_BN / 8) * 8;
        const int64_t m = m0 + mm, k = k0 + c;
        if (m < M && k < K) {
          uint4 v = *reinterpret_cast<const uint4*>(os + mm * TO_LDO + c);
          if (p > 0.f) v = dropout8<T>(v, m, K, k, K, p, seed, offset);
          st8_raw<T>(dx + m * K + k, n_valid(K - k, 8), v);
        }
      }
    }
    if (ch + 1 < c_end) {
      stash_a(ch + 1);
      if (ch + 2 < c_end) fetch_a(ch + 2);
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dy_pass (tensor cores): g and the dB partials from one read of dy.
// Math   : g_out[c][m, j] = sum over the columns n of group c of dy[m, n] B[n, j]        (g = dy B)
//          dB_partial[s][n, j] = sum over the rows m of split s of dy[m, n] u[m, j]      (dB = dy^T u)
//          for j in the block's r-chunk (RC = 16*NJ <= 64 columns, grid.z); dy, B, u as T, fp32 accumulation.
// Tiling : block (s, c, z) walks its rows in TD_BM (128)-row tiles (outer) and its columns in TD_BN (64)-column
//          chunks (inner); each 128 x 64 dy tile arrives through the cp.async ring and is used twice:
//            warps 0-3: g  += dy_tile x B_chunk; warp w owns rows 32w..32w+31 x RC in registers across the
//                       chunks of a row tile, written once per row tile;
//            warps 4-7: dB += dy_tile^T x u_tile (the same tile read transposed by ldmatrix.trans); warp 4+q owns
//                       columns 16q..16q+15 of the chunk. The fp32 dB accumulators of the block's whole column
//                       group live in shared memory (dBs), updated once per tile by their owning warp (fixed
//                       order), and are written once to the block's own partial at the end. No atomics.
//          The B chunk (-> T) is register-prefetched two tiles ahead into a double buffer; the u tile (128 x RC,
//          -> T, double-buffered) is loaded at the end of each row tile's last chunk for the next row tile.
// Bytes  : one read of dy (M*N*2) per r-chunk; partial writes row_splits*N*r*4 (+ col_groups*M*r*4 if > 1 group),
//          read back once by launch_reduce_partials. lora_dy_pass_plan balances the two partial terms.
// Smem   : 55.3 KB (dy ring) + 2*192*(RC+8)*2 + cols_per_group*(RC+8)*4 (dy_pass_tc_smem; the plan sizes the
//          column groups with it): 110.6 KB at r = 16 with 384-column groups.
constexpr int TD_BM = 128;
constexpr int TD_BN = 64;
constexpr int TD_LDY = TD_BN + 8;

size_t dy_pass_tc_smem(int rc, int64_t cols_per_group) {
  const int64_t cc = (cols_per_group + TD_BN - 1) / TD_BN * TD_BN;
  return (size_t)kStages * TD_BM * TD_LDY * 2 + (size_t)2 * (TD_BN + TD_BM) * (rc + 8) * 2 + (size_t)cc * (rc + 8) * 4;
}

template <typename T, typename TB, int NJ>
__global__ void __launch_bounds__(kTcThreads, NJ == 4 ? 1 : 2)
lora_dy_pass_tc_kernel(const T* __restrict__ dy, const TB* __restrict__ B, const float* __restrict__ u,
                       float* __restrict__ g_out, float* __restrict__ dB_partial, int64_t M, int64_t N, int r,
                       int64_t rows_per_split, int64_t cols_per_group) {
#if LK_TC_ARCH
  constexpr int RC = 16 * NJ, LDR = RC + 8, LDD = RC + 8;
  constexpr int YG = TD_BM * TD_BN / 8 / kTcThreads;  // 8-groups of dy per thread and tile (4)
  constexpr int BG = TD_BN * RC / 4 / kTcThreads;     // 4-groups of B per thread and tile (NJ)
  static_assert(TD_BM == 4 * 32 && TD_BN == 4 * 16, "warps 0-3 own 32 rows each, warps 4-7 16 columns each");
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* dys = reinterpret_cast<T*>(lk_smem);                   // [kStages][TD_BM][TD_LDY]: dy tiles
  T* bs = dys + kStages * TD_BM * TD_LDY;  // [2][TD_BN][LDR]: B chunks (B operand stored [k][n]), per tile
  T* us = bs + 2 * TD_BN * LDR;            // [2][TD_BM][LDR]: u tiles (B operand stored [k][n]), per row tile
  float* dBs = reinterpret_cast<float*>(us + 2 * TD_BM * LDR);  // [cc][LDD]: dB accumulators of the column group
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t row_begin = (int64_t)blockIdx.x * rows_per_split;
  const int64_t row_end = min64(M, row_begin + rows_per_split);
  const int64_t col_begin = (int64_t)blockIdx.y * cols_per_group;
  const int64_t col_end = min64(N, col_begin + cols_per_group);
  const int j0 = blockIdx.z * RC;
  const bool do_dB = dB_partial != nullptr;
  float* g = g_out + (int64_t)blockIdx.y * M * r;
  float* dBp = do_dB ? dB_partial + (int64_t)blockIdx.x * N * r : nullptr;
  const int64_t cc = (cols_per_group + TD_BN - 1) / TD_BN * TD_BN;
  const int64_t n_ct = row_end > row_begin && col_end > col_begin ? (col_end - col_begin + TD_BN - 1) / TD_BN : 0;
  const int64_t n_tiles = n_ct > 0 ? (row_end - row_begin + TD_BM - 1) / TD_BM * n_ct : 0;

  if (do_dB)
    for (int64_t i = tid; i < cc * LDD; i += kTcThreads) dBs[i] = 0.f;

  // Full tiles of 16-byte aligned rows take the fast paths (no per-group bounds / alignment checks).
  const bool dy_vec = reinterpret_cast<uintptr_t>(dy) % 16 == 0 && N % 8 == 0 && col_begin % 8 == 0;
  const bool b_vec = reinterpret_cast<uintptr_t>(B) % sizeof(Vec4<TB>) == 0 && r % 4 == 0 && j0 + RC <= r;
  auto issue = [&](int64_t t) {
    const int64_t m0 = row_begin + t / n_ct * TD_BM, n0 = col_begin + t % n_ct * TD_BN;
    T* slot = dys + (int)(t % kStages) * TD_BM * TD_LDY;
    if (dy_vec && m0 + TD_BM <= row_end && n0 + TD_BN <= col_end) {
#pragma unroll
      for (int i = 0; i < YG; ++i) {
        const int gi = tid + i * kTcThreads, mm = gi / (TD_BN / 8), c = gi % (TD_BN / 8) * 8;
        cp_async16(smem_addr(slot + mm * TD_LDY + c), dy + (m0 + mm) * N + n0 + c, 16);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < YG; ++i) {
      const int gi = tid + i * kTcThreads, mm = gi / (TD_BN / 8), c = gi % (TD_BN / 8) * 8;
      const int64_t m = m0 + mm, n = n0 + c;
      copy8_async<T>(slot + mm * TD_LDY + c, dy + m * N + n, m < row_end ? n_valid(col_end - n, 8) : 0);
    }
  };
  Vec4<TB> br[BG];
  auto fetch_b = [&](int64_t t) {
    const int64_t n0 = col_begin + t % n_ct * TD_BN;
    if (b_vec && n0 + TD_BN <= col_end) {
#pragma unroll
      for (int i = 0; i < BG; ++i) {
        const int gi = tid + i * kTcThreads, nn = gi / (RC / 4), c = gi % (RC / 4) * 4;
        br[i] = *reinterpret_cast<const Vec4<TB>*>(B + (n0 + nn) * r + j0 + c);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < BG; ++i) {
      const int gi = tid + i * kTcThreads, nn = gi / (RC / 4), c = gi % (RC / 4) * 4;
      const int64_t n = n0 + nn;
      br[i] = ld4<TB>(B + n * r + j0 + c, n < col_end ? n_valid(r - (j0 + c), 4) : 0);
    }
  };

  auto stash_b = [&](int64_t t) {  // registers -> bs buffer t % 2 (cast to T)
    T* bb = bs + (int)(t % 2) * TD_BN * LDR;
#pragma unroll
    for (int i = 0; i < BG; ++i) {
      const int gi = tid + i * kTcThreads, nn = gi / (RC / 4), c = gi % (RC / 4) * 4;
      *reinterpret_cast<uint2*>(bb + nn * LDR + c) = to_t4<T, TB>(br[i]);
    }
  };
  auto load_u = [&](int64_t rt) {  // u rows of row tile rt -> us buffer rt % 2 (cast to T)
    const int64_t m0 = row_begin + rt * TD_BM;
    load_tile_as_t<T, float>(us + (int)(rt % 2) * TD_BM * LDR, LDR, u + m0 * r + j0, r, TD_BM, RC / 4, row_end - m0,
                             r - j0);
  };

  // Warps 0-3: acc[i][n] = g rows 32w + 16i (+0..15) x columns j0 + 8n (+0..7). Warps 4-7: acc[0][n] = dB rows
  // 16(w-4) (+0..15) of the current chunk x columns j0 + 8n, loaded from / stored to dBs around each tile.
  float acc[2][2 * NJ][4];
  if (n_tiles > 0) issue(0);
  cp_async_commit();
  if (n_tiles > 1) issue(1);
  cp_async_commit();
  if (n_tiles > 0) {
    fetch_b(0);
    stash_b(0);
    if (do_dB) load_u(0);
  }
  if (n_tiles > 1) fetch_b(1);
  // Per tile t: wait for dy tile t, one barrier (tile t, B chunk t and the row tile's u complete; tile t-1's reads
  // done), refill the freed ring slot, multiply, then stage B chunk t+1 (and u of the next row tile) into the other
  // buffers.
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t ct = t % n_ct, rt = t / n_ct;
    const int64_t m0 = row_begin + rt * TD_BM, n0 = col_begin + ct * TD_BN;
    const T* slot = dys + (int)(t % kStages) * TD_BM * TD_LDY;
    const T* bb = bs + (int)(t % 2) * TD_BN * LDR;
    const T* ub = us + (int)(rt % 2) * TD_BM * LDR;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < n_tiles) issue(t + kStages - 1);
    cp_async_commit();

    if (warp < 4) {
      if (ct == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int n = 0; n < 2 * NJ; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][n][q] = 0.f;
      }
#pragma unroll
      for (int nb = 0; nb < TD_BN / 16; ++nb) {
        uint32_t a0[4], a1[4];
        ldsm4(a0, slot + (32 * warp + lo.r1) * TD_LDY + 16 * nb + lo.c1);
        ldsm4(a1, slot + (32 * warp + 16 + lo.r1) * TD_LDY + 16 * nb + lo.c1);
#pragma unroll
        for (int jf = 0; jf < NJ; ++jf) {
          uint32_t b[4];
          ldsm4_t(b, bb + (16 * nb + lo.r1) * LDR + 16 * jf + lo.c1);
          mma16816<T>(acc[0][2 * jf], a0, b[0], b[1]);
          mma16816<T>(acc[0][2 * jf + 1], a0, b[2], b[3]);
          mma16816<T>(acc[1][2 * jf], a1, b[0], b[1]);
          mma16816<T>(acc[1][2 * jf + 1], a1, b[2], b[3]);
        }
      }
      if (ct == n_ct - 1) {  // row tile done: its g rows written once
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int n = 0; n < 2 * NJ; ++n) {
            const int j = j0 + 8 * n + 2 * lo.t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t m = m0 + 32 * warp + 16 * i + lo.g + 8 * h;
              if (m < row_end) st2f(g + m * r + j, r - j, acc[i][n][2 * h], acc[i][n][2 * h + 1]);
            }
          }
      }
    } else if (do_dB) {
      const int nb = warp - 4;
      float* dacc = dBs + (n0 - col_begin + 16 * nb) * LDD;
#pragma unroll
      for (int n = 0; n < 2 * NJ; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float2 v = *reinterpret_cast<const float2*>(dacc + (lo.g + 8 * h) * LDD + 8 * n + 2 * lo.t);
          acc[0][n][2 * h] = v.x;
          acc[0][n][2 * h + 1] = v.y;
        }
#pragma unroll
      for (int mb = 0; mb < TD_BM / 16; ++mb) {
        uint32_t a[4];  // (dy^T)[n, m]: the dy tile read transposed
        ldsm4_t(a, slot + (16 * mb + lo.r2) * TD_LDY + 16 * nb + lo.c2);
#pragma unroll
        for (int jf = 0; jf < NJ; ++jf) {
          uint32_t b[4];
          ldsm4_t(b, ub + (16 * mb + lo.r1) * LDR + 16 * jf + lo.c1);
          mma16816<T>(acc[0][2 * jf], a, b[0], b[1]);
          mma16816<T>(acc[0][2 * jf + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int n = 0; n < 2 * NJ; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<float2*>(dacc + (lo.g + 8 * h) * LDD + 8 * n + 2 * lo.t) =
              make_float2(acc[0][n][2 * h], acc[0][n][2 * h + 1]);
    }
    if (t + 1 < n_tiles) {
      stash_b(t + 1);
      if (t + 2 < n_tiles) fetch_b(t + 2);
      if (do_dB && ct == n_ct - 1) load_u(rt + 1);
    }
  }
  if (do_dB) {  // the block's dB partial rows [col_begin, col_end), columns of the r-chunk: written once
    __syncthreads();
    for (int64_t i = tid; i < cc * (RC / 4); i += kTcThreads) {
      const int64_t nn = i / (RC / 4);
      const int c = (int)(i % (RC / 4)) * 4;
      const int64_t n = col_begin + nn;
      const int valid = n < col_end ? n_valid(r - (j0 + c), 4) : 0;
      if (valid > 0) {
        const float4 s = *reinterpret_cast<const float4*>(dBs + nn * LDD + c);
        const float v[4] = {s.x, s.y, s.z, s.w};
        store4<float>(dBp + n * r + j0 + c, valid, v);
      }
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dA (tensor cores).
// Math   : dA_partial[s][j, k] = scale * sum over the rows m of split s of g[m, j] (keep * x)[m, k],
//          scale = scaling / (1 - p); g and masked x as T, fp32 accumulation, scale applied to the fp32 result.
// Tiling : block (s, c, z) = row split s x column group c (TA_KC (128)-column strips) x r-chunk z (RC = 16*NJ).
//          For each strip it walks the split's rows in TA_BM (64)-row tiles: x tiles through the cp.async ring
//          (mask applied in place), the g tile (-> T) register-prefetched two tiles ahead into a double buffer.
//          Warp w owns columns 16w..16w+15 of the strip x all RC rows of dA (g^T = the g tile read by
//          ldmatrix.trans), accumulators in registers across the rows, written once per strip (scaled).
// Bytes  : one read of x (M*K*2) per r-chunk; g re-read from L2 once per strip; partials row_splits*r*K*4.
// Smem   : 3 * 64 * 136 * 2 + 2 * 64 * (RC + 8) * 2 = 58.4 KB at RC = 16, 70.7 KB at RC = 64.
constexpr int TA_BM = 64;
constexpr int TA_KC = 128;
constexpr int TA_LDX = TA_KC + 8;

size_t dA_tc_smem(int rc) { return (size_t)kStages * TA_BM * TA_LDX * 2 + (size_t)2 * TA_BM * (rc + 8) * 2; }

template <typename T, int NJ>
__global__ void __launch_bounds__(kTcThreads, NJ == 1 ? kStreamMinBlocks : 2)
lora_dA_tc_kernel(const T* __restrict__ x, const float* __restrict__ g, float* __restrict__ dA_partial, int64_t M,
                  int64_t K, int r, int64_t rows_per_split, int64_t cols_per_group, float scale, float p,
                  uint64_t seed, uint64_t offset) {
#if LK_TC_ARCH
  constexpr int RC = 16 * NJ, LDG = RC + 8;
  constexpr int XG = TA_BM * TA_KC / 8 / kTcThreads;  // 8-groups of x per thread and tile (4)
  constexpr int GG = TA_BM * RC / 4 / kTcThreads;     // 4-groups of g per thread and tile (NJ)
  static_assert(TA_KC == 16 * (kTcThreads / 32), "one 16-column strip per warp");
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* xs = reinterpret_cast<T*>(lk_smem);  // [kStages][TA_BM][TA_LDX]: x tiles (B operand stored [k][n])
  T* gs = xs + kStages * TA_BM * TA_LDX;  // [2][TA_BM][LDG]: g tiles (A operand g^T stored [k][m]), double-buffered
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t row_begin = (int64_t)blockIdx.x * rows_per_split;
  const int64_t row_end = min64(M, row_begin + rows_per_split);
  const int64_t col_begin = (int64_t)blockIdx.y * cols_per_group;
  const int64_t col_end = min64(K, col_begin + cols_per_group);
  const int j0 = blockIdx.z * RC;
  float* dAp = dA_partial + (int64_t)blockIdx.x * r * K;
  const int64_t n_rt = row_end > row_begin ? (row_end - row_begin + TA_BM - 1) / TA_BM : 0;
  const int64_t n_tiles = col_end > col_begin ? (col_end - col_begin + TA_KC - 1) / TA_KC * n_rt : 0;

  // Full tiles of 16-byte aligned rows take the fast paths (no per-group bounds / alignment checks).
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && K % 8 == 0 && col_begin % 8 == 0;
  const bool g_vec = reinterpret_cast<uintptr_t>(g) % 16 == 0 && r % 4 == 0 && j0 + RC <= r;
  auto issue = [&](int64_t t) {  // tiles: strip t / n_rt (outer), row tile t % n_rt (inner)
    const int64_t m0 = row_begin + t % n_rt * TA_BM, k0 = col_begin + t / n_rt * TA_KC;
    T* slot = xs + (int)(t % kStages) * TA_BM * TA_LDX;
    if (x_vec && m0 + TA_BM <= row_end && k0 + TA_KC <= col_end) {
#pragma unroll
      for (int i = 0; i < XG; ++i) {
        const int gi = tid + i * kTcThreads, mm = gi / (TA_KC / 8), c = gi % (TA_KC / 8) * 8;
        cp_async16(smem_addr(slot + mm * TA_LDX + c), x + (m0 + mm) * K + k0 + c, 16);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < XG; ++i) {
      const int gi = tid + i * kTcThreads, mm = gi / (TA_KC / 8), c = gi % (TA_KC / 8) * 8;
      const int64_t m = m0 + mm, k = k0 + c;
      copy8_async<T>(slot + mm * TA_LDX + c, x + m * K + k, m < row_end ? n_valid(col_end - k, 8) : 0);
    }
  };
  Vec4<float> gr[GG];
  auto fetch_g = [&](int64_t t) {
    const int64_t m0 = row_begin + t % n_rt * TA_BM;
    if (g_vec && m0 + TA_BM <= row_end) {
#pragma unroll
      for (int i = 0; i < GG; ++i) {
        const int gi = tid + i * kTcThreads, mm = gi / (RC / 4), c = gi % (RC / 4) * 4;
        gr[i] = *reinterpret_cast<const Vec4<float>*>(g + (m0 + mm) * r + j0 + c);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < GG; ++i) {
      const int gi = tid + i * kTcThreads, mm = gi / (RC / 4), c = gi % (RC / 4) * 4;
      const int64_t m = m0 + mm;
      gr[i] = ld4<float>(g + m * r + j0 + c, m < row_end ? n_valid(r - (j0 + c), 4) : 0);
    }
  };

  auto stash_g = [&](int64_t t) {  // registers -> gs buffer t % 2 (cast to T)
    T* gb = gs + (int)(t % 2) * TA_BM * LDG;
#pragma unroll
    for (int i = 0; i < GG; ++i) {
      const int gi = tid + i * kTcThreads, mm = gi / (RC / 4), c = gi % (RC / 4) * 4;
      *reinterpret_cast<uint2*>(gb + mm * LDG + c) = to_t4<T, float>(gr[i]);
    }
  };

  float acc[NJ][2][4];
  if (n_tiles > 0) issue(0);
  cp_async_commit();
  if (n_tiles > 1) issue(1);
  cp_async_commit();
  if (n_tiles > 0) {
    fetch_g(0);
    stash_g(0);
  }
  if (n_tiles > 1) fetch_g(1);
  for (int64_t t = 0; t < n_tiles; ++t) {  // same pipeline as lora_shrink_tc_kernel
    const int64_t rt = t % n_rt;
    const int64_t m0 = row_begin + rt * TA_BM, k0 = col_begin + t / n_rt * TA_KC;
    T* slot = xs + (int)(t % kStages) * TA_BM * TA_LDX;
    const T* gb = gs + (int)(t % 2) * TA_BM * LDG;
    cp_async_wait<kStages - 2>();
    if (p > 0.f) {
#pragma unroll
      for (int i = 0; i < XG; ++i) {
        const int gi = tid + i * kTcThreads, mm = gi / (TA_KC / 8), c = gi % (TA_KC / 8) * 8;
        const int64_t m = m0 + mm;
        uint4* q = reinterpret_cast<uint4*>(slot + mm * TA_LDX + c);
        if (m < row_end) *q = dropout8<T>(*q, m, K, k0 + c, col_end, p, seed, offset);
      }
    }
    __syncthreads();
    if (t + kStages - 1 < n_tiles) issue(t + kStages - 1);
    cp_async_commit();
    if (rt == 0) {
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[jf][n][q] = 0.f;
    }
#pragma unroll
    for (int mb = 0; mb < TA_BM / 16; ++mb) {
      uint32_t b[4];
      ldsm4_t(b, slot + (16 * mb + lo.r1) * TA_LDX + 16 * warp + lo.c1);
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf) {
        uint32_t a[4];  // (g^T)[j, m]: the g tile read transposed
        ldsm4_t(a, gb + (16 * mb + lo.r2) * LDG + 16 * jf + lo.c2);
        mma16816<T>(acc[jf][0], a, b[0], b[1]);
        mma16816<T>(acc[jf][1], a, b[2], b[3]);
      }
    }
    if (t + 1 < n_tiles) {
      stash_g(t + 1);
      if (t + 2 < n_tiles) fetch_g(t + 2);
    }
    if (rt == n_rt - 1) {  // strip done: dA partial rows j0.., columns k0 + 16w.. written once
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int j = j0 + 16 * jf + lo.g + 8 * h;
            const int64_t k = k0 + 16 * warp + 8 * n + 2 * lo.t;
            if (j < r)
              st2f(dAp + (int64_t)j * K + k, col_end - k, acc[jf][n][2 * h] * scale, acc[jf][n][2 * h + 1] * scale);
          }
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// reduce_partials, vectorized: 4 consecutive outputs per thread step (16-byte loads of each partial), the same
// summation order as reduce_partials_kernel (s = 0, 1, ...). Used when count % 4 == 0 and the pointers are aligned.
template <typename TO>
__global__ void __launch_bounds__(kThreads)
reduce_partials4_kernel(const float* __restrict__ partial, int64_t S, int64_t count, TO* __restrict__ out) {
  const int64_t n4 = count / 4;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t t = 0; t < S; ++t) {
      const float4 q = *reinterpret_cast<const float4*>(partial + t * count + 4 * i);
      v[0] += q.x; v[1] += q.y; v[2] += q.z; v[3] += q.w;
    }
    store4<TO>(out + 4 * i, 4, v);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.
template <typename F>
cudaError_t dispatch(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// The 16-bit dtypes only (the tensor-core kernels' x dtypes).
template <typename F>
cudaError_t dispatch16(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// Column fragments per r-chunk of the kernels whose accumulators scale with r: 1, 2 or 4 (r-chunks of 16, 32, 64).
int rank_frags(int r) {
  const int rp = round16(r);
  return rp <= 16 ? 1 : rp <= 32 ? 2 : 4;
}

template <typename F>
cudaError_t dispatch_frags(int nf, F&& f) {
  switch (nf) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Opt a kernel in to `bytes` of dynamic shared memory (needed above 48 KB). The attribute is set once per
// (kernel, device) and remembered: cudaFuncSetAttribute is a driver call that would otherwise run on every launch.
cudaError_t set_smem_once(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> opted;  // largest size set so far
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = opted[{kernel, dev}];
  if (have >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e == cudaSuccess) have = bytes;
  return e;
}

template <typename K>
cudaError_t set_smem(K kernel, size_t bytes) {
  return set_smem_once(reinterpret_cast<const void*>(kernel), bytes);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                               cudaSuccess || sms <= 0) {
    cudaGetLastError();
    sms = 132;
  }
  return sms;
}

// Whether the current device runs the tensor-core kernels (bf16 mma.sync, cp.async: sm_80+).
bool tc_supported() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return true;  // the launch itself will report the problem
  }
  return major >= 8;
}

constexpr int64_t kPartialBudgetBytes = 64ll << 20;
constexpr size_t kSmemPerBlockMax = 227 * 1024;  // sm_80 / sm_90 opt-in maximum per block
constexpr size_t kSmemPerSm = 228 * 1024;

// Output-writing kernels (expand / dx prefill): row blocks of bm rows x groups of bn-column chunks, about four
// blocks per SM. Returns chunks per group; *groups gets the grid's y size.
int64_t prefill_chunks_per_group(int64_t M, int64_t cols, int bm, int bn, int64_t* groups) {
  const int64_t row_blocks = ceil_div(M, bm), n_chunks = std::max<int64_t>(1, ceil_div(cols, bn));
  const int64_t want = std::min<int64_t>(n_chunks, std::max<int64_t>(1, ceil_div(4 * (int64_t)num_sms(), row_blocks)));
  int64_t cpg = ceil_div(n_chunks, std::min<int64_t>(want, 65535));
  *groups = ceil_div(n_chunks, cpg);
  return cpg;
}

}  // namespace

// dy pass plan (tensor-core tiling: TD_BM-row tiles, TD_BN-column chunks; the fp32 kernel runs any plan). Each
// candidate column-group width (in chunks, bounded by the shared memory of the dB accumulators) gets the row
// split count that makes about two blocks per SM; the plan with the smallest estimated time wins, counting the
// dy read, the partials written here and read back by launch_reduce_partials, and how well the grid fills the GPU.
SplitPlan lora_dy_pass_plan(int64_t M, int64_t N, int r) {
  SplitPlan pl{0, TD_BM, 1, std::max<int64_t>(N, TD_BN)};
  if (M <= 0) return pl;
  r = std::min(std::max(r, 1), kMaxRank);
  const int rp = round16(r), rc = std::min(rp, 64);
  const int64_t zc = ceil_div(rp, rc);
  const int64_t sms = num_sms();
  const int64_t tiles_m = ceil_div(M, TD_BM), tiles_n = std::max<int64_t>(1, ceil_div(N, TD_BN));
  const int64_t n1 = std::max<int64_t>(N, 1);
  const double dy_bytes = 2.0 * (double)M * (double)n1 * (double)zc;
  double best = -1.0, best_any = -1.0;  // within the partial budget / regardless of it
  SplitPlan pl_any = pl;
  for (int64_t ct = 1; ct <= tiles_n; ++ct) {
    const int64_t C = ceil_div(tiles_n, ct);
    if (ct > 1 && C == ceil_div(tiles_n, ct - 1)) continue;  // same group count with less shared memory before
    const size_t smem = dy_pass_tc_smem(rc, ct * TD_BN);
    if (smem > kSmemPerBlockMax) break;
    if (C > 65535) continue;
    // Blocks per SM: shared memory, and registers (the 64-column r-chunk kernel holds one block per SM).
    const int64_t per_sm = std::max<int64_t>(
        1, std::min<int64_t>(rc == 64 ? 1 : 2, (int64_t)(kSmemPerSm / (smem + 1024))));
    const int64_t capacity = per_sm * sms;
    // As many row splits as fit in one wave, within the partial budget.
    int64_t S = std::min(tiles_m, std::max<int64_t>(1, capacity / (C * zc)));
    S = std::min(S, std::max<int64_t>(1, kPartialBudgetBytes / (n1 * r * 4)));
    const int64_t rt = ceil_div(tiles_m, S);
    S = ceil_div(tiles_m, rt);
    const int64_t blocks = S * C * zc;
    const double partial = 8.0 * r * ((double)S * n1 + (C > 1 ? (double)C * M : 0.0));  // written + read back
    const int64_t waves = ceil_div(blocks, capacity);
    const double active = (double)std::min(blocks, capacity);
    // Achieved bandwidth: the grid must cover the SMs; a second block per SM hides the barriers and the u-tile
    // loads (measured on H200: one block per SM ran the same dy pass ~1.4x slower than two).
    const double fill = std::min(1.0, active / sms) *
                        (per_sm >= 2 ? 0.85 + 0.15 * std::min(1.0, active / (2.0 * sms)) : 0.65) *
                        (waves > 1 ? (double)blocks / (waves * capacity) : 1.0);
    const double est = (dy_bytes + partial) / fill;
    const SplitPlan cand{S, rt * TD_BM, C, ct * TD_BN};
    if (best_any < 0 || est < best_any) {
      best_any = est;
      pl_any = cand;
    }
    const bool in_budget = C == 1 || C * M * r * 4 <= kPartialBudgetBytes;
    if (in_budget && (best < 0 || est < best)) {
      best = est;
      pl = cand;
    }
  }
  return best >= 0 ? pl : pl_any;  // the budget is a preference: a plan always comes back
}

// dA plan: column groups of one TA_KC-column strip (no partial cost); row splits so that about two blocks run per
// SM (partials row_splits * r * K floats, within the budget).
SplitPlan lora_dA_plan(int64_t M, int64_t K, int r) {
  SplitPlan pl{0, TA_BM, 1, std::max<int64_t>(K, TA_KC)};
  if (M <= 0) return pl;
  r = std::min(std::max(r, 1), kMaxRank);
  const int rp = round16(r), rc = std::min(rp, 64);
  const int64_t zc = ceil_div(rp, rc);
  const int64_t sms = num_sms();
  const int64_t tiles_m = ceil_div(M, TA_BM), tiles_k = std::max<int64_t>(1, ceil_div(K, TA_KC));
  const int64_t ct = ceil_div(tiles_k, std::min<int64_t>(tiles_k, 65535));
  const int64_t C = ceil_div(tiles_k, ct);
  int64_t S = std::min(tiles_m, ceil_div(std::max<int64_t>(1, 2 * sms / zc), C));
  S = std::min(S, std::max<int64_t>(1, kPartialBudgetBytes / (std::max<int64_t>(K, 1) * r * 4)));
  const int64_t rt = ceil_div(tiles_m, std::max<int64_t>(S, 1));
  return SplitPlan{ceil_div(tiles_m, rt), rt * TA_BM, C, ct * TA_KC};
}

SplitPlan lora_shrink_plan(int64_t M, int64_t K) {
  // Row blocks of TS_BM (the tensor-core kernel's; the fp32 kernel has its own row blocks and reads only the K
  // split). When they do not make two blocks per SM (small M), K is split into groups of whole TS_KC (= SH_KC)
  // chunks, each writing a partial u.
  SplitPlan pl{ceil_div(std::max<int64_t>(M, 1), TS_BM), TS_BM, 1, std::max<int64_t>(K, TS_KC)};
  const int64_t target = 2 * (int64_t)num_sms();
  const int64_t k_chunks = ceil_div(std::max<int64_t>(K, 1), TS_KC);
  if (pl.row_splits < target && k_chunks > 1) {
    const int64_t want = std::min(k_chunks, ceil_div(target, pl.row_splits));
    pl.cols_per_group = ceil_div(k_chunks, want) * TS_KC;
    pl.col_groups = ceil_div(K, pl.cols_per_group);
  }
  return pl;
}
static_assert(TS_KC == SH_KC, "the shrink plan's K groups are whole chunks of both shrink kernels");

cudaError_t launch_lora_shrink(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out, int64_t M,
                               int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed,
                               uint64_t offset, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0) return cudaSuccess;
  if (plan.col_groups > 65535 || plan.col_groups < 1) return cudaErrorInvalidConfiguration;
  const float scale = (float)((double)scaling / (1.0 - (double)p));
  if (x_dtype != DType::kFloat32 && a_dtype != DType::kFloat32 && tc_supported()) {
    const int nf = rank_frags(r);
    const dim3 grid((unsigned)ceil_div(M, TS_BM), (unsigned)plan.col_groups, (unsigned)ceil_div(round16(r), 16 * nf));
    const size_t smem = shrink_tc_smem(nf);
    return dispatch16(x_dtype, [&](auto xt) {
      using T = decltype(xt);
      return dispatch(a_dtype, [&](auto at) {
        using TA = decltype(at);
        return dispatch_frags(nf, [&](auto nfc) {
          constexpr int NF = decltype(nfc)::value;
          cudaError_t e = set_smem(lora_shrink_tc_kernel<T, TA, NF>, smem);
          if (e != cudaSuccess) return e;
          lora_shrink_tc_kernel<T, TA, NF><<<grid, kTcThreads, smem, stream>>>(
              static_cast<const T*>(x), static_cast<const TA*>(A), u_out, M, K, r, plan.cols_per_group, scale, p,
              seed, offset);
          return cudaGetLastError();
        });
      });
    });
  }
  const size_t smem = (size_t)(SH_BM * SH_KC + r * (SH_KC + 1)) * sizeof(float);
  const dim3 grid((unsigned)ceil_div(M, SH_BM), (unsigned)plan.col_groups);
  return dispatch(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return dispatch(a_dtype, [&](auto at) {
      using TA = decltype(at);
      cudaError_t e = set_smem(lora_shrink_kernel<T, TA>, smem);
      if (e != cudaSuccess) return e;
      lora_shrink_kernel<T, TA><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x), static_cast<const TA*>(A),
                                                                  u_out, M, K, r, plan.cols_per_group, scale, p, seed,
                                                                  offset);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_lora_expand_prefill(void* y, DType y_dtype, const float* u, const void* B, DType b_dtype,
                                       const void* bias, int64_t M, int64_t N, int r, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (y_dtype != DType::kFloat32 && tc_supported()) {
    int64_t groups = 0;
    const int64_t cpg = prefill_chunks_per_group(M, N, TO_BM, TO_BN, &groups);
    if (groups > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)ceil_div(M, TO_BM), (unsigned)groups);
    const size_t smem = expand_tc_smem(round16(r));
    return dispatch16(y_dtype, [&](auto yt) {
      using T = decltype(yt);
      return dispatch(b_dtype, [&](auto bt) {
        using TB = decltype(bt);
        cudaError_t e = set_smem(lora_expand_prefill_tc_kernel<T, TB>, smem);
        if (e != cudaSuccess) return e;
        lora_expand_prefill_tc_kernel<T, TB><<<grid, kTcThreads, smem, stream>>>(
            static_cast<T*>(y), u, static_cast<const TB*>(B), static_cast<const T*>(bias), M, N, r, cpg);
        return cudaGetLastError();
      });
    });
  }
  if (ceil_div(N, EX_BN) > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)ceil_div(M, EX_BM), (unsigned)ceil_div(N, EX_BN));
  return dispatch(y_dtype, [&](auto yt) {
    using T = decltype(yt);
    return dispatch(b_dtype, [&](auto bt) {
      using TB = decltype(bt);
      lora_expand_prefill_kernel<T, TB><<<grid, kThreads, 0, stream>>>(
          static_cast<T*>(y), u, static_cast<const TB*>(B), static_cast<const T*>(bias), M, N, r);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_lora_dy_pass(const void* dy, DType dy_dtype, const void* B, DType b_dtype, const float* u,
                                float* g_out, float* dB_partial, int64_t M, int64_t N, int r, SplitPlan plan,
                                cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || plan.row_splits <= 0) return cudaSuccess;
  if (dB_partial && !u) return cudaErrorInvalidValue;
  if (plan.col_groups > 65535) return cudaErrorInvalidConfiguration;
  if (dy_dtype != DType::kFloat32 && b_dtype != DType::kFloat32 && tc_supported()) {
    if (N <= 0)  // g = dy B = 0; the dB partials have no elements
      return cudaMemsetAsync(g_out, 0, (size_t)std::max<int64_t>(plan.col_groups, 1) * M * r * sizeof(float), stream);
    if (plan.row_splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const int nj = rank_frags(r);
    const size_t smem = dy_pass_tc_smem(16 * nj, plan.cols_per_group);
    const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)ceil_div(round16(r), 16 * nj));
    return dispatch16(dy_dtype, [&](auto dt) {
      using T = decltype(dt);
      return dispatch(b_dtype, [&](auto bt) {
        using TB = decltype(bt);
        return dispatch_frags(nj, [&](auto njc) {
          constexpr int NJ = decltype(njc)::value;
          cudaError_t e = set_smem(lora_dy_pass_tc_kernel<T, TB, NJ>, smem);
          if (e != cudaSuccess) return e;
          lora_dy_pass_tc_kernel<T, TB, NJ><<<grid, kTcThreads, smem, stream>>>(
              static_cast<const T*>(dy), static_cast<const TB*>(B), u, g_out, dB_partial, M, N, r,
              plan.rows_per_split, plan.cols_per_group);
          return cudaGetLastError();
        });
      });
    });
  }
  const size_t smem = (size_t)(DP_BM * (DP_BN + 1) + DP_BN * r + DP_BM * r) * sizeof(float);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups);
  return dispatch(dy_dtype, [&](auto dt) {
    using T = decltype(dt);
    return dispatch(b_dtype, [&](auto bt) {
      using TB = decltype(bt);
      cudaError_t e = set_smem(lora_dy_pass_kernel<T, TB>, smem);
      if (e != cudaSuccess) return e;
      lora_dy_pass_kernel<T, TB><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(dy),
                                                                   static_cast<const TB*>(B), u, g_out, dB_partial, M,
                                                                   N, r, plan.rows_per_split, plan.cols_per_group);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_lora_dA(const void* x, DType x_dtype, DType a_dtype, const float* g, float* dA_partial, int64_t M,
                           int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed, uint64_t offset,
                           cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || K <= 0 || plan.row_splits <= 0) return cudaSuccess;
  if (plan.col_groups > 65535) return cudaErrorInvalidConfiguration;
  const float scale = (float)((double)scaling / (1.0 - (double)p));
  if (x_dtype != DType::kFloat32 && a_dtype != DType::kFloat32 && tc_supported()) {
    if (plan.row_splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const int nj = rank_frags(r);
    const size_t smem = dA_tc_smem(16 * nj);
    const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)ceil_div(round16(r), 16 * nj));
    return dispatch16(x_dtype, [&](auto xt) {
      using T = decltype(xt);
      return dispatch_frags(nj, [&](auto njc) {
        constexpr int NJ = decltype(njc)::value;
        cudaError_t e = set_smem(lora_dA_tc_kernel<T, NJ>, smem);
        if (e != cudaSuccess) return e;
        lora_dA_tc_kernel<T, NJ><<<grid, kTcThreads, smem, stream>>>(static_cast<const T*>(x), g, dA_partial, M, K,
                                                                     r, plan.rows_per_split, plan.cols_per_group,
                                                                     scale, p, seed, offset);
        return cudaGetLastError();
      });
    });
  }
  const size_t smem = (size_t)(DA_BM * DA_KC + DA_BM * r) * sizeof(float);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups);
  return dispatch(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    cudaError_t e = set_smem(lora_dA_kernel<T>, smem);
    if (e != cudaSuccess) return e;
    lora_dA_kernel<T><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x), g, dA_partial, M, K, r,
                                                        plan.rows_per_split, plan.cols_per_group, scale, p, seed,
                                                        offset);
    return cudaGetLastError();
  });
}

cudaError_t launch_reduce_partials(const float* partial, int64_t num_splits, int64_t count, void* out,
                                   DType out_dtype, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int64_t max_blocks = 8 * (int64_t)num_sms();
  return dispatch(out_dtype, [&](auto ot) {
    using TO = decltype(ot);
    TO* o = static_cast<TO*>(out);
    if (count % 4 == 0 && reinterpret_cast<uintptr_t>(partial) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(o) % (4 * sizeof(TO)) == 0) {
      const int64_t blocks = std::min<int64_t>(ceil_div(count / 4, kThreads), max_blocks);
      reduce_partials4_kernel<TO><<<(unsigned)blocks, kThreads, 0, stream>>>(partial, num_splits, count, o);
    } else {
      const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), max_blocks);
      reduce_partials_kernel<TO><<<(unsigned)blocks, kThreads, 0, stream>>>(partial, num_splits, count, o);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_lora_dx_prefill(void* dx, DType x_dtype, const float* g, const void* A, DType a_dtype, int64_t M,
                               int64_t K, int r, float scaling, float p, uint64_t seed, uint64_t offset,
                               cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || K <= 0) return cudaSuccess;
  const float scale = (float)((double)scaling / (1.0 - (double)p));
  if (x_dtype != DType::kFloat32 && tc_supported()) {
    int64_t groups = 0;
    const int64_t cpg = prefill_chunks_per_group(M, K, TO_BM, TO_BN, &groups);
    if (groups > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)ceil_div(M, TO_BM), (unsigned)groups);
    const size_t smem = dx_tc_smem(round16(r));
    return dispatch16(x_dtype, [&](auto xt) {
      using T = decltype(xt);
      return dispatch(a_dtype, [&](auto at) {
        using TA = decltype(at);
        cudaError_t e = set_smem(lora_dx_prefill_tc_kernel<T, TA>, smem);
        if (e != cudaSuccess) return e;
        lora_dx_prefill_tc_kernel<T, TA><<<grid, kTcThreads, smem, stream>>>(
            static_cast<T*>(dx), g, static_cast<const TA*>(A), M, K, r, cpg, scale, p, seed, offset);
        return cudaGetLastError();
      });
    });
  }
  if (ceil_div(K, DX_KC) > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)ceil_div(M, DX_BM), (unsigned)ceil_div(K, DX_KC));
  return dispatch(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return dispatch(a_dtype, [&](auto at) {
      using TA = decltype(at);
      lora_dx_prefill_kernel<T, TA><<<grid, kThreads, 0, stream>>>(static_cast<T*>(dx), g, static_cast<const TA*>(A), M,
                                                               K, r, scale, p, seed, offset);
      return cudaGetLastError();
    });
  });
}

}  // namespace lora_kernels
