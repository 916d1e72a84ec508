// Shrink pass of the forward: u = scaling * dropout(x) A^T (M, r) fp32, the rank-r input of the expand pass and of
// the dB product; with a K split (small M) per-split partials that launch_reduce_partials sums.
// FFMA kernel (fp32 x), tensor-core kernel (16-bit x, sm_80+), launch_lora_shrink.
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------------------------
// lora_shrink: u (M, r) = scale * (x * keep) A^T, scale = scaling / (1 - p). Block = SH_BM rows, loops over K in
// chunks of SH_KC; x chunk (with mask, one Philox call per 4 elements) and A chunk staged in shared memory.
constexpr int SH_BM = 32, SH_KC = 64;
constexpr int SH_MAXO = SH_BM * kMaxRank / kThreads;  // outputs per thread at r = 256

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_shrink_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ u_out, int64_t M, int64_t K,
                   int r, int64_t k_per_split, float scale, float p, uint64_t seed, const int64_t* seed_ptr,
                   uint64_t offset) {
  if (p > 0.f) seed = dropout_seed(seed, seed_ptr);
  extern __shared__ float smem[];
  float* xs = smem;                  // [SH_BM][SH_KC]
  float* as = smem + SH_BM * SH_KC;  // [r][SH_KC + 1]
  const int tid = threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * SH_BM;
  const int nout = SH_BM * r;
  // K split s (blockIdx.y) owns columns [s * k_per_split, ...) and writes its own partial u_out[s] (M, r).
  const int64_t k_begin = (int64_t)blockIdx.y * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  float* u = u_out + (int64_t)blockIdx.y * M * r;
  float acc[SH_MAXO];
#pragma unroll
  for (int i = 0; i < SH_MAXO; ++i) acc[i] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += SH_KC) {
    for (int gi = tid; gi < SH_BM * (SH_KC / 4); gi += kThreads) {
      const int mm = gi / (SH_KC / 4), g4 = gi % (SH_KC / 4);
      float v[4];
      load_x4_dropout<T>(x, M, K, m0 + mm, k0 + 4 * g4, p, seed, offset, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) xs[mm * SH_KC + 4 * g4 + q] = v[q];
    }
    for (int i = tid; i < r * SH_KC; i += kThreads) {
      const int j = i / SH_KC, kk = i % SH_KC;
      const int64_t k = k0 + kk;
      as[j * (SH_KC + 1) + kk] = k < K ? to_f<TA>(A[(int64_t)j * K + k]) : 0.f;
    }
    __syncthreads();
    for_outputs<SH_MAXO>(nout, [&](int i, int o) {
      const float* xr = xs + (o / r) * SH_KC;
      const float* ar = as + (o % r) * (SH_KC + 1);
      float s = acc[i];
#pragma unroll 16
      for (int kk = 0; kk < SH_KC; ++kk) s = fmaf(xr[kk], ar[kk], s);
      acc[i] = s;
    });
    __syncthreads();
  }
  for_outputs<SH_MAXO>(nout, [&](int i, int o) {
    const int64_t m = m0 + o / r;
    if (m < M) u[m * r + (o % r)] = acc[i] * scale;
  });
}

// ---------------------------------------------------------------------------------------------------------------
// lora_shrink (tensor cores).
// Math   : u[c] (M, r) = scale * (keep * x)[:, K-split c] A^T[K-split c], scale = scaling / (1 - p).
// Tiling : block = TS_BM (128) rows x RC = 16*NF (<= 64) columns of u (grid.z walks r in RC-chunks) x one K split
//          (grid.y), looping over K in TS_KC (64)-column tiles: x tiles through the cp.async ring (mask applied
//          in place, one Philox call per 8-group, computed before the tile lands; or, given the keep bits of
//          launch_dropout_keep_bits, applied to each warp's A fragments: FragKeep), the A tile (cast to T)
//          register-prefetched two tiles ahead into a double buffer. Warp w: rows 16w..16w+15 x all RC columns
//          (2*NF m16n8 fp32 accumulators), written once at the end (scaled). fp32 A on bf16 x: the A tile is
//          staged as its P = 3 bf16x3 pieces; per tile, piece 0 and pieces 1-2 go to two fresh accumulators, added
//          to the running one with fp32 adds (add_acc), for fp32 FFMA accuracy; 3x the mma work of 16-bit A.
// Bytes  : one read of x (M*K*2) per r-chunk; A re-read from L2 once per 128 rows; u (M*r*4) written once per
//          K split (launch_reduce_partials sums the splits).
// Smem   : (3 * 128 + 2 * P * RC) * 72 * 2 B = 59.9 / 64.5 / 73.7 KB for NF = 1 / 2 / 4 (P = 1), 64.5 / 78.3 /
//          110.6 KB (P = 3).

