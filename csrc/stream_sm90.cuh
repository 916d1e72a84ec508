// The Hopper (sm_90a) streaming kernel of the backward's dy pass (dy_pass_sm90.cu) and dA pass (dA_sm90.cu) and of
// the forward's shrink (shrink_sm90.cu):
// one read of a 16-bit (M, N) matrix `a` in 128 x 64 tiles, each tile multiplied on wgmma by thin side operands
// staged as P bf16x3 pieces (or cast, P = 1) by the prep kernel. See dy_pass_sm90.cu for the math and the tiling.
#pragma once
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"
#include "wgmma.cuh"

#include <atomic>
#include <type_traits>

namespace lora_kernels {
namespace detail {
namespace {

constexpr int DS_BM = 128, DS_BN = 64, DS_THREADS = 384;
constexpr int DS_BITS = DS_BM * DS_BN / 8;  // a tile's keep bits: 128 rows of 8 bytes

enum StreamMode : int { kDy = 0, kDA = 1, kShrink = 2 };

// A ring stage: the 128 x 64 tile of `a`, the side chunk of the G product (dy pass, shrink; NW rows of 64) and, in
// the shrink, the tile's keep bits.
constexpr int ds_stage_bytes(int mode, int nw) {
  return DS_BM * DS_BN * 2 + (mode == kDA ? 0 : nw * 128) + (mode == kShrink ? DS_BITS : 0);
}
// Ring depth: 4 stages (6 and 8 ran no faster on the H200, and this loader alone, with consumers that only release,
// reads at a plain read's rate: bench/results/h200_2026-12-02/session22), 3 for dA's 192-wide side operand (its Up
// double buffer takes 96 KB), so that its plans fit in shared memory. dA with dropout (masked) holds each stage one
// step longer (loader -> masking warpgroup -> D warpgroup), so where its side operand is narrow (NW <= 48: r <= 16,
// or r <= 32 at one piece) it keeps 6 stages in flight to cover the same memory latency (with the masking's reads
// batched: 37.1 / 34.3 against 41.4 / 39.4 us at 8192 x 4096, r = 16, fp32 / bf16 adapters; H200, session 31).
constexpr int ds_stages(int mode, int nw, bool masked = false) {
  return mode == kDA && nw > 96 ? 3 : mode == kDA && masked && nw <= 48 ? 6 : 4;
}

struct DsShape {
  int pieces, rj, z, nw;
};
// dA at r <= 16 (one r-chunk of RJ = 16): warpgroup 1, which has no product there, writes each row tile's Up into
// shared memory from g itself, and the pass needs no prep launch (8192 x 4096, three pieces: 27.0 against 28.9 us
// with the prep; session 28). At RJ = 64 that conversion, each thread reading its own row of g, outlasted the row
// tile's products (three pieces: 130 against 51 us; one piece: 94 against 49 us at 8192 x 4096 -> 1024), so there
// the prep launch makes the pieces and the loader copies them, as in the dy pass.
constexpr bool ds_up_from_g(int mode, int rj) { return mode == kDA && rj == 16; }
// r-chunk of RJ columns and the chunk count. The shrink splits G's two 64-row halves over two warpgroups, so one
// warpgroup's accumulators hold NW / 2 of one half, and dA has only the D product (NW / 2 per thread), so r up to 64
// is one chunk (one read of x) at any P; the dy pass keeps both of G's halves in one warpgroup beside D (RJ 16 or 32
// with three pieces).
DsShape ds_shape(int r, int pieces, StreamMode mode) {
  const int rj = (pieces > 1 && mode == kDy) ? (r <= 16 ? 16 : 32) : (r <= 16 ? 16 : r <= 32 ? 32 : 64);
  return DsShape{pieces, rj, (int)ceil_div(r, rj), pieces * rj};
}
constexpr int ds_ldd(int rj) { return rj + 4; }  // dB row pitch (floats) in shared memory
// Column tiles a pass needs: each column group spans at least stages - 1 tiles (the Up double buffer's parity waits
// rely on the loader never being two row tiles ahead).
inline int64_t ds_min_col_tiles(int r, int pieces, StreamMode mode, bool masked = false) {
  return ds_stages(mode, ds_shape(r, pieces, mode).nw, masked) - 1;
}
// mbarriers, alignment, the ring of {a tile, side chunk}; with the D product (dy pass, dA) also the double-buffered
// Up row tile and the column group's D sums; dA with dropout (masked) also a ring of the tiles' keep bits and its
// masked[] mbarriers.
size_t ds_smem(const DsShape& s, StreamMode mode, int64_t tiles_per_group, bool masked = false) {
  const int stages = ds_stages(mode, s.nw, masked);
  const size_t ring = 16 * stages + 32 + 1024 + (size_t)stages * ds_stage_bytes(mode, s.nw);
  if (mode == kShrink) return ring;
  const size_t bits = mode == kDA && masked ? (size_t)stages * (DS_BITS + 16) : 0;
  return ring + (size_t)2 * 2 * 128 * s.nw + bits + (size_t)tiles_per_group * DS_BN * ds_ldd(s.rj) * 4;
}

// Bp / Up: row (z, pc, j) of Bp holds piece pc of B[:, z*RJ + j] (zero past N and r; b_rows: of the row z*RJ + j of
// an (r, N) B, as lora_A is), of Up piece pc of u[:, ..].
// Block (x, y): DS_PREP consecutive elements e (columns of Bp, then of Up) x 8 columns j of B (or u), j = 8 y ..
// (r-chunk y / (RJ / 8)). Thread e reads its 8 values (32 contiguous bytes) and writes their P pieces, one row
// each: a warp's stores to a row are contiguous.
constexpr int DS_PREP = 128;
template <typename T, typename TB, int P>
__global__ void __launch_bounds__(DS_PREP)
dy_sm90_prep_kernel(const TB* __restrict__ B, const float* __restrict__ u, T* __restrict__ bp, T* __restrict__ up,
                    int64_t M, int64_t N, int r, int rj, int64_t npad, int64_t mpad, bool b_rows) {
#if LK_TC_ARCH
  pdl_launch_dependents();  // the pass launched next may set up under this launch (it waits for it)
  const int64_t bp_blocks = npad / DS_PREP;
  const bool is_b = blockIdx.x < bp_blocks;
  const int64_t e = (is_b ? blockIdx.x : blockIdx.x - bp_blocks) * (int64_t)DS_PREP + threadIdx.x;
  const int64_t len = is_b ? npad : mpad;
  const bool in = e < (is_b ? N : M);
  const int j8 = 8 * blockIdx.y, z = j8 / rj, jr = j8 % rj;  // global column j8 + q; row (z, pc, jr + q)
  float v[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int j = j8 + q;
    v[q] = in && j < r ? (is_b ? to_f<TB>(b_rows ? B[j * N + e] : B[e * r + j]) : u[e * r + j]) : 0.f;
  }
  T* out = (is_b ? bp : up) + ((int64_t)z * P * rj + jr) * len + e;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    if constexpr (P > 1) {
      __nv_bfloat16 pc[3];
      bf16x3_split(v[q], pc);
#pragma unroll
      for (int i = 0; i < 3; ++i) out[((int64_t)i * rj + q) * len] = pc[i];
    } else {
      out[(int64_t)q * len] = from_f<T>(v[q]);
    }
  }
#else
  __trap();
#endif
}

// MODE kDy: a = dy (M, N), G with Bp into g_out, D with Up into d_out = the dB partials [s][n][j].
// MODE kDA: a = x (M, N = K), D with Up = g's pieces into d_out = the dA partials [s][j][k], times `scale`. Where
//           ds_up_from_g, warpgroup 1 builds each row tile's Up from g_in (fp32 (M, r), row-major): no `up`.
//           MASKED (dropout; keep8, as the shrink's, must be given): warpgroup 1 masks each landed x tile in shared
//           memory before the D warpgroup's wgmma reads it (the mask off the D product's critical path).
// MODE kShrink: a = x (M, N = K), G with Bp = lora_A's pieces into g_out = u's K-split partials [c][m][j] times
//           `scale`, x masked first by the keep bits when given (keep8: row m at keep8 + m * ceil(N / 8), bit k % 8 of
//           byte k / 8); warpgroup 1 takes the tile's rows 0-63, warpgroup 2 rows 64-127.
template <int MODE, typename T, int P, int RJ, bool MASKED = false>
__global__ void __launch_bounds__(DS_THREADS, 1)
stream_sm90_kernel(const T* __restrict__ dy, const T* __restrict__ bp, const T* __restrict__ up,
                   float* __restrict__ g_out, float* __restrict__ dB_partial, int64_t M, int64_t N, int r,
                   int64_t npad, int64_t mpad, const uint8_t* __restrict__ keep8, float scale,
                   const float* __restrict__ g_in, int beside) {
#if LK_WGMMA
  constexpr int NW = P * RJ, LDD = ds_ldd(RJ), DY_BYTES = DS_BM * DS_BN * 2, STAGE = ds_stage_bytes(MODE, NW);
  constexpr int DS_STAGES = ds_stages(MODE, NW, MASKED);
  constexpr int UP_BYTES = 2 * NW * 128;  // one row tile of Up: two 64-row K blocks
  constexpr int PT = 128;                 // producer threads (warpgroup 0)
  extern __shared__ unsigned char ds_smem_raw[];
  // mbarriers first: full[s] (the stage's copies landed), empty[s] (its products done), up_free[b] (the Up buffer's
  // row tile done), up_full[b] (dA: warpgroup 1's stores of the Up buffer's row tile done); then the 1024-byte-aligned
  // tiles.
  const uint32_t raw = smem_addr(ds_smem_raw);
  const uint32_t bar_full = raw, bar_empty = raw + 8 * DS_STAGES, bar_up = raw + 16 * DS_STAGES;
  const uint32_t bar_upf = bar_up + 16;
  const uint32_t tiles = raw + 16 * DS_STAGES + 32, pad = (1024 - (tiles & 1023)) & 1023;
  const uint32_t s_ring = tiles + pad, s_up = s_ring + DS_STAGES * STAGE;
  // dA with dropout: the keep bits ring (a tile's 1 KB per stage) and masked[s] (warpgroup 1 masked the stage's tile)
  constexpr bool da_masked = MODE == kDA && MASKED;
  const uint32_t s_bits = s_up + 2 * UP_BYTES, bar_mask = s_bits + DS_STAGES * DS_BITS;
  float* dBs = reinterpret_cast<float*>(ds_smem_raw + ((da_masked ? bar_mask + 16 * DS_STAGES : s_bits) - raw));

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int64_t tiles_m = (M + DS_BM - 1) / DS_BM, tiles_n = (N + DS_BN - 1) / DS_BN;
  const int64_t rt0 = tiles_m * blockIdx.x / gridDim.x, rt1 = tiles_m * (blockIdx.x + 1) / gridDim.x;
  const int64_t ct0 = tiles_n * blockIdx.y / gridDim.y, ct1 = tiles_n * (blockIdx.y + 1) / gridDim.y;
  const int64_t row_begin = rt0 * DS_BM, row_end = min64(M, rt1 * DS_BM);
  const int64_t col_begin = ct0 * DS_BN, col_end = min64(N, ct1 * DS_BN);
  const int n_ct = (int)(ct1 - ct0);
  const int n_tiles = (int)(rt1 - rt0) * n_ct;
  const int j0 = blockIdx.z * RJ;
  const bool do_dB = MODE != kShrink && dB_partial != nullptr;
  constexpr bool kG = MODE != kDA;  // the G product (dy pass, shrink)
  // dA (ds_up_from_g): warpgroup 1 (no product there) writes each row tile's Up (g's rows as x's type, or their P
  // bf16x3 pieces) into shared memory itself, where the loader copies the prep's Up tile; it stays out of the ring.
  constexpr bool kUpFromG = ds_up_from_g(MODE, RJ);
  // With N % 32 == 0 the loader copies each tile's keep bits into the stage (4-byte copies, each wholly inside or
  // past the row); otherwise the masking warpgroup reads them from global memory.
  const bool bits_staged = (MODE == kShrink || da_masked) && keep8 != nullptr && N % 32 == 0;
  // a stage's keep bits: after the shrink's side chunk in the stage, in dA's ring of its own
  auto bits_at = [&](int stage_) -> uint32_t {
    return MODE == kShrink ? s_ring + stage_ * STAGE + DY_BYTES + NW * 128 : s_bits + stage_ * DS_BITS;
  };
  const int64_t kb = (N + 7) / 8;  // keep bytes per row
  // The shrink's masked A operand: this warp's 16 rows of the warpgroup's 64-row half (rows row0 + 16 warp ..) of a
  // landed x tile, read into wgmma's register fragments (ldmatrix, one m16 x k16 block per k-step ks) and multiplied
  // by their keep bits, 1 or 0 per element (mul_keep2: exactly x * keep, so a dropped NaN stays NaN as in the
  // reference). The register-A wgmma takes them as they are: no write back to shared memory, no proxy fence and no
  // warpgroup barrier on the way to the products. Keep bits: the stage's copy (bits_staged) or keep8.
  auto masked_frags = [&](uint32_t (&af)[DS_BN / 16][4], uint32_t s_a, int rt_, int ct_, int row0) {
    const int ra = row0 + 16 * warp + (lane >> 2);  // this thread's rows ra and ra + 8 of the tile
    FragKeep<T, DS_BN> keep;
    if (bits_staged)
      keep.load_staged(ds_smem_raw + (s_a + DY_BYTES + NW * 128 - raw), ra, lane & 3);
    else
      keep.load(keep8, row_begin + (int64_t)rt_ * DS_BM + ra, M, N, col_begin + (int64_t)ct_ * DS_BN, lane & 3);
#pragma unroll
    for (int ks = 0; ks < DS_BN / 16; ++ks) {
      // lane l addresses row l % 16, chunk 2 ks + l / 16: af[ks] = (row ra, chunk 2 ks), (ra + 8, 2 ks),
      // (ra, 2 ks + 1), (ra + 8, 2 ks + 1), each the pair of columns 2 tq, 2 tq + 1 of its chunk
      ldsm4(af[ks], s_a + sw128_offset(row0 + 16 * warp + (lane & 15), 2 * ks + (lane >> 4)));
      keep(ks, af[ks]);
    }
  };

  if (tid == 0) {
    for (int s = 0; s < DS_STAGES; ++s) {
      mbar_init(bar_full + 8 * s, PT);  // every producer thread's copies
      mbar_init(bar_empty + 8 * s, kUpFromG || da_masked ? 4 : 8);  // lane 0 of each consumer warp (dA: of wg 2)
      if (da_masked) mbar_init(bar_mask + 8 * s, 4);  // lane 0 of each masking warp
    }
    mbar_init(bar_up, 4);  // lane 0 of each dB warp
    mbar_init(bar_up + 8, 4);
    mbar_init(bar_upf, PT);  // every thread of dA's Up warpgroup
    mbar_init(bar_upf + 8, PT);
  }
  if (do_dB)
    for (int i = tid; i < n_ct * DS_BN * LDD; i += DS_THREADS) dBs[i] = 0.f;
  // Launched as a programmatic dependent of its prep launch (launch_kernel_pdl): the setup above ran under the prep's
  // tail; its staged pieces (and everything before it) are visible from here on. `beside` (dA beside the dx GEMM,
  // launched after it): the GEMM let this launch start once the launch before the GEMM was complete and visible
  // (early_dependents), and this pass reads nothing the GEMM writes; it waits for the GEMM at its end instead, so that
  // it completes after it and the stream's order holds for every later launch.
  if (!beside) pdl_wait();
  __syncthreads();

  // Tiles go round the ring in order: tile t in stage t % DS_STAGES, its round t / DS_STAGES picks the parity.
  // Counters (tile row, column, stage, round parity) advance by one per tile, so a tile costs no division.
  auto next_tile = [n_ct](int& rt_, int& ct_, int& stage_, int& round_) {
    if (++ct_ == n_ct) {
      ct_ = 0;
      ++rt_;
    }
    if (++stage_ == DS_STAGES) {
      stage_ = 0;
      ++round_;
    }
  };
  if (wg == 0) {
    // Producer: each thread's 16-byte chunks sit at fixed offsets from a tile's corner.
    constexpr int DY_CH = DS_BM * 8 / PT, BP_CH = (NW * 8 + PT - 1) / PT, UP_CH = (NW * 16 + PT - 1) / PT;
    const T* bpz = bp + (int64_t)blockIdx.z * NW * npad;
    const T* upz = up + (int64_t)blockIdx.z * NW * mpad;
    int rt = 0, ct = 0, stage = 0, round = 0;
    for (int t = 0; t < n_tiles; ++t) {
      mbar_wait(bar_empty + 8 * stage, (round & 1) ^ 1);  // the stage's previous tile consumed
      const int64_t m0 = row_begin + (int64_t)rt * DS_BM, n0 = col_begin + (int64_t)ct * DS_BN;
      const uint32_t s_st = s_ring + stage * STAGE;
      const T* dy0 = dy + m0 * N + n0;
      const int rows = (int)min64(DS_BM, row_end - m0), cols = (int)min64(DS_BN, col_end - n0);
#pragma unroll
      for (int q = 0; q < DY_CH; ++q) {  // rows past the split or columns past the group: zeros
        const int i = tid + q * PT, row = i >> 3, c = i & 7;
        const bool ok = row < rows && 8 * c < cols;
        cp_async16(s_st + sw128_offset(row, c), ok ? dy0 + (int64_t)row * N + 8 * c : dy, ok ? 16 : 0);
      }
#pragma unroll
      for (int q = 0; q < BP_CH; ++q) {
        const int i = tid + q * PT, row = i >> 3, c = i & 7;
        if (kG && i < NW * 8)
          cp_async16(s_st + DY_BYTES + sw128_offset(row, c), bpz + (int64_t)row * npad + n0 + 8 * c, 16);
      }
      if (bits_staged) {  // the tile's keep bits: row `tid`, two 4-byte words (zero-filled past the rows or columns)
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const bool ok = tid < rows && 32 * w < cols;
          cp_async4(bits_at(stage) + tid * 8 + 4 * w,
                    ok ? keep8 + (m0 + tid) * kb + n0 / 8 + 4 * w : keep8, ok ? 4 : 0);
        }
      }
      if (!kUpFromG && do_dB && ct == 0) {  // the row tile's Up tile, once the buffer's row tile two back is done
        mbar_wait(bar_up + 8 * (rt & 1), ((rt >> 1) & 1) ^ 1);
        const uint32_t s_u = s_up + (rt & 1) * UP_BYTES;
#pragma unroll
        for (int q = 0; q < UP_CH; ++q) {
          const int i = tid + q * PT, row = i >> 4, c = i & 15;
          if (i < NW * 16)
            cp_async16(s_u + (c >> 3) * NW * 128 + sw128_offset(row, c & 7),
                       upz + (int64_t)row * mpad + m0 + 8 * c, 16);
        }
      }
      cp_async_mbar_arrive(bar_full + 8 * stage);
      next_tile(rt, ct, stage, round);
    }
  } else if (MODE == kDA && wg == 1 && (kUpFromG || da_masked)) {
    // dA's warpgroup 1: the Up tiles where ds_up_from_g, the masking of each x tile with dropout, or both.
    // Up: row tile rt of the split in buffer rt % 2 once the D warpgroup is done with the row tile two back.
    // Thread i takes the tile's row i: g's r-chunk row (zeros past the split's rows and past r: x's rows there are
    // zero-filled, and zero times anything finite adds nothing), loaded before the wait; as element (row jj + piece
    // * RJ, column i) of a K-major operand: K block i / 64, 16-byte chunk (i % 64) / 8, element i % 8.
    const int i = tid - 128, ch = (i >> 3) & 7;
    const bool vec4 = r % 4 == 0 && reinterpret_cast<uintptr_t>(g_in) % 16 == 0;  // 16-byte loads of the row
    const int n_rt = do_dB ? (int)(rt1 - rt0) : 0;
    // g's row of row tile rt into registers: issued a row tile ahead of its store_up, so that the loads' latency
    // never stalls the masking of the tiles in between (it did, once per row tile, when each row tile's Up loaded
    // its g rows and then waited for them)
    auto load_g = [&](int rt, float (&gv)[RJ]) {
      const int64_t m = row_begin + (int64_t)rt * DS_BM + i;
      if (vec4) {
#pragma unroll
        for (int q = 0; q < RJ / 4; ++q) {
          const float4 v = m < row_end && j0 + 4 * q < r
                               ? __ldg(reinterpret_cast<const float4*>(g_in + m * r + j0 + 4 * q))
                               : make_float4(0.f, 0.f, 0.f, 0.f);
          gv[4 * q] = v.x;
          gv[4 * q + 1] = v.y;
          gv[4 * q + 2] = v.z;
          gv[4 * q + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int jj = 0; jj < RJ; ++jj) gv[jj] = m < row_end && j0 + jj < r ? __ldg(g_in + m * r + j0 + jj) : 0.f;
      }
    };
    auto store_up = [&](int rt, const float (&gv)[RJ]) {
      mbar_wait(bar_up + 8 * (rt & 1), ((rt >> 1) & 1) ^ 1);
      unsigned char* s_m = ds_smem_raw + (s_up + (rt & 1) * UP_BYTES - raw) + (i >> 6) * NW * 128 + ((i & 7) << 1);
#pragma unroll
      for (int jj = 0; jj < RJ; ++jj) {
        if constexpr (P > 1) {
          __nv_bfloat16 pc[3];
          bf16x3_split(gv[jj], pc);
#pragma unroll
          for (int q = 0; q < 3; ++q) *reinterpret_cast<__nv_bfloat16*>(s_m + sw128_offset(q * RJ + jj, ch)) = pc[q];
        } else {
          *reinterpret_cast<T*>(s_m + sw128_offset(jj, ch)) = from_f<T>(gv[jj]);
        }
      }
      fence_proxy_async();  // the stores (generic proxy) before the D warpgroup's wgmma reads them (async proxy)
      mbar_arrive(bar_upf + 8 * (rt & 1));
    };
    float gv[RJ];
    if (kUpFromG && n_rt > 0) load_g(0, gv);
    // the row tile's Up, then the next row tile's g rows on their way
    auto up_row_tile = [&](int rt) {
      store_up(rt, gv);
      if (rt + 1 < n_rt) load_g(rt + 1, gv);
    };
    if constexpr (!da_masked) {
      if constexpr (kUpFromG)
        for (int rt = 0; rt < n_rt; ++rt) up_row_tile(rt);
    } else {
      // Masking: thread i takes the 16-byte chunks i + 128 q (q < 8) of each landed tile, row (i + 128 q) / 8 and
      // chunk i % 8 (columns 8 (i % 8) ..), times their keep byte, 1 or 0 per element (mul_keep2: exactly x * keep,
      // as the reference), written back in place; then masked[stage] for the D warpgroup. Here, off the D product's
      // path, the mask costs no time of the pass's (masking in the D warpgroup itself ran 86 against the mma.sync
      // kernel's 55 us at 8192 x 4096, r = 16: tenth session). Keep bytes: the stage's copy, or keep8 where the
      // loader cannot stage them (N % 32 != 0). Rows and columns past x's end hold zeros and stay zero.
      // All eight chunks and their keep bytes are read before any is written back (the stores could alias the
      // loads as far as the compiler knows, which would serialise eight shared-memory round trips per tile).
      int rt = 0, ct = 0, stage = 0, round = 0;
      for (int t = 0; t < n_tiles; ++t) {
        if (kUpFromG && ct == 0 && rt < n_rt) up_row_tile(rt);
        const int64_t m0 = row_begin + (int64_t)rt * DS_BM, k80 = (col_begin + (int64_t)ct * DS_BN) / 8;
        uint32_t kb8[8];
        if (!bits_staged) {  // loaded before the wait
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const int e = i + 128 * q;
            const int64_t m = m0 + (e >> 3), k8 = k80 + (e & 7);
            kb8[q] = m < M && k8 < kb ? (uint32_t)__ldg(keep8 + m * kb + k8) : 0xFFu;
          }
        }
        mbar_wait(bar_full + 8 * stage, round & 1);
        unsigned char* tile = ds_smem_raw + (s_ring + stage * STAGE - raw);
        if (bits_staged) {  // byte 8 row + c of the stage's bits = byte i + 128 q
          const unsigned char* bits = ds_smem_raw + (bits_at(stage) - raw);
#pragma unroll
          for (int q = 0; q < 8; ++q) kb8[q] = bits[i + 128 * q];
        }
        uint4 x8[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int e = i + 128 * q;
          x8[q] = *reinterpret_cast<const uint4*>(tile + sw128_offset(e >> 3, e & 7));
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int e = i + 128 * q;
          const uint32_t b = kb8[q];
          x8[q].x = mul_keep2<T>(x8[q].x, b & 3u);
          x8[q].y = mul_keep2<T>(x8[q].y, (b >> 2) & 3u);
          x8[q].z = mul_keep2<T>(x8[q].z, (b >> 4) & 3u);
          x8[q].w = mul_keep2<T>(x8[q].w, (b >> 6) & 3u);
          *reinterpret_cast<uint4*>(tile + sw128_offset(e >> 3, e & 7)) = x8[q];
        }
        fence_proxy_async();  // each thread's stores before the D warpgroup's wgmma reads the tile
        __syncwarp();         // the warp's stores and fences before its lane 0 arrives
        if (lane == 0) mbar_arrive(bar_mask + 8 * stage);
        next_tile(rt, ct, stage, round);
      }
    }
  } else {
    // Consumers. dy pass: warpgroup 1 computes G (both 64-row halves), warpgroup 2 computes D. dA: warpgroup 2
    // computes D (warpgroup 1 writes its Up or masks the tiles, above). Shrink: warpgroup 1 computes G of rows 0-63, warpgroup 2 of rows
    // 64-127.
    constexpr int GH = MODE == kShrink ? 1 : 2;  // G halves per warpgroup
    const int h0 = MODE == kShrink ? wg - 1 : 0;  // its first half
    const bool g_here = kG && (MODE == kShrink || wg == 1);
    float part[GH][NW / 2];  // this tile's products (fresh per tile; D uses part[0])
    float run[GH][RJ / 2];   // g of the row tile
#pragma unroll
    for (int h = 0; h < GH; ++h)
#pragma unroll
      for (int i = 0; i < RJ / 2; ++i) run[h][i] = 0.f;
    int rt = 0, ct = 0, stage = 0, round = 0;
    for (int t = 0; t < n_tiles; ++t) {
      mbar_wait((da_masked ? bar_mask : bar_full) + 8 * stage, round & 1);  // dA with dropout: the masked tile
      fence_proxy_async();  // the copies (generic proxy) before wgmma's reads (async proxy)
      const uint32_t s_dy = s_ring + stage * STAGE, s_bp = s_dy + DY_BYTES;
      if (g_here) {  // G: K = the tile's 64 columns, 4 steps of 16, for this warpgroup's 64-row halves
        if (MODE == kShrink && keep8 != nullptr) {  // masked x from registers (GH = 1: this warpgroup's half)
          uint32_t af[DS_BN / 16][4];
          masked_frags(af, s_dy, rt, ct, 64 * h0);
          wgmma_fence();
#pragma unroll
          for (int ks = 0; ks < DS_BN / 16; ++ks) Wgmma<T, NW>::mma_rs(part[0], af[ks], sw128_desc(s_bp + 32 * ks), ks);
        } else {
          wgmma_fence();
#pragma unroll
          for (int ks = 0; ks < DS_BN / 16; ++ks)
#pragma unroll
            for (int h = 0; h < GH; ++h)
              Wgmma<T, NW>::template mma<0>(part[h], sw128_desc(s_dy + (h0 + h) * 64 * 128 + 32 * ks),
                                            sw128_desc(s_bp + 32 * ks), ks);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int h = 0; h < GH; ++h) fence_regs(part[h]);
        if (lane == 0) mbar_arrive(bar_empty + 8 * stage);
#pragma unroll
        for (int h = 0; h < GH; ++h)
#pragma unroll
          for (int i = 0; i < RJ / 2; ++i) {
            if constexpr (P > 1)
              run[h][i] += part[h][i] + (part[h][i + RJ / 2] + part[h][i + RJ]);
            else
              run[h][i] += part[h][i];
          }
        if (ct == n_ct - 1) {  // row tile done: its g rows written once
#pragma unroll
          for (int h = 0; h < GH; ++h)
#pragma unroll
            for (int c8 = 0; c8 < RJ / 8; ++c8)
#pragma unroll
              for (int hh = 0; hh < 2; ++hh) {
                const int64_t m =
                    row_begin + (int64_t)rt * DS_BM + 64 * (h0 + h) + 16 * warp + (lane >> 2) + 8 * hh;
                const int j = j0 + 8 * c8 + 2 * (lane & 3);
                float* v = &run[h][4 * c8 + 2 * hh];
                if (m < row_end)
                  st2f(g_out + (int64_t)blockIdx.y * M * r + m * r + j, r - j, scale * v[0], scale * v[1]);
                v[0] = v[1] = 0.f;
              }
        }
      } else if (wg == 2 && do_dB) {  // D: the tile's 64 columns x NW, K = the tile's 128 rows, 8 steps of 16
        const uint32_t s_u = s_up + (rt & 1) * UP_BYTES;
        if (kUpFromG && ct == 0) mbar_wait(bar_upf + 8 * (rt & 1), (rt >> 1) & 1);  // warpgroup 1's Up stores
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < DS_BM / 16; ++ks)
          Wgmma<T, NW>::template mma<1>(part[0], sw128_desc(s_dy + 2048 * ks),
                                        sw128_desc(s_u + (ks >> 2) * NW * 128 + 32 * (ks & 3)), ks);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(part[0]);
        if (lane == 0) {
          mbar_arrive(bar_empty + 8 * stage);
          if (ct == n_ct - 1) mbar_arrive(bar_up + 8 * (rt & 1));  // the Up buffer's row tile done
        }
        float* drow = dBs + (ct * DS_BN + 16 * warp + (lane >> 2)) * LDD + 2 * (lane & 3);
#pragma unroll
        for (int c8 = 0; c8 < RJ / 8; ++c8)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int i = 4 * c8 + 2 * hh;
            float2 v;
            if constexpr (P > 1)
              v = make_float2(part[0][i] + (part[0][i + RJ / 2] + part[0][i + RJ]),
                              part[0][i + 1] + (part[0][i + 1 + RJ / 2] + part[0][i + 1 + RJ]));
            else
              v = make_float2(part[0][i], part[0][i + 1]);
            float2* d = reinterpret_cast<float2*>(drow + 8 * hh * LDD + 8 * c8);
            const float2 o = *d;
            *d = make_float2(o.x + v.x, o.y + v.y);
          }
      } else if (lane == 0) {  // no product here (dA's warpgroup 1, or no dB asked for): keep the ring turning
        mbar_arrive(bar_empty + 8 * stage);
      }
      next_tile(rt, ct, stage, round);
    }
  }
  if (do_dB) {  // the block's partial, written once: dB rows [n][j] of the r-chunk, or dA rows [j][k] times scale
    __syncthreads();
    float* dp = dB_partial + (int64_t)blockIdx.x * N * r;
    const int cols = n_ct * DS_BN;
    for (int i = tid; i < cols * RJ; i += DS_THREADS) {
      const int nn = MODE == kDy ? i / RJ : i % cols, jj = MODE == kDy ? i % RJ : i / cols;
      const int64_t n = col_begin + nn;
      if (n < col_end && j0 + jj < r) {
        if (MODE == kDy)
          dp[n * r + j0 + jj] = dBs[nn * LDD + jj];
        else
          dp[(int64_t)(j0 + jj) * N + n] = scale * dBs[nn * LDD + jj];
      }
    }
  }
  if (beside) pdl_wait();
