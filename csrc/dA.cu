// dA pass of the backward: per-row-split partials of dA = scaling * g^T dropout(x) (r, K), the mask regenerated
// (launch_reduce_partials sums the partials). FFMA kernel (fp32 x), tensor-core kernel (16-bit x, sm_80+),
// launch_lora_dA; the split plan is lora_dA_plan (plans.cu).
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------------------------
// lora_dA: dA_partial[s] (r, K) = sum over rows of s of g[m, :]^T (scale * keep * x[m, :]), scale = scaling/(1-p).
// Block (s, c) walks its rows in sub-blocks of DA_BM (g sub-block in shared memory) and its columns in chunks of
// DA_KC (x chunk with the mask regenerated, one Philox call per 4 elements). Outputs owned by one block: no atomics.
constexpr int DA_BM = 32, DA_KC = 32;
constexpr int DA_MAXO = DA_KC * kMaxRank / kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads)
lora_dA_kernel(const T* __restrict__ x, const float* __restrict__ g, float* __restrict__ dA_partial, int64_t M,
               int64_t K, int r, int64_t rows_per_split, int64_t cols_per_group, float scale, float p,
               uint64_t seed, const int64_t* seed_ptr, uint64_t offset) {
  if (p > 0.f) seed = dropout_seed(seed, seed_ptr);
  extern __shared__ float smem[];
  float* xs = smem;               // [DA_BM][DA_KC]
  float* gs = xs + DA_BM * DA_KC;  // [DA_BM][r]
  const int tid = threadIdx.x;
  const Span rows = block_span(blockIdx.x, rows_per_split, M), cols = block_span(blockIdx.y, cols_per_group, K);
  const int64_t row_begin = rows.begin, row_end = rows.end, col_begin = cols.begin, col_end = cols.end;
  float* dAp = dA_partial + (int64_t)blockIdx.x * r * K;
  const int nout = DA_KC * r;

  for (int64_t m0 = row_begin; m0 < row_end; m0 += DA_BM) {
    const bool first = (m0 == row_begin);
    load_rows<DA_BM>(gs, g, m0, row_end, r);
    for (int64_t k0 = col_begin; k0 < col_end; k0 += DA_KC) {
      for (int gi = tid; gi < DA_BM * (DA_KC / 4); gi += kThreads) {
        const int mm = gi / (DA_KC / 4), g4 = gi % (DA_KC / 4);
        const int64_t m = m0 + mm;
        float v[4];
        load_x4_dropout<T>(x, m < row_end ? M : 0, K, m, k0 + 4 * g4, p, seed, offset, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) xs[mm * DA_KC + 4 * g4 + q] = v[q] * scale;
      }
      __syncthreads();
      for_outputs<DA_MAXO>(nout, [&](int, int o) {  // output o = (row j, column k0 + kk)
        const int j = o / DA_KC, kk = o % DA_KC;
        const int64_t k = k0 + kk;
        if (k < col_end) {
          const float s = fma_dot<DA_BM>(0.f, gs, j, r, xs, kk, DA_KC);
          add_partial(dAp + (int64_t)j * K + k, s, first);
        }
      });
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dA (tensor cores).
// Math   : dA_partial[s][j, k] = scale * sum over the rows m of split s of g[m, j] (keep * x)[m, k],
//          scale = scaling / (1 - p); g and masked x as T, fp32 accumulation, scale applied to the fp32 result.
// Tiling : block (s, c, z) = row split s x column group c (TA_KC (128)-column strips) x r-chunk z (RC = 16*NJ).
//          For each strip it walks the split's rows in TA_BM (64)-row tiles: x tiles through the cp.async ring
//          (mask applied in place, its Philox work done before the tile lands), the g tile (-> T)
//          register-prefetched two tiles ahead into a double buffer.
//          Warp w owns columns 16w..16w+15 of the strip x all RC rows of dA (g^T = the g tile read by
//          ldmatrix.trans), accumulators in registers across the rows, written once per strip (scaled).
//          fp32 adapters on bf16 x (P = 3): the g tile is staged as its three bf16x3 pieces; per tile, piece 0
//          and pieces 1-2 go to two fresh accumulators added to the running one with fp32 adds (add_acc), so dA
//          is the fp32 product PyTorch computes, to fp32 FFMA accuracy.
// Bytes  : one read of x (M*K*2) per r-chunk; g re-read from L2 once per strip; partials row_splits*r*K*4.
// Smem   : 3 * 64 * 136 * 2 + 2 * P * 64 * (RC + 8) * 2 = 58.4 KB at RC = 16, 70.7 KB at RC = 64 (P = 1); 70.7 /
//          107.5 KB (P = 3).

template <typename T, int NJ, int P>
__global__ void __launch_bounds__(kTcThreads, NJ == 1 ? kStreamMinBlocks : (P > 1 && NJ == 4) ? 1 : 2)
lora_dA_tc_kernel(const T* __restrict__ x, const float* __restrict__ g, float* __restrict__ dA_partial, int64_t M,
                  int64_t K, int r, int64_t rows_per_split, int64_t cols_per_group, float scale, float p,
                  uint64_t seed, const int64_t* seed_ptr, uint64_t offset, const uint8_t* __restrict__ keep8) {
#if LK_TC_ARCH
  constexpr int RC = 16 * NJ, LDG = RC + 8;
  static_assert(TA_KC == 16 * (kTcThreads / 32), "one 16-column strip per warp");
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* xs = reinterpret_cast<T*>(lk_smem);  // [kStages][TA_BM][TA_LDX]: x tiles (B operand stored [k][n])
  T* gs = xs + kStages * TA_BM * TA_LDX;  // [2][P][TA_BM][LDG]: g tiles (A operand g^T stored [k][m]), double-buffered
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const Span rows = block_span(blockIdx.x, rows_per_split, M), cols = block_span(blockIdx.y, cols_per_group, K);
  const int64_t row_begin = rows.begin, row_end = rows.end, col_begin = cols.begin, col_end = cols.end;
  const int j0 = blockIdx.z * RC;
  float* dAp = dA_partial + (int64_t)blockIdx.x * r * K;
  const int64_t n_rt = row_end > row_begin ? (row_end - row_begin + TA_BM - 1) / TA_BM : 0;
  const int64_t n_tiles = col_end > col_begin ? (col_end - col_begin + TA_KC - 1) / TA_KC * n_rt : 0;

  // Full tiles of 16-byte aligned rows take the fast paths (no per-group bounds / alignment checks).
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && K % 8 == 0 && col_begin % 8 == 0;
  const bool g_vec = reinterpret_cast<uintptr_t>(g) % 16 == 0 && r % 4 == 0 && j0 + RC <= r;
  using XTile = StreamTile<T, TA_BM, TA_KC, TA_LDX>;
  auto issue = [&](int64_t t) {  // tiles: strip t / n_rt (outer), row tile t % n_rt (inner)
    const int64_t m0 = row_begin + t % n_rt * TA_BM, k0 = col_begin + t / n_rt * TA_KC;
    XTile::issue(xs + (int)(t % kStages) * TA_BM * TA_LDX, x, K, m0, k0,
                 x_vec && m0 + TA_BM <= row_end && k0 + TA_KC <= col_end, row_end, col_end);
  };
  SideTile<float, TA_BM, RC> g_regs;
  auto fetch_g = [&](int64_t t) {  // g tile t (rows m0.., columns j0..) into registers
    const int64_t m0 = row_begin + t % n_rt * TA_BM;
    g_regs.fetch(g, r, m0, j0, g_vec && m0 + TA_BM <= row_end, row_end, r);
  };
  auto stash_g = [&](int64_t t) {
    g_regs.template stash<T, P>(gs + (int)(t % 2) * P * TA_BM * LDG, LDG, TA_BM * LDG);
  };

  const uint64_t sd = p > 0.f ? dropout_seed(seed, seed_ptr) : 0;
  const uint32_t thr = dropout_threshold(p);
  // Fragment dropout where its registers fit (as in the shrink): one r-chunk of 16, or fp32 adapters.
  constexpr bool kFragKeep = NJ == 1 || P > 1;
  float acc[NJ][2][4];
  pipeline_start(n_tiles, issue, fetch_g, stash_g, [] {});
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t rt = t % n_rt;
    const int64_t m0 = row_begin + rt * TA_BM, k0 = col_begin + t / n_rt * TA_KC;
    T* slot = xs + (int)(t % kStages) * TA_BM * TA_LDX;
    const T* gb = gs + (int)(t % 2) * P * TA_BM * LDG;
    // The mask: from the keep bits on this warp's fragments (FragKeepT, loaded before the wait), else Philox work
    // before the wait (it overlaps the copies in flight) applied to the landed tile.
    const bool frag_keep = kFragKeep && p > 0.f && keep8 != nullptr;
    FragKeepT<T, TA_BM> fk;
    if (frag_keep) {
      fk.load(keep8, m0, M, K, k0, warp, tid & 31);
      pipeline_wait(t, n_tiles, issue, [] {});
    } else {
      uint32_t keep[XTile::kGroups];
      if (p > 0.f) {
        if (keep8 != nullptr) XTile::load_keep_bits(keep, keep8, m0, M, K, k0);
        else XTile::keep_bits(keep, m0, K, k0, thr, sd, offset);
      }
      pipeline_wait(t, n_tiles, issue, [&] {
        if (p > 0.f) XTile::apply_keep(slot, keep);
      });
    }
    if (rt == 0) {
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[jf][n][q] = 0.f;
    }
    // This tile's products into hi (piece 0) and low (pieces 1-2 of a bf16x3-split g; with P = 1 both are acc).
    auto mma_tile = [&](float(&hi)[NJ][2][4], float(&low)[NJ][2][4]) {
#pragma unroll
      for (int mb = 0; mb < TA_BM / 16; ++mb) {
        uint32_t b[4];
        ldsm4_t(b, slot + (16 * mb + lo.r1) * TA_LDX + 16 * warp + lo.c1);
        if constexpr (kFragKeep)
          if (frag_keep) fk.apply(mb, b);
#pragma unroll
        for (int jf = 0; jf < NJ; ++jf)
#pragma unroll
          for (int pc = 0; pc < P; ++pc) {
            uint32_t a[4];  // (g^T)[j, m]: the g tile (piece pc) read transposed
            ldsm4_t(a, gb + pc * TA_BM * LDG + (16 * mb + lo.r2) * LDG + 16 * jf + lo.c2);
            float(&d)[NJ][2][4] = pc == 0 ? hi : low;
            mma16816x2<T>(d[jf][0], d[jf][1], a, b);
          }
      }
    };
    if constexpr (P > 1) {  // chains of one tile, piece 0 apart, added to acc with fp32 adds (add_acc)
      float part[NJ][2][4], low[NJ][2][4];
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf) {
        zero_acc(part[jf]);
        zero_acc(low[jf]);
      }
      mma_tile(part, low);
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf) {
        add_acc(part[jf], low[jf]);
        add_acc(acc[jf], part[jf]);
      }
    } else {
      mma_tile(acc, acc);
    }
    pipeline_next(t, n_tiles, fetch_g, stash_g);
    if (rt == n_rt - 1) {  // strip done: dA partial rows j0.., columns k0 + 16w.. written once
#pragma unroll
      for (int jf = 0; jf < NJ; ++jf)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int j = j0 + 16 * jf + lo.g + 8 * h;
            const int64_t k = k0 + 16 * warp + 8 * n + 2 * lo.t;
            if (j < r)
              st2f(dAp + (int64_t)j * K + k, col_end - k, acc[jf][n][2 * h] * scale, acc[jf][n][2 * h + 1] * scale);
          }
    }
  }
