// The partials' sums of launch_reduce_partials (reduce.cu), as device functions that the sm_90 pack launch
// (gemm_sm90_pack.cu) also runs: out = the sum of S blocks of `count` floats, each element from +0 over the blocks in
// order (t = 0, 1, ...), cast to the output dtype. The same sums bit for bit wherever they run.
#pragma once
#include "common.cuh"

namespace lora_kernels {
namespace detail {

// Whether the sums take 4 outputs per item (reduce_partials_four): count % 4 == 0, partial 16-byte aligned, out
// aligned to 4 outputs of out_size bytes.
inline bool reduce_partials_vec4(const float* partial, int64_t count, const void* out, size_t out_size) {
  return count % 4 == 0 && reinterpret_cast<uintptr_t>(partial) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % (4 * out_size) == 0;
}

// out[i]
template <typename TO>
__device__ __forceinline__ void reduce_partials_one(const float* __restrict__ partial, int64_t S, int64_t count,
                                                    TO* __restrict__ out, int64_t i) {
  float s = 0.f;
  // unrolled so that several loads are in flight (many partials, few outputs: dA's row blocks); the order is t's
#pragma unroll 8
  for (int64_t t = 0; t < S; ++t) s += partial[t * count + i];
  out[i] = from_f<TO>(s);
}

// out[4 i .. 4 i + 4), 16-byte loads of each block: count % 4 == 0, partial 16-byte aligned, out 4-element aligned
template <typename TO>
__device__ __forceinline__ void reduce_partials_four(const float* __restrict__ partial, int64_t S, int64_t count,
                                                     TO* __restrict__ out, int64_t i) {
  float v[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
  for (int64_t t = 0; t < S; ++t) {
    const float4 q = *reinterpret_cast<const float4*>(partial + t * count + 4 * i);
    v[0] += q.x; v[1] += q.y; v[2] += q.z; v[3] += q.w;
  }
  store4<TO>(out + 4 * i, 4, v);
}

}  // namespace detail
}  // namespace lora_kernels
