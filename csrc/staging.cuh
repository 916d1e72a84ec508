// Block-wide staging of tiles into shared memory for the tensor-core kernels: the streamed operand's 8-groups by
// cp.async, and side-operand tiles converted to the mma dtype T.
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace lora_kernels {
namespace detail {

#if LK_TC_ARCH
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

}  // namespace detail
}  // namespace lora_kernels
