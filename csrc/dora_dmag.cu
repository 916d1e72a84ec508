// The grad of DoRA's magnitude (the C++ entry of dora_autograd.h; the math of lora_kernels/dora.py):
//
//   dmag_n = Σ_s part[s, n] / q / norm_n                 (the column sums of dora_colsum.cu; q = 1 − p)
//   p = 0, where y cannot give z (dora_recompute_z: g_n = 0, where y = b; a bias and |g_n| < 1/2, where (y − b)/g
//   amplifies y's rounding; or big_adapter_n, where y's LoRA part carries the 16-bit operands' rounding at a scale
//   past the base's):  dmag_n = Σ_m dy_mn (x_m·W_n + u_m·B_n) / norm_n
//   (g null: no such recompute, as at p > 0, where the sums come from z itself)
//
// Tiling: one thread per column; then each block recomputes its flagged columns one at a time (a warp per row, the
// lanes over K). None exist in practice (DoRA keeps g near 1): the launch then costs a read of g and the bias.
// scale_dy (dy itself, or null): where the colsum pass overwrote dy with dy_c in place, it kept dy in the flagged
// columns for this recompute; each such column gets dy_c = g ⊙ dy once its sum is taken.
#include "common.cuh"
#include "plans.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kWarps = kThreads / 32;

// One thread per column: dmag_n = Σ_s part[s, n] / q / norm_n. Then the block's flagged columns, one at a time:
// z_mn = x_m·W_n + u_m·B_n recomputed (a warp per row, lanes over K) and dmag_n = Σ_m dy_mn z_mn / norm_n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dora_dmag_kernel(const float* __restrict__ part, int64_t splits, const float* __restrict__ g,
                 const float* __restrict__ norm, float q, const T* dy, const T* __restrict__ x, const T* __restrict__ W,
                 const T* __restrict__ bias, const uint8_t* __restrict__ big_adapter, const float* __restrict__ u,
                 const void* __restrict__ B, DType b_dt,
                 void* __restrict__ dmag, DType m_dt, T* scale_dy, int64_t M, int64_t K, int64_t N, int r) {
  __shared__ float sums[kWarps];
  __shared__ int any_flagged;
  auto flagged = [&](int64_t c) {
    return dora_recompute_z(g[c], bias != nullptr ? to_f<T>(bias[c]) : 0.f,
                            big_adapter != nullptr && big_adapter[c]);
  };
  const int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (threadIdx.x == 0) any_flagged = 0;
  __syncthreads();
  if (n < N) {
    float t = 0.f;
    for (int64_t s = 0; s < splits; ++s) t += part[s * N + n];
    if (q != 1.f) t = t / q;
    store_any(dmag, m_dt, n, t / norm[n]);
    if (g != nullptr && flagged(n)) any_flagged = 1;
  }
  __syncthreads();
  if (!any_flagged) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t end = min64(N, (int64_t)(blockIdx.x + 1) * kThreads);
  for (int64_t c = (int64_t)blockIdx.x * kThreads; c < end; ++c) {
    if (!flagged(c)) continue;  // uniform over the block
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
    if (scale_dy != nullptr) {  // every warp has read the column (the barrier above): dy_c = g ⊙ dy there
      const float gc = g[c];
      for (int64_t m = threadIdx.x; m < M; m += kThreads) {
        scale_dy[m * N + c] = from_f<T>(to_f<T>(dy[m * N + c]) * gc);
      }
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_dora_dmag(const float* part, int64_t splits, const float* g, const float* norm, float q,
                             const void* dy, const void* x, const void* W, const void* bias,
                             const uint8_t* big_adapter, DType dtype, const float* u, const void* B, DType b_dtype,
                             void* dmag, DType m_dtype, void* scale_dy, int64_t M, int64_t K, int64_t N, int r,
                             cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return launch_kernel(dora_dmag_kernel<T>, dim3((unsigned)ceil_div(N, kThreads)), kThreads, 0, stream, part,
                         splits, g, norm, q, static_cast<const T*>(dy), static_cast<const T*>(x),
                         static_cast<const T*>(W), static_cast<const T*>(bias), big_adapter, u, B, b_dtype, dmag,
                         m_dtype, static_cast<T*>(scale_dy), M, K, N, r);
  });
}

}  // namespace lora_kernels
