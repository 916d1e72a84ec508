// A Aᵀ (r × r, fp32) for DoRA's row norm at p = 0 (the C++ entry of dora_autograd.h): the quad term
// s²·B_n (A Aᵀ) B_nᵀ of ‖W_n + s(BA)_n‖² that dora_norm.cu's combine reads.
//
// Math   : aat[i][j] = Σ_k A[i][k] A[j][k], A (r, K) in any dtype, products and sums in fp32. A Aᵀ is symmetric:
//          each pair of 4-row groups (ti <= tj) is computed once and written at both places.
// Tiling : one block per group pair; thread t takes the 4-element chunks k = 4t, 4t + 4·threads, ... of the 8 rows
//          (vector loads where aligned), two chunks in flight, and keeps the 16 sums of its k's. The block then adds
//          them across its lanes (shuffles) and its warps (shared memory) in a fixed order: the result does not depend
//          on scheduling. 512 threads where the pairs fit in one block per SM (r <= 60 on 132 SMs), 256 beyond: the
//          pass is a few rounds of load latency (A is read once per pair, mostly from L2).
// Bytes  : A, 8 rows per block: 8·K·(T(T+1)/2) elements in all, T = ceil(r / 4) (r = 64, K = 4096, fp32: 18 MB, from
//          L2 but for the first touch); r² fp32 written.
// Why a kernel: at::mm ran this as two cuBLAS launches (a split-K SIMT sgemm, then its reduce: 10-15 us of GPU time on
// the H200) plus a cast for 16-bit A; this launch takes 3.5-7 us (bench/results/h200_2026-12-04/session34). The pass
// is bound by load latency, hence the vector loads and two chunks in flight per thread.
#include "common.cuh"
#include "plans.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kGroup = 4;  // rows per group: a block computes a 4 x 4 tile of A Aᵀ

template <typename T, int kT>
__global__ void __launch_bounds__(kT)
dora_gram_kernel(const T* __restrict__ A, int r, int64_t K, float* __restrict__ aat) {
  __shared__ float part[kT / 32][kGroup * kGroup];
  // block -> (ti, tj), ti <= tj, row-major over the upper triangle of the T x T group grid
  const int T_ = (r + kGroup - 1) / kGroup;
  int b = blockIdx.x, ti = 0;
  while (b >= T_ - ti) b -= T_ - ti, ++ti;
  const int tj = ti + b;
  const int i0 = ti * kGroup, j0 = tj * kGroup;

  float acc[kGroup][kGroup] = {};
#pragma unroll 2
  for (int64_t k = 4 * (int64_t)threadIdx.x; k < K; k += 4 * kT) {
    const int valid = (int)(K - k < 4 ? K - k : 4);
    float a[kGroup][4], c[kGroup][4];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      if (i0 + q < r) load4(A + (int64_t)(i0 + q) * K + k, valid, a[q]);
      else a[q][0] = a[q][1] = a[q][2] = a[q][3] = 0.f;
      if (j0 + q < r) load4(A + (int64_t)(j0 + q) * K + k, valid, c[q]);
      else c[q][0] = c[q][1] = c[q][2] = c[q][3] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int p = 0; p < kGroup; ++p)
#pragma unroll
        for (int q = 0; q < kGroup; ++q) acc[p][q] = fmaf(a[p][e], c[q][e], acc[p][q]);
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
    for (int w = 0; w < kT / 32; ++w) s += part[w][threadIdx.x];
    if (i < r && j < r) {
      aat[(int64_t)i * r + j] = s;
      aat[(int64_t)j * r + i] = s;  // the mirror (on a diagonal tile both threads write the same value: a·c = c·a)
    }
  }
}

template <typename T>
cudaError_t launch_gram(const void* A, int r, int64_t K, float* aat, cudaStream_t stream) {
  const int64_t T_ = ceil_div(r, kGroup), pairs = T_ * (T_ + 1) / 2;
  const T* a = static_cast<const T*>(A);
  if (pairs <= num_sms())
    return launch_kernel(dora_gram_kernel<T, 512>, dim3((unsigned)pairs), 512, 0, stream, a, r, K, aat);
  return launch_kernel(dora_gram_kernel<T, 256>, dim3((unsigned)pairs), 256, 0, stream, a, r, K, aat);
}

}  // namespace

cudaError_t launch_dora_gram(const void* A, DType a_dtype, int r, int64_t K, float* aat, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank || K < 0) return cudaErrorInvalidValue;
  switch (a_dtype) {
    case DType::kFloat16: return launch_gram<__half>(A, r, K, aat, stream);
    case DType::kBFloat16: return launch_gram<__nv_bfloat16>(A, r, K, aat, stream);
    default: return launch_gram<float>(A, r, K, aat, stream);
  }
}

}  // namespace lora_kernels