template <typename T, typename TA, int NF>
__global__ void __launch_bounds__(kTcThreads, NF == 1 ? kStreamMinBlocks : (kPieces<T, TA> > 1 && NF == 4) ? 1 : 2)
lora_shrink_tc_kernel(const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ u_out, int64_t M,
                      int64_t K, int r, int64_t k_per_split, float scale, float p, uint64_t seed,
                      const int64_t* seed_ptr, uint64_t offset, const uint8_t* __restrict__ keep8) {
#if LK_TC_ARCH
  constexpr int RC = 16 * NF, P = kPieces<T, TA>;
  static_assert(TS_BM == 16 * (kTcThreads / 32), "one 16-row strip per warp");
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* xs = reinterpret_cast<T*>(lk_smem);  // [kStages][TS_BM][TS_LD]: x tiles (A operand, row-major)
  T* as = xs + kStages * TS_BM * TS_LD;   // [2][P][RC][TS_LD]: A rows j0.. (B operand stored [n][k]), double-buffered
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t m0 = (int64_t)blockIdx.x * TS_BM;
  const int64_t k_begin = (int64_t)blockIdx.y * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  const int j0 = blockIdx.z * RC;
  float* u = u_out + (int64_t)blockIdx.y * M * r;
  const int64_t n_tiles = k_end > k_begin ? (k_end - k_begin + TS_KC - 1) / TS_KC : 0;

  // Full tiles of 16-byte aligned rows take the fast paths (no per-group bounds / alignment checks).
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && K % 8 == 0 && k_begin % 8 == 0;
  const bool a_vec = reinterpret_cast<uintptr_t>(A) % sizeof(Vec4<TA>) == 0 && K % 4 == 0 && k_begin % 4 == 0;
  const bool rows_full = m0 + TS_BM <= M;
  using XTile = StreamTile<T, TS_BM, TS_KC, TS_LD>;
  auto issue = [&](int64_t t) {  // cp.async of x tile t into its ring slot
    const int64_t k0 = k_begin + t * TS_KC;
    XTile::issue(xs + (int)(t % kStages) * TS_BM * TS_LD, x, K, m0, k0, x_vec && rows_full && k0 + TS_KC <= k_end, M,
                 k_end);
  };
  SideTile<TA, RC, TS_KC> a_regs;
  auto fetch_a = [&](int64_t t) {  // A tile t (rows j0.., columns k0..) into registers
    const int64_t k0 = k_begin + t * TS_KC;
    a_regs.fetch(A, K, j0, k0, a_vec && j0 + RC <= r && k0 + TS_KC <= k_end, r, k_end);
  };
  auto stash_a = [&](int64_t t) {
    a_regs.template stash<T, P>(as + (int)(t % 2) * P * RC * TS_LD, TS_LD, RC * TS_LD);
  };

  const uint64_t sd = p > 0.f ? dropout_seed(seed, seed_ptr) : 0;
  const uint32_t thr = dropout_threshold(p);
  float acc[2 * NF][4];
  zero_acc(acc);
  pipeline_start(n_tiles, issue, fetch_a, stash_a, [] {});
  // The products of one tile, its A fragments transformed by a_op (the keep bits' dropout, or nothing). The
  // fragment dropout (FragKeep) where its registers fit: one r-chunk of 16 columns, or the fp32 adapters' kernels
  // (one block per SM); elsewhere (16-bit adapters at r > 16, 128 registers) it spilled, and the keep bytes mask the
  // tile in shared memory instead.
  constexpr bool kFragKeep = NF == 1 || P > 1;
  auto mma_tile = [&](const T* slot, const T* ab, const auto& a_op) {
    if constexpr (P > 1) {  // chains of one tile, piece 0 apart from the others (add_acc)
      float hi[2 * NF][4], low[2 * NF][4];
      zero_acc(hi);
      zero_acc(low);
      warp_rows_mma<T, RC, true, TS_KC / 16, P>(hi, slot, TS_LD, ab, TS_LD, TS_KC, lo, warp, RC * TS_LD, low, a_op);
      add_acc(hi, low);
      add_acc(acc, hi);
    } else {
      warp_rows_mma<T, RC, true, TS_KC / 16>(acc, slot, TS_LD, ab, TS_LD, TS_KC, lo, warp, 0, nullptr, a_op);
    }
  };
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t k0 = k_begin + t * TS_KC;
    T* slot = xs + (int)(t % kStages) * TS_BM * TS_LD;
    const T* ab = as + (int)(t % 2) * P * RC * TS_LD;
    if (kFragKeep && p > 0.f && keep8 != nullptr) {  // the keep bits of this warp's rows, loaded before the wait
      FragKeep<T, TS_KC> fk;
      fk.load(keep8, m0 + 16 * warp + lo.g, M, K, k0, lo.t);
      pipeline_wait(t, n_tiles, issue, [] {});
      mma_tile(slot, ab, fk);
    } else {
      uint32_t keep[XTile::kGroups];  // the mask's loads or Philox work before the wait: they overlap the copies
      if (p > 0.f) {
        if (keep8 != nullptr) XTile::load_keep_bits(keep, keep8, m0, M, K, k0);
        else XTile::keep_bits(keep, m0, K, k0, thr, sd, offset);
      }
      pipeline_wait(t, n_tiles, issue, [&] {
        if (p > 0.f) XTile::apply_keep(slot, keep);
      });
      mma_tile(slot, ab, NoFragOp{});
    }
    pipeline_next(t, n_tiles, fetch_a, stash_a);
  }
