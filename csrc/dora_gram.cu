// A Aᵀ (r × r, fp32) for DoRA's row norm at p = 0 (the C++ entry of dora_autograd.h): the quad term
// s²·B_n (A Aᵀ) B_nᵀ of ‖W_n + s(BA)_n‖² that dora_norm.cu's combine reads.
//
// Math   : aat[i][j] = Σ_k A[i][k] A[j][k], A (r, K) in any dtype, products and sums in fp32. A Aᵀ is symmetric:
//          each pair of 4-row groups (ti <= tj) is computed once and written at both places.
// Tiling : one block of 256 threads per group pair; thread t takes k = t, t + 256, ... (each warp reads 32
//          consecutive elements of the 8 rows) and keeps the 16 sums of its k's. The block then adds them across its
//          lanes (shuffles) and its warps (shared memory) in a fixed order: the result does not depend on scheduling.
// Bytes  : A from L2, 8 rows per block: 8·K·(T(T+1)/2) elements in all, T = ceil(r / 4) (r = 64, K = 4096, fp32:
//          18 MB); r² fp32 written.
// Why a kernel: at::mm ran this as two cuBLAS launches (a split-K SIMT sgemm, then its reduce: about 10 us of GPU
// time on the H200, session 34's profile) plus a cast for 16-bit A; this is one launch of a few microseconds.
#include "common.cuh"
#include "plans.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kGroup = 4;  // rows per group: a block computes a 4 x 4 tile of A Aᵀ
constexpr int kGramWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads)
dora_gram_kernel(const void* __restrict__ A, DType a_dt, int r, int64_t K, float* __restrict__ aat) {
  __shared__ float part[kGramWarps][kGroup * kGroup];
  // block -> (ti, tj), ti <= tj, row-major over the upper triangle of the T x T group grid
  const int T = (r + kGroup - 1) / kGroup;
  int b = blockIdx.x, ti = 0;
  while (b >= T - ti) b -= T - ti, ++ti;
  const int tj = ti + b;
  const int i0 = ti * kGroup, j0 = tj * kGroup;

  float acc[kGroup][kGroup] = {};
#pragma unroll 2
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    float a[kGroup], c[kGroup];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      a[q] = i0 + q < r ? load_any(A, a_dt, (int64_t)(i0 + q) * K + k) : 0.f;
      c[q] = j0 + q < r ? load_any(A, a_dt, (int64_t)(j0 + q) * K + k) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < kGroup; ++p)
#pragma unroll
      for (int q = 0; q < kGroup; ++q) acc[p][q] = fmaf(a[p], c[q], acc[p][q]);
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int p = 0; p < kGroup; ++p)
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      const float v = warp_sum(acc[p][q]);
      if (lane == 0) part[warp][p * kGroup + q] = v;
    }
  __syncthreads();
  if (threadIdx.x < kGroup * kGroup) {
    const int p = threadIdx.x / kGroup, q = threadIdx.x % kGroup, i = i0 + p, j = j0 + q;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kGramWarps; ++w) s += part[w][threadIdx.x];
    if (i < r && j < r) {
      aat[(int64_t)i * r + j] = s;
      aat[(int64_t)j * r + i] = s;  // the mirror (the same value: ti == tj writes each diagonal tile twice alike)
    }
  }
}

}  // namespace

cudaError_t launch_dora_gram(const void* A, DType a_dtype, int r, int64_t K, float* aat, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank || K < 0) return cudaErrorInvalidValue;
  const int T = (r + kGroup - 1) / kGroup;
  return launch_kernel(dora_gram_kernel, dim3((unsigned)(T * (T + 1) / 2)), kThreads, 0, stream, A, a_dtype, r, K,
                       aat);
}

}  // namespace lora_kernels
