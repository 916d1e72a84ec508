// The dropout mask of an (M, K) input as keep bits, one byte per 8-group: bits[m * K8 + k8] bit q is set iff element
// (m, 8 * k8 + q) is kept (K8 = ceil(K / 8)), the same mask as philox.cuh's dropout_keep_bits8 (the contract).
// Why a pass of its own: inside the streaming passes (shrink, dA, dx) the mask's Philox chains compete for issue
// slots with the copies and the MMAs at 24 resident warps per SM, and those passes ran 2-2.5x slower with dropout
// than without it. Here every thread runs independent chains at full occupancy (the 32-bit multiplies decide the
// time), and the passes read one byte per 8 elements instead (1/16 of x's bytes at 16-bit x). Making the bits in the
// sm_90 shrink and dA was measured twice more (session 33, 8192 x 4096, r = 16): in the loader warpgroup the shrink
// ran 64 and dA 66 us, in the threads that apply the mask 57 and 77 us, against 30 and 37 us plus 21 for this pass;
// at 12 resident warps per SM the Philox chains cannot keep the multiply pipe busy. The bits are a
// temporary of one forward or one backward: the backward regenerates them from the seed, once for dA and dx.
// launch_dropout_keep_bits; dropout_bits_used says where the binding makes them.
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

}  // namespace lora_kernels
