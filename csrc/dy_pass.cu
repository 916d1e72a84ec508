// dy pass of the backward, one read of dy for two products: g = dy B (M, r) fp32, and per-row-split partials of
// dB = dy^T u (launch_reduce_partials sums them). FFMA kernel (fp32 dy), tensor-core kernel (16-bit dy, sm_80+),
// launch_lora_dy_pass; the split plan is lora_dy_pass_plan (plans.cu).
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------------------------
// lora_dy_pass: one pass over dy. Block (s, c) walks its rows in sub-blocks of DP_BM and its columns in chunks of
// DP_BN: g_out[c][m, :] = sum over its columns dy[m, n] B[n, :] (registers, written once per row sub-block);
// dB_partial[s][n, :] = sum over its rows dy[m, n] u[m, :] (written by the first row sub-block, added to by the
// next ones; every element is owned by one block, so no atomics and a fixed order).
constexpr int DP_BM = 32, DP_BN = 32;
constexpr int DP_MAXO = DP_BM * kMaxRank / kThreads;  // = DP_BN * kMaxRank / kThreads
static_assert(DP_BM == DP_BN, "dy pass assumes square tiles for its per-thread output count");

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
lora_dy_pass_kernel(const T* __restrict__ dy, const TB* __restrict__ B, const float* __restrict__ u,
                    float* __restrict__ g_out, float* __restrict__ dB_partial, int64_t M, int64_t N, int r,
                    int64_t rows_per_split, int64_t cols_per_group) {
  extern __shared__ float smem[];
  float* dys = smem;                          // [DP_BM][DP_BN + 1]
  float* bs = dys + DP_BM * (DP_BN + 1);      // [DP_BN][r]
  float* us = bs + DP_BN * r;                 // [DP_BM][r]
  const int tid = threadIdx.x;
  const Span rows = block_span(blockIdx.x, rows_per_split, M), cols = block_span(blockIdx.y, cols_per_group, N);
  const int64_t row_begin = rows.begin, row_end = rows.end, col_begin = cols.begin, col_end = cols.end;
  float* g = g_out + (int64_t)blockIdx.y * M * r;
  float* dBp = dB_partial ? dB_partial + (int64_t)blockIdx.x * N * r : nullptr;
  const int nout = DP_BM * r;

  for (int64_t m0 = row_begin; m0 < row_end; m0 += DP_BM) {
    const bool first = (m0 == row_begin);
    if (dBp) load_rows<DP_BM>(us, u, m0, row_end, r);
    float gacc[DP_MAXO];
#pragma unroll
    for (int i = 0; i < DP_MAXO; ++i) gacc[i] = 0.f;

    for (int64_t n0 = col_begin; n0 < col_end; n0 += DP_BN) {
      for (int i = tid; i < DP_BM * DP_BN; i += kThreads) {
        const int mm = i / DP_BN, nn = i % DP_BN;
        const int64_t m = m0 + mm, n = n0 + nn;
        dys[mm * (DP_BN + 1) + nn] = (m < row_end && n < col_end) ? to_f<T>(dy[m * N + n]) : 0.f;
      }
      for (int i = tid; i < DP_BN * r; i += kThreads) {
        const int64_t n = n0 + i / r;
        bs[i] = n < col_end ? to_f<TB>(B[n * r + (i % r)]) : 0.f;
      }
      __syncthreads();
      for_outputs<DP_MAXO>(nout, [&](int i, int o) {  // g: output o = (row m0 + mm, column j)
        const int mm = o / r, j = o % r;
        gacc[i] = fma_dot<DP_BN>(gacc[i], dys, mm * (DP_BN + 1), 1, bs, j, r);
      });
      if (dBp) {
        for_outputs<DP_MAXO>(nout, [&](int, int o) {  // dB: output o = (row n0 + nn, column j)
          const int nn = o / r, j = o % r;
          const int64_t n = n0 + nn;
          if (n < col_end) {
            const float s = fma_dot<DP_BM>(0.f, dys, nn, DP_BN + 1, us, j, r);
            add_partial(dBp + n * r + j, s, first);
          }
        });
      }
      __syncthreads();
    }
    for_outputs<DP_MAXO>(nout, [&](int i, int o) {
      const int64_t m = m0 + o / r;
      if (m < row_end) g[m * r + (o % r)] = gacc[i];
    });
    __syncthreads();  // us is rewritten by the next row sub-block
  }
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dy_pass (tensor cores): g and the dB partials from one read of dy.
// Math   : g_out[c][m, j] = sum over the columns n of group c of dy[m, n] B[n, j]        (g = dy B)
//          dB_partial[s][n, j] = sum over the rows m of split s of dy[m, n] u[m, j]      (dB = dy^T u)
//          for j in the block's r-chunk (RC = 16*NJ <= 64 columns, grid.z); dy, B, u as T, fp32 accumulation.
// Tiling : block (s, c, z) walks its rows in TD_BM (128)-row tiles (outer) and its columns in TD_BN (64)-column
//          chunks (inner); each 128 x 64 dy tile arrives through the cp.async ring and is used twice:
//            warps 0-3: g  += dy_tile x B_chunk; warp w owns rows 32w..32w+31 x RC in registers across the
//                       chunks of a row tile, written once per row tile;
//            warps 4-7: dB += dy_tile^T x u_tile (the same tile read transposed by ldmatrix.trans); warp 4+q owns
//                       columns 16q..16q+15 of the chunk. The fp32 dB accumulators of the block's whole column
//                       group live in shared memory (dBs), updated once per tile by their owning warp (fixed
//                       order), and are written once to the block's own partial at the end. No atomics.
//          The B chunk (-> T) is register-prefetched two tiles ahead into a double buffer; the u tile (128 x RC,
//          -> T, double-buffered) is loaded at the end of each row tile's last chunk for the next row tile.
//          fp32 adapters on bf16 dy (P = 3): B and u are staged as their three bf16x3 pieces; per tile, piece 0
//          and pieces 1-2 go to two fresh accumulators, added to the running ones with fp32 adds (add_acc; dB's
//          tile product is always added so), for g and dB as PyTorch's fp32 products to fp32 FFMA accuracy;
//          r-chunks of at most 32 columns, one block per SM then.
// Bytes  : one read of dy (M*N*2) per r-chunk; partial writes row_splits*N*r*4 (+ col_groups*M*r*4 if > 1 group),
//          read back once by launch_reduce_partials. lora_dy_pass_plan balances the two partial terms.
// Smem   : 55.3 KB (dy ring) + 2*P*192*(RC+8)*2 + cols_per_group*(RC+8)*4 (dy_pass_tc_smem; the plan sizes the
//          column groups with it): 110.6 KB at r = 16 with 384-column groups.

#if LK_TC_ARCH
// The B fragments of the 16 rows 16 kb.. of a side tile stored [k][n] (row pitch ld; P pieces of a bf16x3 split,
// piece_stride apart): for the NJ 16-column blocks jf and the pieces pc, mma(jf, pc, fragment) (ldsm4_t).
template <int NJ, int P, typename T, typename F>
__device__ __forceinline__ void side_frags(const T* tile, int piece_stride, int ld, int kb, const LaneOffsets& lo,
                                           F&& mma) {
#pragma unroll
  for (int jf = 0; jf < NJ; ++jf)
#pragma unroll
    for (int pc = 0; pc < P; ++pc) {
      uint32_t b[4];
      ldsm4_t(b, tile + pc * piece_stride + (16 * kb + lo.r1) * ld + 16 * jf + lo.c1);
      mma(jf, pc, b);
    }
}
#endif

template <typename T, typename TB, int NJ>
__global__ void __launch_bounds__(kTcThreads, NJ == 4 || kPieces<T, TB> > 1 ? 1 : 2)
lora_dy_pass_tc_kernel(const T* __restrict__ dy, const TB* __restrict__ B, const float* __restrict__ u,
                       float* __restrict__ g_out, float* __restrict__ dB_partial, int64_t M, int64_t N, int r,
                       int64_t rows_per_split, int64_t cols_per_group) {
#if LK_TC_ARCH
  constexpr int RC = 16 * NJ, LDR = RC + 8, LDD = RC + 8, P = kPieces<T, TB>;
  static_assert(TD_BM == 4 * 32 && TD_BN == 4 * 16, "warps 0-3 own 32 rows each, warps 4-7 16 columns each");
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* dys = reinterpret_cast<T*>(lk_smem);                   // [kStages][TD_BM][TD_LDY]: dy tiles
  T* bs = dys + kStages * TD_BM * TD_LDY;  // [2][P][TD_BN][LDR]: B chunks (B operand stored [k][n]), per tile
  T* us = bs + 2 * P * TD_BN * LDR;        // [2][P][TD_BM][LDR]: u tiles (B operand stored [k][n]), per row tile
  float* dBs = reinterpret_cast<float*>(us + 2 * P * TD_BM * LDR);  // [cc][LDD]: dB accumulators of the group
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const Span rows = block_span(blockIdx.x, rows_per_split, M), cols = block_span(blockIdx.y, cols_per_group, N);
  const int64_t row_begin = rows.begin, row_end = rows.end, col_begin = cols.begin, col_end = cols.end;
  const int j0 = blockIdx.z * RC;
  const bool do_dB = dB_partial != nullptr;
  float* g = g_out + (int64_t)blockIdx.y * M * r;
  float* dBp = do_dB ? dB_partial + (int64_t)blockIdx.x * N * r : nullptr;
  const int64_t cc = (cols_per_group + TD_BN - 1) / TD_BN * TD_BN;
  const int64_t n_ct = row_end > row_begin && col_end > col_begin ? (col_end - col_begin + TD_BN - 1) / TD_BN : 0;
  const int64_t n_tiles = n_ct > 0 ? (row_end - row_begin + TD_BM - 1) / TD_BM * n_ct : 0;

  if (do_dB)
    for (int64_t i = tid; i < cc * LDD; i += kTcThreads) dBs[i] = 0.f;

  // Full tiles of 16-byte aligned rows take the fast paths (no per-group bounds / alignment checks).
  const bool dy_vec = reinterpret_cast<uintptr_t>(dy) % 16 == 0 && N % 8 == 0 && col_begin % 8 == 0;
  const bool b_vec = reinterpret_cast<uintptr_t>(B) % sizeof(Vec4<TB>) == 0 && r % 4 == 0 && j0 + RC <= r;
  using DyTile = StreamTile<T, TD_BM, TD_BN, TD_LDY>;
  auto issue = [&](int64_t t) {  // tiles: row tile t / n_ct (outer), column chunk t % n_ct (inner)
    const int64_t m0 = row_begin + t / n_ct * TD_BM, n0 = col_begin + t % n_ct * TD_BN;
    DyTile::issue(dys + (int)(t % kStages) * TD_BM * TD_LDY, dy, N, m0, n0,
                  dy_vec && m0 + TD_BM <= row_end && n0 + TD_BN <= col_end, row_end, col_end);
  };
  SideTile<TB, TD_BN, RC> b_regs;
  auto fetch_b = [&](int64_t t) {  // B chunk of tile t (rows n0.., columns j0..) into registers
    const int64_t n0 = col_begin + t % n_ct * TD_BN;
    b_regs.fetch(B, r, n0, j0, b_vec && n0 + TD_BN <= col_end, col_end, r);
  };
  auto stash_b = [&](int64_t t) {
    b_regs.template stash<T, P>(bs + (int)(t % 2) * P * TD_BN * LDR, LDR, TD_BN * LDR);
  };
  auto load_u = [&](int64_t rt) {  // u rows of row tile rt -> us buffer rt % 2 (cast to T, or its P pieces)
    const int64_t m0 = row_begin + rt * TD_BM;
#pragma unroll
    for (int pc = 0; pc < P; ++pc)
      load_tile_as_t<T, float>(us + ((int)(rt % 2) * P + pc) * TD_BM * LDR, LDR, u + m0 * r + j0, r, TD_BM, RC / 4,
                               row_end - m0, r - j0, P > 1 ? pc : -1);
  };

  // Warps 0-3: acc[i][n] = g rows 32w + 16i (+0..15) x columns j0 + 8n (+0..7). Warps 4-7: acc[0][n] = dB rows
  // 16(w-4) (+0..15) of the current chunk x columns j0 + 8n, loaded from / stored to dBs around each tile.
  float acc[2][2 * NJ][4];
  pipeline_start(n_tiles, issue, fetch_b, stash_b, [&] {
    if (do_dB) load_u(0);
  });
  // Per tile t: wait for dy tile t, one barrier (tile t, B chunk t and the row tile's u complete; tile t-1's reads
  // done), refill the freed ring slot, multiply, then stage B chunk t+1 (and u of the next row tile) into the other
  // buffers.
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t ct = t % n_ct, rt = t / n_ct;
    const int64_t m0 = row_begin + rt * TD_BM, n0 = col_begin + ct * TD_BN;
    const T* slot = dys + (int)(t % kStages) * TD_BM * TD_LDY;
    const T* bb = bs + (int)(t % 2) * P * TD_BN * LDR;
    const T* ub = us + (int)(rt % 2) * P * TD_BM * LDR;
    pipeline_wait(t, n_tiles, issue, [] {});

    if (warp < 4) {
      if (ct == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int n = 0; n < 2 * NJ; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][n][q] = 0.f;
      }
      // This tile's products into hi (piece 0) and low (pieces 1-2 of a bf16x3-split B; with P = 1 both are acc).
      auto mma_g = [&](float(&hi)[2][2 * NJ][4], float(&low)[2][2 * NJ][4]) {
#pragma unroll
        for (int nb = 0; nb < TD_BN / 16; ++nb) {
          uint32_t a0[4], a1[4];
          ldsm4(a0, slot + (32 * warp + lo.r1) * TD_LDY + 16 * nb + lo.c1);
          ldsm4(a1, slot + (32 * warp + 16 + lo.r1) * TD_LDY + 16 * nb + lo.c1);
          side_frags<NJ, P>(bb, TD_BN * LDR, LDR, nb, lo, [&](int jf, int pc, const uint32_t(&b)[4]) {
            float(&d)[2][2 * NJ][4] = pc == 0 ? hi : low;
            mma16816x2<T>(d[0][2 * jf], d[0][2 * jf + 1], a0, b);
            mma16816x2<T>(d[1][2 * jf], d[1][2 * jf + 1], a1, b);
          });
        }
      };
      if constexpr (P > 1) {  // chains of one tile, piece 0 apart, added to acc with fp32 adds (add_acc)
        float part[2][2 * NJ][4], low[2][2 * NJ][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          zero_acc(part[i]);
          zero_acc(low[i]);
        }
        mma_g(part, low);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          add_acc(part[i], low[i]);
          add_acc(acc[i], part[i]);
        }
      } else {
        mma_g(acc, acc);
      }
      if (ct == n_ct - 1) {  // row tile done: its g rows written once
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int n = 0; n < 2 * NJ; ++n) {
            const int j = j0 + 8 * n + 2 * lo.t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t m = m0 + 32 * warp + 16 * i + lo.g + 8 * h;
              if (m < row_end) st2f(g + m * r + j, r - j, acc[i][n][2 * h], acc[i][n][2 * h + 1]);
            }
          }
      }
    } else if (do_dB) {
      const int nb = warp - 4;
      float* dacc = dBs + (n0 - col_begin + 16 * nb) * LDD;
      // The tile's product starts from zero and is added to the shared accumulators with fp32 adds: the tensor
      // cores' fp32 accumulation truncates, so chains through them are kept to one tile (128 rows).
      // P > 1: piece 0 into acc[0], pieces 1-2 into acc[1] (unused by these warps), added before the store.
      zero_acc(acc[0]);
      zero_acc(acc[1]);
#pragma unroll
      for (int mb = 0; mb < TD_BM / 16; ++mb) {
        uint32_t a[4];  // (dy^T)[n, m]: the dy tile read transposed
        ldsm4_t(a, slot + (16 * mb + lo.r2) * TD_LDY + 16 * nb + lo.c2);
        side_frags<NJ, P>(ub, TD_BM * LDR, LDR, mb, lo, [&](int jf, int pc, const uint32_t(&b)[4]) {
          mma16816x2<T>(acc[pc == 0 ? 0 : 1][2 * jf], acc[pc == 0 ? 0 : 1][2 * jf + 1], a, b);
        });
      }
      if constexpr (P > 1) add_acc(acc[0], acc[1]);
#pragma unroll
      for (int n = 0; n < 2 * NJ; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float2* d = reinterpret_cast<float2*>(dacc + (lo.g + 8 * h) * LDD + 8 * n + 2 * lo.t);
          const float2 v = *d;
          *d = make_float2(v.x + acc[0][n][2 * h], v.y + acc[0][n][2 * h + 1]);
        }
    }
    pipeline_next(t, n_tiles, fetch_b, stash_b);
    if (do_dB && ct == n_ct - 1 && t + 1 < n_tiles) load_u(rt + 1);
  }
  if (do_dB) {  // the block's dB partial rows [col_begin, col_end), columns of the r-chunk: written once
    __syncthreads();
    for (int64_t i = tid; i < cc * (RC / 4); i += kTcThreads) {
      const int64_t nn = i / (RC / 4);
      const int c = (int)(i % (RC / 4)) * 4;
      const int64_t n = col_begin + nn;
      const int valid = n < col_end ? n_valid(r - (j0 + c), 4) : 0;
      if (valid > 0) {
        const float4 s = *reinterpret_cast<const float4*>(dBs + nn * LDD + c);
        const float v[4] = {s.x, s.y, s.z, s.w};
        store4<float>(dBp + n * r + j0 + c, valid, v);
      }
    }
  }
