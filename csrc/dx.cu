// dx pass of the backward: dx = scaling * keep / (1 - p) * (g A) (M, K), written once before cuBLAS accumulates
// dy W into it (beta = 1). FFMA kernel (fp32 x), tensor-core kernel (16-bit x, sm_80+), launch_lora_dx.
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------------------------
// lora_dx: dx (M, K) = scale * keep * (g A), scale = scaling / (1 - p), written once (never read): cuBLAS
// then accumulates dy W into it with beta = 1. Tile DX_BM x DX_KC; thread owns one 4-group (one Philox call,
// vector store when aligned); r in chunks of DX_RC through shared memory.
constexpr int DX_BM = 32, DX_KC = 32, DX_RC = 32;
static_assert(DX_BM * DX_KC / 4 == kThreads, "one 4-group per thread");

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_dx_kernel(T* __restrict__ dx, const float* __restrict__ g, const TA* __restrict__ A, int64_t M, int64_t K,
                   int r, float scale, float p, uint64_t seed, const int64_t* seed_ptr, uint64_t offset) {
  __shared__ float gs[DX_BM][DX_RC + 1];
  __shared__ float as[DX_RC][DX_KC + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * DX_BM;
  const int64_t k0 = (int64_t)blockIdx.y * DX_KC;
  const int mm = tid / (DX_KC / 4), g4 = tid % (DX_KC / 4);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r0 = 0; r0 < r; r0 += DX_RC) {
    load_rchunk<DX_BM, DX_RC>(gs, g, m0, M, r, r0);
    for (int i = tid; i < DX_RC * DX_KC; i += kThreads) {
      const int jj = i / DX_KC, kk = i % DX_KC;
      const int64_t k = k0 + kk;
      as[jj][kk] = (r0 + jj < r && k < K) ? to_f<TA>(A[(int64_t)(r0 + jj) * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < DX_RC; ++jj) {
      const float gv = gs[mm][jj];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fmaf(gv, as[jj][4 * g4 + q], acc[q]);
    }
    __syncthreads();
  }
  const int64_t m = m0 + mm, k = k0 + 4 * g4;
  if (m >= M || k >= K) return;
  const int valid = (K - k < 4 ? (int)(K - k) : 4);
  bool keep[4] = {true, true, true, true};
  if (p > 0.f) dropout_keep4(dropout_seed(seed, seed_ptr), offset, m, K, k, p, keep);
  float v[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) v[q] = keep[q] ? acc[q] * scale : acc[q] * scale * 0.f;  // NaN/inf -> NaN
  store4<T>(dx + m * K + k, valid, v);
}

// lora_dx (tensor cores).
// Math   : dx (M, K) = scale * keep * (g A), scale = scaling / (1 - p); g and A cast to T, fp32 accumulation,
//          round(acc * scale) then the dropped elements zeroed (one Philox call per 8-group, straight-line code for
//          all of a thread's groups, so that their Philox chains interleave); written once.
// Tiling : the output-writing shape (expand.cu); A chunk stored [j][k] (row-major B operand).
// Bytes  : one write of dx (M*K*2); g read once per column group, A once per 128 rows (L2).
// Smem   : 128 * (RP + 8) * 2 + 2 * RP * 72 * 2 + 18 KB = 29.2 KB at r = 16, 55.3 KB at r = 64.
template <typename T, typename TA>
__global__ void __launch_bounds__(kTcThreads, kOutputMinBlocks)
lora_dx_tc_kernel(T* __restrict__ dx, const float* __restrict__ g, const TA* __restrict__ A, int64_t M,
                          int64_t K, int r, int64_t chunks_per_group, float scale, float p, uint64_t seed,
                          const int64_t* seed_ptr, uint64_t offset, const uint8_t* __restrict__ keep8) {
#if LK_TC_ARCH
  if (p > 0.f) seed = dropout_seed(seed, seed_ptr);
  constexpr int LDA = TO_BN + 8;
  const int RP = round16(r), na4 = RP * (TO_BN / 4);
  // left: g rows (A operand, row-major); right: A chunks (B operand stored [k][n]), RP x LDA each.
  const OutputBlock<T> blk(g, M, r, RP + 8, RP * LDA, K, chunks_per_group);
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  auto load_a = [&](int64_t k0, int gi) {
    const int j = gi / (TO_BN / 4), c = gi % (TO_BN / 4) * 4;
    const int64_t k = k0 + c;
    return ld4<TA>(A + (int64_t)j * K + k, j < r ? n_valid(K - k, 4) : 0);
  };
  // Full, aligned chunks take the fast paths (no per-group bounds / alignment checks).
  const bool a_vec = reinterpret_cast<uintptr_t>(A) % sizeof(Vec4<TA>) == 0 && K % 4 == 0;
  const bool dx_vec = reinterpret_cast<uintptr_t>(dx) % 16 == 0 && K % 8 == 0 && blk.m0 + TO_BM <= M;
  Vec4<TA> ar[kPrefetch];
  auto fetch_a = [&](int64_t ch) {  // chunk ch's A columns into registers (the prefetched part)
    const int64_t k0 = ch * TO_BN;
    if (a_vec && k0 + TO_BN <= K) {
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        const int gi = tid + i * kTcThreads, j = gi / (TO_BN / 4), c = gi % (TO_BN / 4) * 4;
        if (gi < na4) ar[i] = j < r ? *reinterpret_cast<const Vec4<TA>*>(A + (int64_t)j * K + k0 + c) : ld4<TA>(A, 0);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i)
      if (tid + i * kTcThreads < na4) ar[i] = load_a(k0, tid + i * kTcThreads);
  };
  auto stash_a = [&](int64_t ch) {  // chunk ch's A -> its buffer (prefetched part from registers)
    T* ab = blk.right_buf(ch);
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      const int gi = tid + i * kTcThreads;
      if (gi < na4) *reinterpret_cast<uint2*>(ab + gi / (TO_BN / 4) * LDA + gi % (TO_BN / 4) * 4) = to_t4<T, TA>(ar[i]);
    }
    if (na4 > kPrefetch * kTcThreads) {  // r > 64: A rows 64.. of the chunk
      const int row1 = kPrefetch * kTcThreads / (TO_BN / 4);
      load_tile_as_t<T, TA>(ab + row1 * LDA, LDA, A + (int64_t)row1 * K + ch * TO_BN, K, RP - row1, TO_BN / 4,
                            r - row1, (int)min64(K - ch * TO_BN, TO_BN));
    }
  };
  const uint32_t thr = dropout_threshold(p);
  blk.template run<false>(LDA, RP, lo, warp, fetch_a, stash_a, [&](float(&acc)[TO_BN / 8][4], int64_t k0) {
#pragma unroll
    for (int n = 0; n < TO_BN / 8; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(blk.os + (16 * warp + lo.g + 8 * h) * TO_LDO + 8 * n + 2 * lo.t) =
            pack2<T>(acc[n][2 * h] * scale, acc[n][2 * h + 1] * scale);
    const bool full = dx_vec && k0 + TO_BN <= K;
    if (p > 0.f && keep8 != nullptr) {  // k starts an 8-group: its keep byte (launch_dropout_keep_bits)
      const int64_t K8 = dropout_groups(K);
      store_staged_rows<TO_BN>(dx, K, blk.os, TO_LDO, blk.m0, k0, M, K, full, [&](uint4 v, int64_t m, int64_t k) {
        return drop8<T>(v, m < M && k < K ? (uint32_t)__ldg(keep8 + m * K8 + k / kDropoutGroup) : 0xFFu);
      });
    } else if (p > 0.f) {  // k (a chunk's column, k0 + 8j) starts an 8-group: one Philox call, no branch between the groups
      store_staged_rows<TO_BN>(dx, K, blk.os, TO_LDO, blk.m0, k0, M, K, full, [&](uint4 v, int64_t m, int64_t k) {
        return drop8<T>(v, dropout_keep_bits8(seed, dropout_counter(offset, m, K, k / kDropoutGroup), thr));
      });
    } else {
      store_staged_rows<TO_BN>(dx, K, blk.os, TO_LDO, blk.m0, k0, M, K, full,
                               [](uint4 v, int64_t, int64_t) { return v; });
    }
  });
#else
  __trap();
#endif
}

}  // namespace

cudaError_t launch_lora_dx(void* dx, DType x_dtype, const float* g, const void* A, DType a_dtype, int64_t M,
                               int64_t K, int r, float scaling, float p, uint64_t seed, const int64_t* seed_ptr,
                               uint64_t offset, const uint8_t* keep8, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || K <= 0) return cudaSuccess;
  const float scale = dropout_scale(scaling, p);
  return launch_output_pass<DX_BM, DX_KC>(x_dtype, a_dtype, M, K, dx_tc_smem(round16(r)),
                                          [&](auto xt, auto at, auto grid) {
    using T = decltype(xt);
    using TA = decltype(at);
    if constexpr (std::is_same<decltype(grid), OutputGrid>::value)
      return launch_kernel(lora_dx_tc_kernel<T, TA>, grid.grid, kTcThreads, dx_tc_smem(round16(r)), stream,
                           static_cast<T*>(dx), g, static_cast<const TA*>(A), M, K, r, grid.chunks_per_group, scale,
                           p, seed, seed_ptr, offset, keep8);
    else
      return launch_kernel(lora_dx_kernel<T, TA>, grid, kThreads, 0, stream, static_cast<T*>(dx), g,
                           static_cast<const TA*>(A), M, K, r, scale, p, seed, seed_ptr, offset);
  });
}

}  // namespace lora_kernels
