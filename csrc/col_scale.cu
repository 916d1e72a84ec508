// Per-column scale of an output in place: y (M, N) = c ⊙ y + bias, c (N,) fp32, bias (N,) in y's dtype or null.
// DoRA's column scale (y = g ⊙ (x Wᵀ + s·u Bᵀ) + b) on the forward paths whose GEMM epilogue does not take it
// (the small-M kernel, the shrink + GEMM path, cuBLAS); the fused sm_90 forward applies it in its epilogue
// (fused_fwd_sm90.h). One read and one write of y, math in fp32, one rounding.
#include "common.cuh"
#include "plans.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

// Grid-stride over the elements; 8 consecutive elements of a row per step when N % 8 == 0 and y is 16-byte aligned
// (one 16-byte access for 16-bit y), else one.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
col_scale_kernel(T* __restrict__ y, const float* __restrict__ c, const T* __restrict__ bias, int64_t M, int64_t N) {
  const int64_t steps = M * N / V;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < steps; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = i * V;
    const int64_t n = e % N;  // V divides N: the V elements share a row
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float b = bias ? to_f<T>(bias[n + v]) : 0.f;
      y[e + v] = from_f<T>(fmaf(c[n + v], to_f<T>(y[e + v]), b));
    }
  }
}

}  // namespace

cudaError_t launch_lora_col_scale(void* y, DType y_dtype, const float* c, const void* bias, int64_t M, int64_t N,
                                  cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const int64_t max_blocks = 8 * (int64_t)num_sms();
  return with_dtype(y_dtype, [&](auto yt) {
    using T = decltype(yt);
    T* yp = static_cast<T*>(y);
    const T* bp = static_cast<const T*>(bias);
    if (N % 8 == 0 && reinterpret_cast<uintptr_t>(yp) % 16 == 0) {
      const int64_t blocks = std::min<int64_t>(ceil_div(M * N / 8, kThreads), max_blocks);
      return launch_kernel(col_scale_kernel<T, 8>, dim3((unsigned)blocks), kThreads, 0, stream, yp, c, bp, M, N);
    }
    const int64_t blocks = std::min<int64_t>(ceil_div(M * N, kThreads), max_blocks);
    return launch_kernel(col_scale_kernel<T, 1>, dim3((unsigned)blocks), kThreads, 0, stream, yp, c, bp, M, N);
  });
}

}  // namespace lora_kernels
