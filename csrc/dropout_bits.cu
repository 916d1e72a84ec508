// The dropout mask of an (M, K) input as keep bits, one byte per 8-group: bits[m * K8 + k8] bit q is set iff element
// (m, 8 * k8 + q) is kept (K8 = ceil(K / 8)), the same mask as philox.cuh's dropout_keep_bits8 (the contract).
// Why a pass of its own: inside the streaming passes (shrink, dA, dx) the mask's Philox chains compete for issue
// slots with the copies and the MMAs at 24 resident warps per SM, and those passes ran 2-2.5x slower with dropout
// than without it. Here every thread runs independent chains at full occupancy (the 32-bit multiplies decide the
// time), and the passes read one byte per 8 elements instead (1/16 of x's bytes at 16-bit x). The bits are a
// temporary of one forward or one backward: the backward regenerates them from the seed, once for dA and dx.
// launch_dropout_keep_bits; dropout_bits_used says where the binding makes them.
// launch_dropout_keep_bits_kept: the same bits and, in the same pass, kept = keep ⊙ x (x's 16-bit type, exact), a
// temporary of the backward for dA's unmasked wgmma kernel (dA_sm90.cu says why).
#include "common.cuh"
#include "plans.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int DB_GROUPS = 4;  // 8-groups per thread: four independent Philox chains, one 32-bit store

// Math   : bits[m][k8] = dropout_keep_bits8(seed, dropout_counter(offset, m, K, k8), thr).
// Tiling : thread i of the grid-stride loop owns the DB_GROUPS consecutive bytes 4i..4i+3 of the row-major
//          (M, K8) array (across row ends where K8 % 4 != 0: the counter of each byte is computed on its own).
// Bytes  : M * K8 written once; nothing read but the seed.
__global__ void __launch_bounds__(kThreads)
dropout_keep_bits_kernel(uint8_t* __restrict__ bits, int64_t M, int64_t K, uint32_t thr, uint64_t seed,
                         const int64_t* seed_ptr, uint64_t offset) {
  seed = dropout_seed(seed, seed_ptr);
  const int64_t K8 = dropout_groups(K), total = M * K8;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * DB_GROUPS;
  const bool vec = K8 % DB_GROUPS == 0;  // each 4-byte word lies in one row, and is 4-byte aligned
  for (int64_t e0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * DB_GROUPS; e0 < total; e0 += stride) {
    if (vec && e0 + DB_GROUPS <= total) {
      const int64_t m = e0 / K8, k8 = e0 % K8;
      uint32_t w = 0;
#pragma unroll
      for (int q = 0; q < DB_GROUPS; ++q)
        w |= dropout_keep_bits8(seed, dropout_counter(offset, m, K, k8 + q), thr) << (8 * q);
      *reinterpret_cast<uint32_t*>(bits + e0) = w;
    } else {
#pragma unroll
      for (int q = 0; q < DB_GROUPS; ++q) {
        const int64_t e = e0 + q;
        if (e < total) bits[e] = (uint8_t)dropout_keep_bits8(seed, dropout_counter(offset, e / K8, K, e % K8), thr);
      }
    }
  }
}