#pragma unroll
  for (int n = 0; n < 2 * NF; ++n) {
    const int j = j0 + 8 * n + 2 * lo.t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + 16 * warp + lo.g + 8 * h;
      if (m < M) st2f(u + m * r + j, r - j, acc[n][2 * h] * scale, acc[n][2 * h + 1] * scale);
    }
  }
#else
  __trap();
#endif
}

}  // namespace

static_assert(TS_KC == SH_KC, "the shrink plan's K groups are whole chunks of both shrink kernels");

namespace {
// f(kernel, smem, T{}, TA{}): the tensor-core shrink kernel for these dtypes and rank, with its shared memory.
template <typename F>
cudaError_t with_shrink_tc_kernel(DType x_dtype, DType a_dtype, int r, F&& f) {
  const int nf = rank_frags(r), pieces = adapter_pieces(x_dtype, a_dtype);
  return with_dtypes<true>(x_dtype, a_dtype, [&](auto xt, auto at) {
    using T = decltype(xt);
    using TA = decltype(at);
    return with_rank_frags(nf, [&](auto nfc) {
      return f(lora_shrink_tc_kernel<T, TA, decltype(nfc)::value>, shrink_tc_smem(nf, pieces), xt, at);
    });
  });
}

// Whether the shrink takes the tensor-core kernel: stream_pass_on_tc, and its shared memory within the device's.
bool shrink_on_tc(DType x_dtype, DType a_dtype, int r) {
  return stream_pass_on_tc(x_dtype, a_dtype) &&
         shrink_tc_smem(rank_frags(r), adapter_pieces(x_dtype, a_dtype)) <= smem_per_block();
}
}  // namespace

int lora_shrink_resident_blocks(DType x_dtype, DType a_dtype, int r) {
  if (r < 1 || r > kMaxRank || !shrink_on_tc(x_dtype, a_dtype, r)) return 2;  // the FFMA kernel: about two
  return tc_resident_blocks([&](auto&& f) { return with_shrink_tc_kernel(x_dtype, a_dtype, r, f); });
}

cudaError_t launch_lora_shrink(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out, int64_t M,
                               int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed,
                               const int64_t* seed_ptr, uint64_t offset, const uint8_t* keep8, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0) return cudaSuccess;
  if (plan.col_groups > 65535 || plan.col_groups < 1) return cudaErrorInvalidConfiguration;
  const float scale = dropout_scale(scaling, p);
  if (shrink_on_tc(x_dtype, a_dtype, r)) {
    const int nf = rank_frags(r);
    const dim3 grid((unsigned)ceil_div(M, TS_BM), (unsigned)plan.col_groups, (unsigned)ceil_div(round16(r), 16 * nf));
    return with_shrink_tc_kernel(x_dtype, a_dtype, r, [&](auto kernel, size_t smem, auto xt, auto at) {
      using T = decltype(xt);
      using TA = decltype(at);
      return launch_kernel(kernel, grid, kTcThreads, smem, stream, static_cast<const T*>(x),
                           static_cast<const TA*>(A), u_out, M, K, r, plan.cols_per_group, scale, p, seed, seed_ptr,
                           offset, keep8);
    });
  }
  const size_t smem = (size_t)(SH_BM * SH_KC + r * (SH_KC + 1)) * sizeof(float);
  const dim3 grid((unsigned)ceil_div(M, SH_BM), (unsigned)plan.col_groups);
  return with_dtypes<false>(x_dtype, a_dtype, [&](auto xt, auto at) {
    using T = decltype(xt);
    using TA = decltype(at);
    return launch_kernel(lora_shrink_kernel<T, TA>, grid, kThreads, smem, stream, static_cast<const T*>(x),
                         static_cast<const TA*>(A), u_out, M, K, r, plan.cols_per_group, scale, p, seed, seed_ptr,
                         offset);
  });
}

}  // namespace lora_kernels
