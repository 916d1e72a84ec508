// Fused LoRA kernels (see lora_kernels.cuh). No torch headers: compiles with plain nvcc.
//
// Design (the frozen GEMMs stay in cuBLAS): lora_expand_prefill writes y = u B^T + bias once, then cuBLAS runs
// y += x W^T with beta = 1 (it reads y in its epilogue, overlapped with its compute-bound main loop); the same
// for dx (lora_dx_prefill, then dx += dy W). Measured on H200 (bench/results/gemm_probe_h200.md): a Triton
// TMA/persistent main loop reached 0.74-0.86x of cuBLAS, so folding the rank-r step into our own main loop would
// lose far more than the prefill costs. Extra traffic per pass: one write of y (M*N) and one read of x (shrink).
#include "lora_kernels.cuh"
#include "philox.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

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
template <typename T>
__device__ __forceinline__ void load_x4_dropout(const T* __restrict__ x, int64_t M, int64_t K, int64_t m, int64_t k,
                                                float p, uint64_t seed, uint64_t offset, float v[4]) {
  if (m < M && k < K) {
    const int valid = (K - k < 4 ? (int)(K - k) : 4);
    load4<T>(x + m * K + k, valid, v);
    if (p > 0.f) {
      bool keep[4];
      dropout_keep4(seed, dropout_counter(offset, m, K, k / 4), p, keep);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = keep[q] ? v[q] : 0.f;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = 0.f;
  }
}

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
  if (p > 0.f) dropout_keep4(seed, dropout_counter(offset, m, K, k / 4), p, keep);
  float v[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) v[q] = keep[q] ? acc[q] * scale : 0.f;
  store4<T>(dx + m * K + k, valid, v);
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

template <typename K>
cudaError_t set_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
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

constexpr int64_t kPartialBudgetBytes = 64ll << 20;

// row_partial_bytes: bytes of one row split's partial; col_partial_bytes: bytes of one column group's partial
// (0 when column groups need no buffer).
SplitPlan make_plan(int64_t M, int64_t cols, int r, int64_t row_tile, int64_t col_tile, int64_t row_partial_bytes,
                    int64_t col_partial_bytes) {
  SplitPlan pl{0, row_tile, 1, std::max<int64_t>(col_tile, cols)};
  if (M <= 0) return pl;
  const int64_t sms = num_sms();
  const int64_t tiles_m = ceil_div(M, row_tile);
  const int64_t max_s = std::max<int64_t>(1, std::min<int64_t>(2 * sms, kPartialBudgetBytes /
                                                                              std::max<int64_t>(1, row_partial_bytes)));
  int64_t s = std::min(tiles_m, max_s);
  pl.rows_per_split = ceil_div(tiles_m, s) * row_tile;
  pl.row_splits = ceil_div(M, pl.rows_per_split);
  const int64_t tiles_c = ceil_div(cols, col_tile);
  if (tiles_c > 1) {
    int64_t cg = std::min(tiles_c, ceil_div(sms, pl.row_splits));
    if (col_partial_bytes > 0)
      cg = std::min(cg, std::max<int64_t>(1, kPartialBudgetBytes / col_partial_bytes));
    pl.cols_per_group = ceil_div(tiles_c, cg) * col_tile;
    pl.col_groups = ceil_div(cols, pl.cols_per_group);
  }
  return pl;
}

}  // namespace

SplitPlan lora_dy_pass_plan(int64_t M, int64_t N, int r) {
  return make_plan(M, N, r, DP_BM, DP_BN, N * r * 4, M * r * 4);
}

SplitPlan lora_dA_plan(int64_t M, int64_t K, int r) { return make_plan(M, K, r, DA_BM, DA_KC, K * r * 4, 0); }

SplitPlan lora_shrink_plan(int64_t M, int64_t K) {
  // Row blocks of SH_BM; when they do not fill the GPU (small M), K is split too, each split writing a partial u.
  SplitPlan pl{ceil_div(std::max<int64_t>(M, 1), SH_BM), SH_BM, 1, std::max<int64_t>(K, SH_KC)};
  const int64_t sms = num_sms();
  const int64_t k_chunks = ceil_div(std::max<int64_t>(K, 1), SH_KC);
  if (pl.row_splits < sms && k_chunks > 1) {
    const int64_t want = std::min(k_chunks, ceil_div(2 * sms, pl.row_splits));
    pl.cols_per_group = ceil_div(k_chunks, want) * SH_KC;
    pl.col_groups = ceil_div(K, pl.cols_per_group);
  }
  return pl;
}

cudaError_t launch_lora_shrink(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out, int64_t M,
                               int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed,
                               uint64_t offset, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0) return cudaSuccess;
  if (plan.col_groups > 65535 || plan.col_groups < 1) return cudaErrorInvalidConfiguration;
  const float scale = (float)((double)scaling / (1.0 - (double)p));
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

cudaError_t launch_lora_dA(const void* x, DType x_dtype, const float* g, float* dA_partial, int64_t M, int64_t K,
                           int r, SplitPlan plan, float scaling, float p, uint64_t seed, uint64_t offset,
                           cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || K <= 0 || plan.row_splits <= 0) return cudaSuccess;
  if (plan.col_groups > 65535) return cudaErrorInvalidConfiguration;
  const float scale = (float)((double)scaling / (1.0 - (double)p));
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
  const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), 8 * (int64_t)num_sms());
  return dispatch(out_dtype, [&](auto ot) {
    using TO = decltype(ot);
    reduce_partials_kernel<TO><<<(unsigned)blocks, kThreads, 0, stream>>>(partial, num_splits, count,
                                                                         static_cast<TO*>(out));
    return cudaGetLastError();
  });
}

cudaError_t launch_lora_dx_prefill(void* dx, DType x_dtype, const float* g, const void* A, DType a_dtype, int64_t M,
                               int64_t K, int r, float scaling, float p, uint64_t seed, uint64_t offset,
                               cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || K <= 0) return cudaSuccess;
  if (ceil_div(K, DX_KC) > 65535) return cudaErrorInvalidConfiguration;
  const float scale = (float)((double)scaling / (1.0 - (double)p));
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
