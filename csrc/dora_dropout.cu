// DoRA's element-wise dropout pass at p > 0 (the C++ entry of dora_autograd.h; lora_kernels/dora.py's `masked`):
//
//   out = base + (keep ? a_keep · t : a_drop · t)       keep: the contract's mask of the (M, K) t at (seed, offset)
//
// Its three uses: x_k = keep ⊙ x (a_keep = 1, a_drop = 0); x_c = x − x_k / q over x_k (a_keep = 1 − 1/q,
// a_drop = 1); dx += keep ⊙ (dy_c W) (base = out = dx). fp32 math and one rounding to t's dtype, as the Triton
// kernel (lora_kernels/backends/triton/kernels/dora_masked.py), so that both backends' x_k and x_c are the same bits.
// Tiling: one thread per 8-group of a row (one Philox call serves its 8 elements: one 16-byte access of a 16-bit t,
// two of an fp32 one), grid-stride over the (M, ceil(K/8)) groups; scalar accesses where K % 8 != 0 or a pointer is
// not 16-byte aligned. t, base and out may be one tensor (each thread reads its elements before it writes them).
// Bytes: t (and base) read once, out written once; at 16-bit t the Philox multiplies decide the time, as in the
// keep-bits pass (dropout_bits.cu).
#include "common.cuh"
#include "plans.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

template <typename T>
struct alignas(16) Vec8 {
  T e[8];
};

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
dora_masked_kernel(const T* t, const T* base, T* out, int64_t M, int64_t K, uint32_t thr, uint64_t seed,
                   uint64_t offset, float a_keep, float a_drop) {
  const int64_t K8 = dropout_groups(K), total = M * K8;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / K8, k8 = i % K8;
    const uint32_t bits = dropout_keep_bits8(seed, dropout_counter(offset, m, K, k8), thr);
    const int64_t e0 = m * K + k8 * kDropoutGroup;
    if constexpr (VEC) {  // K % 8 == 0 and 16-byte aligned rows: the group is one aligned vector
      const Vec8<T> tv = *reinterpret_cast<const Vec8<T>*>(t + e0);
      Vec8<T> bv;
      if (base != nullptr) bv = *reinterpret_cast<const Vec8<T>*>(base + e0);
      Vec8<T> o;
#pragma unroll
      for (int q = 0; q < kDropoutGroup; ++q) {
        const float v = to_f<T>(tv.e[q]);
        float r = ((bits >> q) & 1u) ? v * a_keep : v * a_drop;
        if (base != nullptr) r += to_f<T>(bv.e[q]);
        o.e[q] = from_f<T>(r);
      }
      *reinterpret_cast<Vec8<T>*>(out + e0) = o;
    } else {
      const int n = (int)min64(kDropoutGroup, K - k8 * kDropoutGroup);
      for (int q = 0; q < n; ++q) {
        const float v = to_f<T>(t[e0 + q]);
        float r = ((bits >> q) & 1u) ? v * a_keep : v * a_drop;
        if (base != nullptr) r += to_f<T>(base[e0 + q]);
        out[e0 + q] = from_f<T>(r);
      }
    }
  }
}

}  // namespace

cudaError_t launch_dora_masked(const void* t, const void* base, void* out, DType dtype, int64_t M, int64_t K, float p,
                               uint64_t seed, uint64_t offset, float a_keep, float a_drop, cudaStream_t stream) {
  if (M <= 0 || K <= 0) return cudaSuccess;
  const int64_t groups = M * dropout_groups(K);
  // enough blocks to fill every SM at full occupancy, fewer where there is less work
  const int64_t blocks = std::min<int64_t>(ceil_div(groups, kThreads), (int64_t)num_sms() * (2048 / kThreads));
  auto aligned = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vec = K % kDropoutGroup == 0 && aligned(t) && aligned(base) && aligned(out);
  const uint32_t thr = dropout_threshold(p);
  return with_dtype(dtype, [&](auto z) {
    using T = decltype(z);
    auto* const kernel = vec ? dora_masked_kernel<T, true> : dora_masked_kernel<T, false>;
    return launch_kernel(kernel, dim3((unsigned)blocks), kThreads, 0, stream, static_cast<const T*>(t),
                         static_cast<const T*>(base), static_cast<T*>(out), M, K, thr, seed, offset, a_keep, a_drop);
  });
}

}  // namespace lora_kernels