#else
  __trap();
#endif
}


// f(kernel) for the (T, P, RJ) of a call (P = 3 only for bf16; RJ = 64 with P = 3 in the shrink and dA); `masked`
// picks dA's MASKED kernel (the other passes have none).
template <int MODE, typename T, bool MASKED, typename F>
cudaError_t with_stream_kernel_rj(int pieces, int rj, F&& f) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (pieces == 3) {
      if constexpr (MODE != kDy)
        if (rj == 64) return f(&stream_sm90_kernel<MODE, T, 3, 64, MASKED>);
      return rj == 16 ? f(&stream_sm90_kernel<MODE, T, 3, 16, MASKED>) : f(&stream_sm90_kernel<MODE, T, 3, 32, MASKED>);
    }
  }
  return rj == 16   ? f(&stream_sm90_kernel<MODE, T, 1, 16, MASKED>)
         : rj == 32 ? f(&stream_sm90_kernel<MODE, T, 1, 32, MASKED>)
                    : f(&stream_sm90_kernel<MODE, T, 1, 64, MASKED>);
}
template <int MODE, typename T, typename F>
cudaError_t with_stream_kernel(int pieces, int rj, bool masked, F&& f) {
  if constexpr (MODE == kDA)
    if (masked) return with_stream_kernel_rj<MODE, T, true>(pieces, rj, f);
  return with_stream_kernel_rj<MODE, T, false>(pieces, rj, f);
}