// Math   : as dropout_keep_bits_kernel, plus kept[m][8 k8 + q] = bit q ? x : x * 0 (a dropped NaN or inf stays NaN,
//          as in the reference's keep * x).
// Tiling : thread i of the grid-stride loop owns the DB_GROUPS consecutive bytes 4i..4i+3 of the (M, K8) bits and
//          their 8-element groups of x, one 16-byte load and store each (K % 8 == 0: a group never crosses a row).
// Bytes  : x read once, kept written once, M * K8 bytes of bits written once.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dropout_keep_bits_kept_kernel(uint8_t* __restrict__ bits, const T* __restrict__ x, T* __restrict__ kept, int64_t M,
                              int64_t K, uint32_t thr, uint64_t seed, const int64_t* seed_ptr, uint64_t offset) {
  seed = dropout_seed(seed, seed_ptr);
  const int64_t K8 = K / 8, total = M * K8;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * DB_GROUPS;
  auto load = [&](uint4 (&v)[DB_GROUPS], int64_t e0) {
#pragma unroll
    for (int q = 0; q < DB_GROUPS; ++q)
      if (e0 + q < total) v[q] = __ldcs(reinterpret_cast<const uint4*>(x) + e0 + q);
  };
  // Software-pipelined by one step: the loads of the next 4 groups are in flight during this step's Philox work.
  int64_t e0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * DB_GROUPS;
  uint4 v[DB_GROUPS], next[DB_GROUPS];
  if (e0 < total) load(v, e0);
  for (; e0 < total; e0 += stride) {
    if (e0 + stride < total) load(next, e0 + stride);
    uint32_t w = 0;
#pragma unroll
    for (int q = 0; q < DB_GROUPS; ++q) {
      const int64_t e = e0 + q;
      if (e >= total) break;
      const uint32_t b = dropout_keep_bits8(seed, dropout_counter(offset, e / K8, K, e % K8), thr);
      w |= b << (8 * q);
      T* h = reinterpret_cast<T*>(&v[q]);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (!((b >> j) & 1u)) h[j] = from_f<T>(to_f<T>(h[j]) * 0.f);
      __stcs(reinterpret_cast<uint4*>(kept) + e, v[q]);
    }
    if (e0 + DB_GROUPS <= total) {  // e0 % 4 == 0: a 4-byte aligned word of the (aligned) bits
      *reinterpret_cast<uint32_t*>(bits + e0) = w;
    } else {
      for (int q = 0; q < DB_GROUPS && e0 + q < total; ++q) bits[e0 + q] = (uint8_t)(w >> (8 * q));
    }
#pragma unroll
    for (int q = 0; q < DB_GROUPS; ++q) v[q] = next[q];
  }
}

}  // namespace

bool dropout_bits_used(DType x_dtype, DType a_dtype) { return stream_pass_on_tc(x_dtype, a_dtype); }

int64_t dropout_keep_bits_bytes(int64_t M, int64_t K) { return M * dropout_groups(K); }

cudaError_t launch_dropout_keep_bits(uint8_t* bits, int64_t M, int64_t K, float p, uint64_t seed,
                                     const int64_t* seed_ptr, uint64_t offset, cudaStream_t stream) {
  if (M <= 0 || K <= 0) return cudaSuccess;
  const int64_t words = ceil_div(dropout_keep_bits_bytes(M, K), DB_GROUPS);
  // enough blocks to fill every SM at full occupancy, fewer where there is less work
  const int64_t blocks = std::min<int64_t>(ceil_div(words, kThreads), (int64_t)num_sms() * (2048 / kThreads));
  return launch_kernel(dropout_keep_bits_kernel, dim3((unsigned)blocks), kThreads, 0, stream, bits, M, K,
                       dropout_threshold(p), seed, seed_ptr, offset);
}

cudaError_t launch_dropout_keep_bits_kept(uint8_t* bits, const void* x, void* kept, DType x_dtype, int64_t M,
                                          int64_t K, float p, uint64_t seed, const int64_t* seed_ptr, uint64_t offset,
                                          cudaStream_t stream) {
  if (M <= 0 || K <= 0) return cudaSuccess;
  if (K % 8 || reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(kept) % 16 ||
      x_dtype == DType::kFloat32)
    return cudaErrorInvalidValue;
  const int64_t words = ceil_div(dropout_keep_bits_bytes(M, K), DB_GROUPS);
  return with_dtype16(x_dtype, [&](auto xt) -> cudaError_t {
    using T = decltype(xt);
    // one resident wave (its registers allow fewer blocks per SM than the bits kernel's), each thread looping
    const int resident = resident_blocks(reinterpret_cast<const void*>(dropout_keep_bits_kept_kernel<T>), kThreads, 0);
    const int64_t blocks = std::min<int64_t>(ceil_div(words, kThreads), (int64_t)num_sms() * resident);
    return launch_kernel(dropout_keep_bits_kept_kernel<T>, dim3((unsigned)blocks), kThreads, 0, stream, bits,
                         static_cast<const T*>(x), static_cast<T*>(kept), M, K, dropout_threshold(p), seed, seed_ptr,
                         offset);
  });
}

}  // namespace lora_kernels