#else
  __trap();
#endif
}

}  // namespace

namespace {
// f(kernel, smem, T{}): the tensor-core dA kernel for these dtypes and rank, with its shared memory.
template <typename F>
cudaError_t with_dA_tc_kernel(DType x_dtype, DType a_dtype, int r, F&& f) {
  const int nj = rank_frags(r), pieces = adapter_pieces(x_dtype, a_dtype);
  return with_dtype16(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return with_rank_frags(nj, [&](auto njc) {
      return with_pieces<T>(pieces, [&](auto pc) {
        return f(lora_dA_tc_kernel<T, decltype(njc)::value, decltype(pc)::value>, dA_tc_smem(16 * nj, pc.value), xt);
      });
    });
  });
}

// Whether dA takes the tensor-core kernel: stream_pass_on_tc, and its shared memory within the device's.
bool dA_on_tc(DType x_dtype, DType a_dtype, int r) {
  return stream_pass_on_tc(x_dtype, a_dtype) &&
         dA_tc_smem(16 * rank_frags(r), adapter_pieces(x_dtype, a_dtype)) <= smem_per_block();
}
}  // namespace

int lora_dA_resident_blocks(DType x_dtype, DType a_dtype, int r) {
  if (r < 1 || r > kMaxRank || !dA_on_tc(x_dtype, a_dtype, r)) return 2;  // the FFMA kernel: about two
  return tc_resident_blocks([&](auto&& f) { return with_dA_tc_kernel(x_dtype, a_dtype, r, f); });
}