// The split plan: row splits x column groups (at least ds_stages - 1 tiles each, their D sums in shared memory) x
// r-chunks, one wave where it fits. Every block streams its span at about the same rate (its ring's bytes in flight
// over the memory latency), so the pass lasts as long as its largest span: cost = the bytes that span's tile count
// implies over all SMs + the partials written and read back (row_splits * N * r where the D partials exist: dy pass,
// dA; col_groups * M * r where the G partials do: dy pass, shrink). Counting the achieved fill instead (the
// average span) picked uneven splits: 36 row x column tiles in the largest span of dA at 8192 x 4096 where 32 is
// even, 44 in the shrink's. The row splits are the fewest that give the same largest span (fewer partials).
// side_bytes (a candidate, off in every pass; bench/dev/stream_bench.cu times it): the span also counts the side
// operands each block loads, the B or A chunk of every tile (dy pass, shrink: NW rows of 64) and the Up tile of every
// row tile (dy pass, dA: NW rows of 128). Without them the plan lost 8% on dA with fp32 adapters at r = 64,
// K = 14336, where each block loads a 48 KB Up tile per row tile for 2 column tiles of x (session 29).
// masked (dA with dropout): the keep bits ring in shared memory and the tiles' keep bits in the span.
// blocks > 0: at most that many blocks (dA beside the dx GEMM on the SMs the GEMM leaves free); no plan (row_splits
// 0) when none fits.
// The search for given device values (sms: the SMs or blocks to fill; smem_max: shared memory per block).
inline SplitPlan stream_sm90_search(int64_t M, int64_t N, int r, int pieces, StreamMode mode, bool side_bytes,
                                    bool masked, int blocks, int64_t sms, size_t smem_max) {
  const bool with_g = mode != kDA, with_d = mode != kShrink;
  const DsShape sh = ds_shape(r, pieces, mode);
  const int64_t tiles_m = ceil_div(M, DS_BM), tiles_n = ceil_div(N, DS_BN);
  SplitPlan best{0, 0, 0, 0};
  double best_est = -1.0;
  for (int64_t C = 1; C <= tiles_n / (ds_stages(mode, sh.nw, masked) - 1) && C <= 65535; ++C) {
    const int64_t tpg = ceil_div(tiles_n, C);
    if (ds_smem(sh, mode, tpg, masked) > smem_max) continue;
    if (blocks > 0 && C * sh.z > blocks) break;
    const int64_t S0 = std::max<int64_t>(1, std::min<int64_t>(tiles_m, sms / (C * sh.z)));
    const int64_t rows = ceil_div(tiles_m, S0), S = ceil_div(tiles_m, rows);  // the largest span's row tiles
    const int64_t waves = ceil_div(S * C * sh.z, sms);
    // bytes of `a` in the largest span, and with side_bytes those of its side operands
    const double tile = 2.0 * DS_BM * DS_BN + (side_bytes && with_g ? 128.0 * sh.nw : 0.0) +
                        (masked && mode == kDA ? (double)DS_BITS : 0.0);
    const double span = tile * (double)(rows * tpg) + (side_bytes && with_d ? 256.0 * sh.nw * (double)rows : 0.0);
    const double partial = 8.0 * r * ((with_d ? (double)S * N : 0.0) + (with_g && C > 1 ? (double)C * M : 0.0));
    const double est = span * (double)(sms * waves) + partial;
    if (best_est < 0 || est < best_est) {
      best_est = est;
      best = SplitPlan{S, rows * DS_BM, C, tpg * DS_BN};
    }
  }
  return best;
}

// The search for the current device, remembered per thread (PlanMemo; LORA_KERNELS_PLAN_MEMO=0 searches on every
// call, for A/B timing of the host time).
inline SplitPlan stream_sm90_plan(int64_t M, int64_t N, int r, int pieces, StreamMode mode, bool side_bytes = false,
                                  bool masked = false, int blocks = 0) {
  const int64_t sms = blocks > 0 ? blocks : num_sms();
  const size_t smem_max = smem_per_block();
  static const bool memo_on = env_switch_on("LORA_KERNELS_PLAN_MEMO");
  if (!memo_on) return stream_sm90_search(M, N, r, pieces, mode, side_bytes, masked, blocks, sms, smem_max);
  const int64_t key[] = {M, N, r, pieces, mode, side_bytes, masked, blocks, sms, (int64_t)smem_max};
  thread_local PlanMemo<sizeof(key) / sizeof(key[0]), SplitPlan> memo;
  return memo.get(key, [&] {
    return stream_sm90_search(M, N, r, pieces, mode, side_bytes, masked, blocks, sms, smem_max);
  });
}

}  // namespace
}  // namespace detail
}  // namespace lora_kernels