#else
  __trap();
#endif
}

}  // namespace

cudaError_t launch_lora_dy_pass(const void* dy, DType dy_dtype, const void* B, DType b_dtype, const float* u,
                                float* g_out, float* dB_partial, int64_t M, int64_t N, int r, SplitPlan plan,
                                cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || plan.row_splits <= 0) return cudaSuccess;
  if (dB_partial && !u) return cudaErrorInvalidValue;
  if (plan.col_groups > 65535) return cudaErrorInvalidConfiguration;
  const int pieces = adapter_pieces(dy_dtype, b_dtype);
  // the tensor-core kernel where its shared memory for this plan fits the device's (lora_dy_pass_plan)
  if (stream_pass_on_tc(dy_dtype, b_dtype) &&
      dy_pass_tc_smem(dy_pass_rank_chunk(r, pieces), plan.cols_per_group, pieces) <= smem_per_block()) {
    if (N <= 0)  // g = dy B = 0; the dB partials have no elements
      return cudaMemsetAsync(g_out, 0, (size_t)std::max<int64_t>(plan.col_groups, 1) * M * r * sizeof(float), stream);
    if (plan.row_splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const int nj = dy_pass_rank_chunk(r, pieces) / 16;
    const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)ceil_div(round16(r), 16 * nj));
    return with_dtypes<true>(dy_dtype, b_dtype, [&](auto dt, auto bt) {
      using T = decltype(dt);
      using TB = decltype(bt);
      return with_rank_frags(nj, [&](auto njc) {
        if constexpr (kPieces<T, TB> > 1 && decltype(njc)::value > 2)  // not launched (dy_pass_rank_chunk)
          return cudaErrorInvalidConfiguration;
        else
          return launch_kernel(lora_dy_pass_tc_kernel<T, TB, decltype(njc)::value>, grid, kTcThreads,
                               dy_pass_tc_smem(16 * nj, plan.cols_per_group, pieces), stream,
                               static_cast<const T*>(dy), static_cast<const TB*>(B), u, g_out, dB_partial, M, N, r,
                               plan.rows_per_split, plan.cols_per_group);
      });
    });
  }
  const size_t smem = (size_t)(DP_BM * (DP_BN + 1) + DP_BN * r + DP_BM * r) * sizeof(float);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups);
  return with_dtypes<false>(dy_dtype, b_dtype, [&](auto dt, auto bt) {
    using T = decltype(dt);
    using TB = decltype(bt);
    return launch_kernel(lora_dy_pass_kernel<T, TB>, grid, kThreads, smem, stream, static_cast<const T*>(dy),
                         static_cast<const TB*>(B), u, g_out, dB_partial, M, N, r, plan.rows_per_split,
                         plan.cols_per_group);
  });
}

}  // namespace lora_kernels
