// Reduction of per-split partial buffers (shrink K splits, dy pass g / dB, dA): out = sum over the splits in a fixed
// order, cast to the output dtype. Bitwise deterministic. Launched as a programmatic dependent of the pass before it
// (pdl.cuh): its blocks start on the SMs that pass's last blocks leave free and wait there for all of it.
#include "plans.cuh"
#include "reduce.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

template <typename TO>
__global__ void __launch_bounds__(kThreads)
reduce_partials_kernel(const float* __restrict__ partial, int64_t S, int64_t count, TO* __restrict__ out) {
  pdl_wait();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x)
    reduce_partials_one(partial, S, count, out, i);
}

// ---------------------------------------------------------------------------------------------------------------
// reduce_partials, vectorized: 4 consecutive outputs per thread step (16-byte loads of each partial), the same
// summation order as reduce_partials_kernel (s = 0, 1, ...). Used when count % 4 == 0 and the pointers are aligned.
template <typename TO>
__global__ void __launch_bounds__(kThreads)
reduce_partials4_kernel(const float* __restrict__ partial, int64_t S, int64_t count, TO* __restrict__ out) {
  const int64_t n4 = count / 4;
  pdl_wait();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x)
    reduce_partials_four(partial, S, count, out, i);
}

}  // namespace

cudaError_t launch_reduce_partials(const float* partial, int64_t num_splits, int64_t count, void* out,
                                   DType out_dtype, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int64_t max_blocks = 8 * (int64_t)num_sms();
  return with_dtype(out_dtype, [&](auto ot) {
    using TO = decltype(ot);
    TO* o = static_cast<TO*>(out);
    if (reduce_partials_vec4(partial, count, o, sizeof(TO))) {
      const int64_t blocks = std::min<int64_t>(ceil_div(count / 4, kThreads), max_blocks);
      return launch_kernel_pdl(reduce_partials4_kernel<TO>, dim3((unsigned)blocks), kThreads, 0, stream, partial,
                           num_splits, count, o);
    }
    const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), max_blocks);
    return launch_kernel_pdl(reduce_partials_kernel<TO>, dim3((unsigned)blocks), kThreads, 0, stream, partial,
                             num_splits, count, o);
  });
}

}  // namespace lora_kernels