cudaError_t launch_lora_dA(const void* x, DType x_dtype, DType a_dtype, const float* g, float* dA_partial, int64_t M,
                           int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed,
                           const int64_t* seed_ptr, uint64_t offset, const uint8_t* keep8, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || K <= 0 || plan.row_splits <= 0) return cudaSuccess;
  if (plan.col_groups > 65535) return cudaErrorInvalidConfiguration;
  const float scale = dropout_scale(scaling, p);
  if (dA_on_tc(x_dtype, a_dtype, r)) {
    if (plan.row_splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const int nj = rank_frags(r);
    const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)ceil_div(round16(r), 16 * nj));
    return with_dA_tc_kernel(x_dtype, a_dtype, r, [&](auto kernel, size_t smem, auto xt) {
      using T = decltype(xt);
      return launch_kernel(kernel, grid, kTcThreads, smem, stream, static_cast<const T*>(x), g, dA_partial, M, K, r,
                           plan.rows_per_split, plan.cols_per_group, scale, p, seed, seed_ptr, offset, keep8);
    });
  }
  const size_t smem = (size_t)(DA_BM * DA_KC + DA_BM * r) * sizeof(float);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups);
  return with_dtype(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return launch_kernel(lora_dA_kernel<T>, grid, kThreads, smem, stream, static_cast<const T*>(x), g, dA_partial, M,
                         K, r, plan.rows_per_split, plan.cols_per_group, scale, p, seed, seed_ptr, offset);
  });
}

}  // namespace lora_kernels
