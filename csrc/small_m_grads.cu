// The adapters' gradients of a small-M backward (M <= 64 rows), one launch after the Hopper dx kernel
// (small_m_sm90.cu, which writes sg = s · dy B):
//   dA (r, K) = sgᵀ x          and          dB (N, r) = dyᵀ u          (u = s · x Aᵀ, the forward's).
// Math   : both are sums over the M <= 64 tokens, so each output element costs M multiply-adds: fp32 FMA over x or dy
//          (16-bit, exact in fp32) and the fp32 sg or u, in token order (deterministic), one rounding to the output
//          dtype. That is at least as accurate as PyTorch's product in the adapters' dtype.
// Tiling : 128 threads per block; a block owns 128 columns of x (dA) or of dy (dB) and 8 of the r columns of sg or u
//          (r % 8 == 0), which it keeps in shared memory (M x 8 floats); each thread one column, 8 fp32 sums. dA's
//          blocks come first in the grid, then dB's. The 16-bit operand is read r / 8 times, from L2 after the first.
//          (Issuing all M of a column's loads before the sums measured 2-5% slower in forward+backward, session 57.
//          Under Nsight Compute at M = 64, 4096 -> 4096 it takes 11-13 us with one block of 4 warps per SM: latency-
//          bound; more, smaller blocks, e.g. 2 of the r columns per thread, would hide more.)
// Launch : a programmatic dependent of the dx kernel (its blocks wait for sg in pdl_wait).
#include "common.cuh"
#include "pdl.cuh"
#include "plans.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int SG_THREADS = 128;
constexpr int SG_MAX_M = 64;

template <typename T, typename TO>
__global__ void __launch_bounds__(SG_THREADS)
small_m_grads_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ sg,
                     const float* __restrict__ u, TO* __restrict__ dA, TO* __restrict__ dB, int M, int N, int K, int r,
                     int blocks_dA) {
  __shared__ float coef[SG_MAX_M][8];
  const bool is_dA = (int)blockIdx.x < blocks_dA;
  const int b = is_dA ? blockIdx.x : blockIdx.x - blocks_dA;
  const int L = is_dA ? K : N;  // the 16-bit operand's row length: x (M, K) or dy (M, N)
  const int col_blocks = (L + SG_THREADS - 1) / SG_THREADS;
  const int j0 = 8 * (b / col_blocks), col = (b % col_blocks) * SG_THREADS + threadIdx.x;
  const T* src = is_dA ? x : dy;
  const float* c = is_dA ? sg : u;
  pdl_wait();  // sg is the dx kernel's
  for (int i = threadIdx.x; i < M * 8; i += SG_THREADS) coef[i >> 3][i & 7] = c[(int64_t)(i >> 3) * r + j0 + (i & 7)];
  __syncthreads();
  if (col >= L) return;
  float acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = 0.f;
#pragma unroll 8
  for (int m = 0; m < M; ++m) {
    const float v = to_f<T>(src[(int64_t)m * L + col]);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = fmaf(coef[m][j], v, acc[j]);
  }
  if (is_dA) {
#pragma unroll
    for (int j = 0; j < 8; ++j) dA[(int64_t)(j0 + j) * K + col] = from_f<TO>(acc[j]);  // coalesced along K
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) dB[(int64_t)col * r + j0 + j] = from_f<TO>(acc[j]);  // 8 contiguous per thread
  }
}

}  // namespace

cudaError_t launch_lora_small_m_grads(const void* x, const void* dy, DType x_dtype, const float* sg, const float* u,
                                      void* dA, void* dB, DType ab_dtype, int64_t M, int64_t N, int64_t K, int r,
                                      cudaStream_t stream) {
  if (M < 1 || M > SG_MAX_M || r < 8 || r % 8 || N > INT_MAX || K > INT_MAX || (dA != nullptr && sg == nullptr) ||
      (dB != nullptr && u == nullptr))
    return cudaErrorInvalidValue;
  const int64_t blocks_dA = dA != nullptr ? ceil_div(K, SG_THREADS) * (r / 8) : 0;
  const int64_t blocks_dB = dB != nullptr ? ceil_div(N, SG_THREADS) * (r / 8) : 0;
  if (blocks_dA + blocks_dB == 0) return cudaSuccess;
  return with_dtype16(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return with_dtype(ab_dtype, [&](auto ot) {
      using TO = decltype(ot);
      return launch_kernel_pdl(small_m_grads_kernel<T, TO>, dim3((unsigned)(blocks_dA + blocks_dB)), SG_THREADS, 0,
                               stream, static_cast<const T*>(x), static_cast<const T*>(dy), sg, u,
                               static_cast<TO*>(dA), static_cast<TO*>(dB), (int)M, (int)N, (int)K, r,
                               (int)blocks_dA);
    });
  });
}

}  // namespace lora_kernels
