// Small-M forward and dx on Hopper (sm_90a, wgmma), one launch each: for M <= 64 rows, p = 0, 16-bit x and W,
// adapters in x's dtype (or fp32 on bf16 x at r <= 16, opt-in: LORA_KERNELS_SMALL_M_SM90_FP32=1; correct on the GPU
// but slower than the mma.sync kernel there, session 57),
//   forward:  y  = x Wᵀ + bias + u Bᵀ     and  u  = s · x Aᵀ   (fp32, saved for backward);
//   dx:       dx = dy W + (s·g) A         and  sg = s · dy B   (fp32, for dA; small_m_grads.cu makes dA and dB).
// launch_lora_small_m_forward (small_m.cu) takes the forward kernel where lora_small_m_sm90_unsupported says it can,
// and its mma.sync kernels elsewhere; csrc/binding.cpp takes the dx kernel where lora_small_m_sm90_dx_unsupported
// says it can.
//
// Math   : with so few rows, W (N x K) is the only large operand, and y costs one read of it. The products run with
//          the operands swapped, yᵀ = W xᵀ + B (s·u)ᵀ, so that W's rows are wgmma's M (64 per instruction) and the
//          tokens its N (TOK = M rounded up to 16, 32, 48 or 64). A cluster of S CTAs splits K; CTA (rank q, row
//          block nb of BN rows) computes over its K slice q:
//            P_q = W[nb] x_qᵀ   (BN x TOK)         U_q = A_q x_qᵀ   (r x TOK)        fp32, from the same x tiles.
//          u = s · Σ_q U_q, summed in rank order by every CTA of the cluster alike (distributed shared memory),
//          rounded to x's dtype for the expand, which rank 0 adds to its P_0 as one more wgmma step:
//          P_0 += B[nb] bf16(u)ᵀ (r padded to 16 with zeros). Rank q then sums rows [BN q / S, BN (q+1) / S) of
//          P_0 .. P_{S-1} in rank order, adds the bias and writes y once (one rounding). Deterministic: no atomics,
//          every sum in a fixed order. Rounding as in the other tensor-core forwards: every operand of a 16-bit
//          product in x's dtype (s·u included), fp32 sums.
//          dx is the same computation transposed (BWD): dxᵀ = Wᵀ dyᵀ + Aᵀ (s·g)ᵀ, g = dy B. Its output rows are W's
//          columns (K), its reduction runs over N, and the three weights are read transposed: wgmma takes W's,
//          lora_B's and lora_A's tiles MN-major (the same 128-byte rows, one per reduction index), so that every
//          operand still arrives by 16-byte copies of contiguous memory. In the names below, for dx: x is dy, the
//          "rows" are K's, the K axis is N's, lora_A's role (the shrink's) is lora_Bᵀ's and lora_B's (the
//          expand's) is lora_Aᵀ's.
// Tiling : 256 threads. Warpgroup 0 loads: 16-byte cp.async copies into 128-byte-swizzled tiles, a 4-stage ring of
//          {W BN x 64, x TOK x 64, A r x 64}, zeros past N, M and K, with full / empty mbarriers; rank 0 also loads
//          lora_B's BN rows once. Warpgroup 1 multiplies: per k16 step one m64nTOK wgmma per 64 rows of W (BN = 128
//          or 64) and one for A's rows (rows r..63 of that tile stay zero), all reading the same x tile. The plan
//          (sm9_plan) takes the BN and S (1, 2, 4 or 8) that put the most CTAs in one wave (cluster occupancy).
//          dx's tiles: W as BN / 64 blocks of 64 reduction rows x 64 output columns, lora_B as 64 reduction rows x r
//          columns (the rest of each 128-byte row zeros), lora_A as r rows x 64 output columns per block.
// Bytes  : W once; x and A from L2 once per CTA; lora_B once; y and u written once. The U products are repeated by
//          every row block of a cluster column (64 / BN more MMAs than W's), which the tensor cores absorb: the
//          kernel is bound by W's read.
#include "common.cuh"
#include "dsmem.cuh"
#include "pdl.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

#include <atomic>
#include <climits>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int SM9_BK = 64;        // K per stage: one 128-byte swizzled row per operand row
constexpr int SM9_STAGES = 4;
constexpr int SM9_THREADS = 256;  // warpgroup 0 loads, warpgroup 1 multiplies
constexpr int SM9_MAX_CLUSTER = 8;  // portable cluster size

// Shared memory from the 1024-byte-aligned base (every tile 1024-aligned, as the swizzle needs).
template <int TOK, int BN, bool F32 = false>
struct Sm9Layout {
  static constexpr int W_BYTES = BN * 128;
  static constexpr int X_BYTES = TOK * 128;
  static constexpr int A_BYTES = 64 * 128;  // r <= 64 rows of lora_A: one m64 block
  static constexpr int F32_OFF = W_BYTES + X_BYTES + A_BYTES;  // fp32 adapters: the slice as loaded (r x 64 floats)
  static constexpr int STAGE = F32_OFF + (F32 ? 4096 : 0);
  static constexpr int BT = SM9_STAGES * STAGE;  // lora_B's BN rows (rank 0): the expand's A operand
  static constexpr int UB = BT + BN * 128;       // bf16(u), TOK x 64: the expand's B operand
  static constexpr int U = UB + TOK * 128;       // this CTA's U_q: each thread's TOK / 2 fragment floats in a row
  static constexpr int PLD = TOK + 4;            // P's row pitch (floats)
  static constexpr int P = U + 128 * (TOK / 2) * 4;
  static constexpr int END = P + BN * PLD * 4;
  static constexpr int BARS = 8 * (2 * SM9_STAGES + 1);  // full[], empty[], lora_B's
  static constexpr size_t SMEM = (size_t)END + 1024 + BARS;  // + the base's alignment
  static_assert(STAGE % 1024 == 0 && BT % 1024 == 0 && UB % 1024 == 0, "swizzled tiles start 1024-aligned");
  static_assert(SMEM <= 232448, "fits an sm_90 block's 227 KB");
};

#if LK_WGMMA
__device__ __forceinline__ void consumer_bar() { asm volatile("bar.sync 1, 128;\n" ::: "memory"); }
#endif

// TA: the adapters' type, T or (bf16 x only) float. With fp32 adapters (r <= 16) lora_A's rows enter the U product as
// three bf16 pieces stacked as rows [0, r), [r, 2r), [2r, 3r) (bf16x3_split: U's row sums are fp32-accurate), and
// the expand runs on K' = 3r columns, [B_hi | B_mid | B_hi] against [u_hi | u_hi | u_lo]. The loader copies each
// stage's fp32 slice as it is (cp.async, so that it never waits for a load) and the multiplying warpgroup splits it
// into the A tile before the stage's wgmmas; rank 0's lora_B tile, loaded once, the loader converts itself. U's
// products start from zero per stage and are summed in fp32 registers: the tensor cores' accumulation over all of
// K measured 20x PyTorch's fp32 error at K = 4096.
// BWD: the dx kernel (x is dy (M, N), y is dx (M, K), u is s·g, bias null): the output has NO = K rows and the
// reduction NR = N; W, lora_B and lora_A are read MN-major (wgmma's transposed A operand).
template <typename T, typename TA, int TOK, int BN, bool BWD>
__global__ void __launch_bounds__(SM9_THREADS, 1)
lora_small_m_sm90_kernel(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ bias,
                         const TA* __restrict__ A, const TA* __restrict__ B, T* __restrict__ y, float* __restrict__ u,
                         int M, int N, int K, int r, float scale) {
#if LK_WGMMA
  using L = Sm9Layout<TOK, BN, std::is_same<TA, float>::value>;
  constexpr bool kTwo = BN == 128;  // two m64 row blocks
  constexpr bool kF32 = std::is_same<TA, float>::value;
  constexpr int kT = BWD ? 1 : 0;   // wgmma's TnspA for W and the adapters' tiles
  constexpr uint32_t kStep = BWD ? 2048 : 32;  // a k16 step of those tiles: 16 rows (MN-major) or 32 bytes (K-major)
  static_assert(!kF32 || std::is_same<T, __nv_bfloat16>::value, "fp32 adapters: bf16 x (their pieces are bf16)");
  const int NO = BWD ? K : N, NR = BWD ? N : K;  // the output's rows (y's columns) and the reduction's length
  // The adapters' rank as the products see it: r, or 3r (the pieces). Rows of the A tile the U product reads (the
  // rest zeros; dx: columns), and the expand's K.
  const int kx = kF32 ? 3 * r : r;
  using MMA = Wgmma<T, TOK>;
  constexpr int NACC = TOK / 2;  // accumulator floats per thread of an m64nTOK product
  extern __shared__ unsigned char sm9_raw[];
  const uint32_t raw = smem_addr(sm9_raw);
  const uint32_t bar_full = raw, bar_empty = raw + 8 * SM9_STAGES, bar_b = raw + 16 * SM9_STAGES;
  const uint32_t base = (raw + L::BARS + 1023) & ~1023u;
  unsigned char* const gbase = sm9_raw + (base - raw);
  float* const s_u = reinterpret_cast<float*>(gbase + L::U);
  float* const s_p = reinterpret_cast<float*>(gbase + L::P);

  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127, w = t >> 5, lane = t & 31;
  // Element i = 4 c + 2 h + e of this thread's m64nTOK accumulators (wgmma.cuh): row 16 w + lane / 4 + 8 h (of W's
  // 64 rows, or u's column j), column 8 c + 2 (lane % 4) + e (the token).
  auto frag_row = [&](int i) { return 16 * w + (lane >> 2) + 8 * ((i >> 1) & 1); };
  auto frag_tok = [&](int i) { return 8 * (i >> 2) + 2 * (lane & 3) + (i & 1); };
  const int S = (int)gridDim.x, rank = cluster_rank();  // the cluster spans gridDim.x: (S, 1, 1)
  const int64_t n0 = (int64_t)blockIdx.y * BN;  // the block's first output row
  const int kt_all = (NR + SM9_BK - 1) / SM9_BK;
  const int kt0 = (int)((int64_t)kt_all * rank / S), n_kt = (int)((int64_t)kt_all * (rank + 1) / S) - kt0;

  if (tid == 0) {
    for (int s = 0; s < SM9_STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 128);  // every loader thread's copies
      mbar_init(bar_empty + 8 * s, 4);   // lane 0 of each multiplying warp
    }
    mbar_init(bar_b, 128);
  }
  // the A tile's rows kx..63 of every stage (dx: chunks kx / 8..7 of each of its 64 rows, lora_B's columns past
  // kx): zeros (the loads fill the rest only), so U's rows there are zero
  const int zero_rows = BWD ? 64 : 64 - kx, zero_chunks = BWD ? 8 - kx / 8 : 8;
  for (int i = tid; i < SM9_STAGES * zero_rows * zero_chunks; i += SM9_THREADS) {
    const int s = i / (zero_rows * zero_chunks), e = i % (zero_rows * zero_chunks);
    const int row = BWD ? e / zero_chunks : kx + e / zero_chunks, c = BWD ? kx / 8 + e % zero_chunks : e % 8;
    *reinterpret_cast<uint4*>(gbase + s * L::STAGE + L::W_BYTES + L::X_BYTES + sw128_offset(row, c)) =
        make_uint4(0u, 0u, 0u, 0u);
  }
  fence_proxy_async();  // those stores (generic proxy) before the wgmmas (async proxy) read the tile
  pdl_wait();           // launched as a programmatic dependent: nothing global before the launch before it is done
  __syncthreads();

  // P's rows 0-63 and (BN = 128) 64-127, and U: written by the first wgmma (scale-d 0), as every rank has at least one
  // K tile (the plan keeps S <= the K tiles)
  float acc0[NACC], acc1[NACC], accu[NACC];

  if (wg == 0) {
    if (rank == 0) {  // lora_B's rows n0 .. n0 + BN - 1 for the expand (zeros past N and past its K columns)
      if constexpr (BWD && !kF32) {  // dx: lora_A's rows 0 .. r16 - 1, columns n0 .. n0 + BN - 1, BN / 64 blocks
        const int r16 = (r + 15) & ~15;  // the expand's K steps read rows < r16: rows past r are zeros
        for (int i = t; i < (BN / 64) * r16 * 8; i += 128) {
          const int h = i / (r16 * 8), row = (i >> 3) % r16, c = i & 7;
          const int64_t col = n0 + 64 * h + 8 * c;
          const bool ok = row < r && col < NO;
          cp_async16(base + L::BT + h * 8192 + sw128_offset(row, c), ok ? B + (int64_t)row * NO + col : B,
                     ok ? 16 : 0);
        }
        cp_async_mbar_arrive(bar_b);
      } else if constexpr (BWD) {  // dx, fp32: rows [A_hi; A_mid; A_hi] (3r, zeros up to a multiple of 16)
        const int rows = (kx + 15) & ~15;
        for (int i = t; i < (BN / 64) * rows * 8; i += 128) {
          const int h = i / (rows * 8), row = (i >> 3) % rows, c = i & 7;
          const int64_t col = n0 + 64 * h + 8 * c;
          const bool ok = row < kx && col < NO;
          const int piece = row >= r && row < 2 * r ? 1 : 0;
          const TA* src = ok ? B + (int64_t)(row % r) * NO + col : B;
          const uint2 lo = to_t4_piece<T, TA>(ld4(src, ok ? 4 : 0), piece);
          const uint2 hi = to_t4_piece<T, TA>(ld4(src + 4, ok ? 4 : 0), piece);
          *reinterpret_cast<uint4*>(gbase + L::BT + h * 8192 + sw128_offset(row, c)) =
              make_uint4(lo.x, lo.y, hi.x, hi.y);
        }
        fence_proxy_async();  // the stores before the expand's wgmma reads them; the release arrive orders them
        mbar_arrive(bar_b);
      } else if constexpr (!kF32) {  // r columns, copied
        for (int i = t; i < BN * 8; i += 128) {
          const int row = i >> 3, c = i & 7;
          const bool ok = n0 + row < N && 8 * c < r;
          cp_async16(base + L::BT + sw128_offset(row, c), ok ? B + (n0 + row) * r + 8 * c : B, ok ? 16 : 0);
        }
        cp_async_mbar_arrive(bar_b);
      } else {  // fp32: [B_hi | B_mid | B_hi], each 16-byte chunk made and stored whole
        for (int i = t; i < BN * 8; i += 128) {
          const int row = i >> 3, c = i & 7;
          uint32_t packed[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            __nv_bfloat16 h[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int kc = 8 * c + 2 * q + e, piece = kc >= r && kc < 2 * r ? 1 : 0;
              __nv_bfloat16 pc[3];
              bf16x3_split(kc < 3 * r && n0 + row < N ? B[(n0 + row) * r + kc % r] : 0.f, pc);
              h[e] = piece ? pc[1] : pc[0];  // no dynamic index: pc stays in registers
            }
            packed[q] = (uint32_t)__bfloat16_as_ushort(h[0]) | ((uint32_t)__bfloat16_as_ushort(h[1]) << 16);
          }
          *reinterpret_cast<uint4*>(gbase + L::BT + sw128_offset(row, c)) =
              make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
        fence_proxy_async();  // the stores before the expand's wgmma reads them; the release arrive orders them
        mbar_arrive(bar_b);
      }
    }
    for (int i = 0; i < n_kt; ++i) {
      const int stage = i % SM9_STAGES;
      mbar_wait(bar_empty + 8 * stage, ((i / SM9_STAGES) & 1) ^ 1);  // the stage's previous tile consumed
      const int64_t k0 = (int64_t)(kt0 + i) * SM9_BK;
      const uint32_t s_w = base + stage * L::STAGE, s_x = s_w + L::W_BYTES, s_a = s_x + L::X_BYTES;
#pragma unroll
      for (int q = 0; q < BN * 8 / 128; ++q) {  // W: BN rows x 8 chunks of 16 bytes (K % 8 == 0: whole chunks)
        const int e = t + 128 * q;
        if constexpr (BWD) {  // block h: W's rows k0 .. k0 + 63 (the reduction), columns n0 + 64 h .. + 63
          const int h = e >> 9, row = (e >> 3) & 63, c = e & 7;
          const int64_t col = n0 + 64 * h + 8 * c;
          const bool ok = k0 + row < NR && col < NO;
          cp_async16(s_w + h * 8192 + sw128_offset(row, c), ok ? W + (k0 + row) * NO + col : W, ok ? 16 : 0);
        } else {
          const int row = e >> 3, c = e & 7;
          const int64_t k = k0 + 8 * c;
          const bool ok = n0 + row < N && k < K;
          cp_async16(s_w + sw128_offset(row, c), ok ? W + (n0 + row) * K + k : W, ok ? 16 : 0);
        }
      }
#pragma unroll
      for (int q = 0; q < TOK * 8 / 128; ++q) {  // x: TOK rows, zeros past M
        const int e = t + 128 * q, row = e >> 3, c = e & 7;
        const int64_t k = k0 + 8 * c;
        const bool ok = row < M && k < NR;
        cp_async16(s_x + sw128_offset(row, c), ok ? x + (int64_t)row * NR + k : x, ok ? 16 : 0);
      }
      if constexpr (BWD && !kF32) {  // lora_B's rows k0 .. k0 + 63, their r columns: chunks 0 .. r / 8 - 1 of each
        const int rc = r >> 3;
        for (int e = t; e < 64 * rc; e += 128) {
          const int row = e / rc, c = e % rc;
          const bool ok = k0 + row < NR;
          cp_async16(s_a + sw128_offset(row, c), ok ? A + (k0 + row) * r + 8 * c : A, ok ? 16 : 0);
        }
      } else if constexpr (BWD) {  // fp32 (r <= 16): lora_B's rows k0 .. k0 + 63 as loaded, r floats each
        const int rc = r >> 2;
        for (int e = t; e < 64 * rc; e += 128) {
          const int row = e / rc, c = e % rc;
          const bool ok = k0 + row < NR;
          cp_async16(s_w + L::F32_OFF + 16 * e, ok ? A + (k0 + row) * r + 4 * c : A, ok ? 16 : 0);
        }
      } else if constexpr (!kF32) {
        for (int e = t; e < r * 8; e += 128) {  // lora_A: r rows
          const int row = e >> 3, c = e & 7;
          const int64_t k = k0 + 8 * c;
          const bool ok = k < K;
          cp_async16(s_a + sw128_offset(row, c), ok ? A + (int64_t)row * K + k : A, ok ? 16 : 0);
        }
      } else {  // fp32 (r <= 16): lora_A's r x 64 slice as loaded, 16 chunks of 4 floats per row
        for (int e = t; e < r * 16; e += 128) {
          const int row = e >> 4, c = e & 15;
          const int64_t k = k0 + 4 * c;
          const bool ok = k < K;
          cp_async16(s_w + L::F32_OFF + 16 * e, ok ? A + (int64_t)row * K + k : A, ok ? 16 : 0);
        }
      }
      cp_async_mbar_arrive(bar_full + 8 * stage);
    }
  } else {
    // fp32 adapters: each tile's U product starts from zero and is added to urun in fp32 registers (see above),
    // the tile's wgmmas waited for in turn.
    float urun[kF32 ? NACC : 1];
    for (int i = 0; i < n_kt; ++i) {
      const int stage = i % SM9_STAGES;
      mbar_wait(bar_full + 8 * stage, (i / SM9_STAGES) & 1);
      const uint32_t s_w = base + stage * L::STAGE, s_x = s_w + L::W_BYTES, s_a = s_x + L::X_BYTES;
      if constexpr (kF32) {  // the slice's r x 64 floats into the A tile as bf16 pieces, 8 per thread
        unsigned char* const stage_p = gbase + stage * L::STAGE;
        const int e0 = 8 * t;
        if (e0 < 64 * r) {
          const float4 lo = *reinterpret_cast<const float4*>(stage_p + L::F32_OFF + 4 * e0);
          const float4 hi = *reinterpret_cast<const float4*>(stage_p + L::F32_OFF + 4 * e0 + 16);
          const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
          __nv_bfloat16 pc[8][3];
#pragma unroll
          for (int q = 0; q < 8; ++q) bf16x3_split(v[q], pc[q]);
          // forward: lora_A's row j = e0 / 64, K columns e0 % 64 .. + 7: chunk of rows piece·r + j (K-major);
          // dx: lora_B's row e0 / r, its columns e0 % r .. + 7: positions piece·r + those of the row (MN-major)
          const int row = BWD ? e0 / r : e0 >> 6, col = BWD ? e0 % r : e0 & 63;
#pragma unroll
          for (int piece = 0; piece < 3; ++piece) {
            uint32_t w4[4];
#pragma unroll
            for (int q = 0; q < 4; ++q)
              w4[q] = (uint32_t)__bfloat16_as_ushort(pc[2 * q][piece]) |
                      ((uint32_t)__bfloat16_as_ushort(pc[2 * q + 1][piece]) << 16);
            const uint32_t off =
                BWD ? sw128_offset(row, (piece * r + col) >> 3) : sw128_offset(piece * r + row, col >> 3);
            *reinterpret_cast<uint4*>(stage_p + L::W_BYTES + L::X_BYTES + off) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
          }
        }
        fence_proxy_async();  // the stores before the wgmmas read them (all 128 threads', through the barrier)
        consumer_bar();
      }
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < SM9_BK / 16; ++ks) {  // 32 bytes along K per k16 step
        const uint64_t xb = sw128_desc(s_x + 32 * ks);
        const int acc = i > 0 || ks > 0;  // 0: D = A B, the first product
        MMA::template mma<kT>(acc0, sw128_desc(s_w + kStep * ks), xb, acc);
        if constexpr (kTwo) MMA::template mma<kT>(acc1, sw128_desc(s_w + 64 * 128 + kStep * ks), xb, acc);
        MMA::template mma<kT>(accu, sw128_desc(s_a + kStep * ks), xb, kF32 ? ks > 0 : acc);
      }
      wgmma_commit();
      if constexpr (kF32) {
        wgmma_wait<0>();  // this tile's products done: its stage may be refilled, its U partial added
        fence_regs(accu);
        if (lane == 0) mbar_arrive(bar_empty + 8 * stage);
#pragma unroll
        for (int e = 0; e < NACC; ++e) urun[e] = i > 0 ? urun[e] + accu[e] : accu[e];
      } else {
        wgmma_wait<1>();  // the previous tile's products done: its stage may be refilled while this tile's run
        if (lane == 0 && i > 0) mbar_arrive(bar_empty + 8 * ((i + SM9_STAGES - 1) % SM9_STAGES));
      }
    }
    wgmma_wait<0>();
    if constexpr (kF32) {
#pragma unroll
      for (int e = 0; e < NACC; ++e) accu[e] = urun[e];
    }
    if constexpr (BWD) pdl_launch_dependents();  // dx: the grads launch may start its blocks (they wait for sg)
    fence_regs(acc0);  // the accumulators read below only after the last wait
    if constexpr (kTwo) fence_regs(acc1);
    fence_regs(accu);
    // U_q into shared memory, this thread's fragment as one row, for the cluster's sum
#pragma unroll
    for (int i = 0; i < NACC; i += 4)
      *reinterpret_cast<float4*>(s_u + t * NACC + i) = make_float4(accu[i], accu[i + 1], accu[i + 2], accu[i + 3]);
  }
  cluster_sync();  // every CTA's U_q in place

  if (wg == 1) {
    // u = s · Σ_q U_q in rank order: the same value in every CTA of the cluster (element i: u's column
    // j = frag_row(i), token frag_tok(i)).
    float uf[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) uf[i] = 0.f;
    for (int q = 0; q < S; ++q) {  // rank q's row: NACC / 4 loads in one batch, then the adds
      const uint32_t rem = cluster_addr(smem_addr(s_u + t * NACC), q);
      float4 v[NACC / 4];
#pragma unroll
      for (int i = 0; i < NACC / 4; ++i) v[i] = ld_cluster4(rem + 16 * i);
#pragma unroll
      for (int i = 0; i < NACC / 4; ++i) {
        uf[4 * i] += v[i].x;
        uf[4 * i + 1] += v[i].y;
        uf[4 * i + 2] += v[i].z;
        uf[4 * i + 3] += v[i].w;
      }
    }
    const bool write_u = u != nullptr && blockIdx.y == 0 && rank == 0;
    if constexpr (kF32) {  // U's rows j, r + j, 2r + j are lora_A's three pieces: summed through shared memory
#pragma unroll
      for (int i = 0; i < NACC; ++i)  // P's buffer is free until the expand is done
        s_p[frag_row(i) * L::PLD + frag_tok(i)] = uf[i];
      consumer_bar();
#pragma unroll
      for (int i = 0; i < NACC; ++i) {
        const int j = frag_row(i), tok = frag_tok(i);
        if (j < r) uf[i] = s_p[j * L::PLD + tok] + (s_p[(r + j) * L::PLD + tok] + s_p[(2 * r + j) * L::PLD + tok]);
      }
    }
    auto put_ub = [&](int tok, int kc, float v) {  // the expand's B operand: row tok, K index kc (K-major, swizzled)
      *reinterpret_cast<T*>(gbase + L::UB + sw128_offset(tok, kc >> 3) + 2 * (kc & 7)) = from_f<T>(v);
    };
#pragma unroll
    for (int i = 0; i < NACC; ++i) {
      const int j = frag_row(i), tok = frag_tok(i);
      const float v = j < r ? scale * uf[i] : 0.f;
      if constexpr (kF32) {  // [u_hi | u_hi | u_lo] in columns j, r + j, 2r + j; zeros from 3r on
        const float hi = __bfloat162float(__float2bfloat16_rn(v));
        if (j < r) {
          put_ub(tok, j, hi);
          put_ub(tok, r + j, hi);
          put_ub(tok, 2 * r + j, v - hi);
        } else if (j >= 3 * r) {
          put_ub(tok, j, 0.f);
        }
      } else {
        put_ub(tok, j, v);
      }
      if (write_u && j < r && tok < M) u[(int64_t)tok * r + j] = v;
    }
    fence_proxy_async();
    consumer_bar();  // the whole bf16(u) tile written before any warp's wgmma reads it
    if (rank == 0) {  // P_0 += B[nb] bf16(u)ᵀ over kx (r, or 3r for the pieces) rounded up to 16
      mbar_wait(bar_b, 0);
      wgmma_fence();
      for (int ks = 0; ks < (kx + 15) / 16; ++ks) {
        const uint64_t ub = sw128_desc(base + L::UB + 32 * ks);
        MMA::template mma<kT>(acc0, sw128_desc(base + L::BT + kStep * ks), ub, 1);
        if constexpr (kTwo) MMA::template mma<kT>(acc1, sw128_desc(base + L::BT + 64 * 128 + kStep * ks), ub, 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc0);
      if constexpr (kTwo) fence_regs(acc1);
    }
    // P_q into shared memory, [row][tok]
#pragma unroll
    for (int i = 0; i < NACC; i += 2) {  // elements i and i + 1: tokens tok and tok + 1
      const int row = frag_row(i), tok = frag_tok(i);
      *reinterpret_cast<float2*>(s_p + row * L::PLD + tok) = make_float2(acc0[i], acc0[i + 1]);
      if constexpr (kTwo)
        *reinterpret_cast<float2*>(s_p + (row + 64) * L::PLD + tok) = make_float2(acc1[i], acc1[i + 1]);
    }
  }
  cluster_sync();  // every P_q in place, and every CTA done reading the others' U

  // Rank q: rows [q·BN/S, (q+1)·BN/S) of the tile, the S partials summed in rank order, + bias, y written once.
  // A thread takes 4 tokens of one row (16 bytes of each partial, the S loads in one batch); consecutive threads
  // take consecutive rows, i.e. consecutive columns of y: coalesced stores.
  const int rq = BN / S, row0 = rank * rq;
  for (int e = tid; e < rq * (TOK / 4); e += SM9_THREADS) {
    const int row = row0 + e % rq, tok = 4 * (e / rq);
    const int64_t n = n0 + row;
    if (tok >= M || n >= NO) continue;
    const uint32_t loc = smem_addr(s_p + row * L::PLD + tok);
    float4 part[SM9_MAX_CLUSTER];
#pragma unroll
    for (int q = 0; q < SM9_MAX_CLUSTER; ++q)
      if (q < S) part[q] = ld_cluster4(cluster_addr(loc, q));
    float4 v = part[0];
#pragma unroll
    for (int q = 1; q < SM9_MAX_CLUSTER; ++q)
      if (q < S) {
        v.x += part[q].x;
        v.y += part[q].y;
        v.z += part[q].z;
        v.w += part[q].w;
      }
    const float b = bias != nullptr ? to_f<T>(bias[n]) : 0.f;
    const float vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (tok + k < M) y[(int64_t)(tok + k) * NO + n] = from_f<T>(vs[k] + b);
  }
  cluster_sync();  // no CTA leaves while another reads its P
#else
  __trap();
#endif
}

std::atomic<bool> sm9_switch{env_switch_on("LORA_KERNELS_SMALL_M_SM90")};
// fp32 adapters (their bf16x3 pieces): off unless LORA_KERNELS_SMALL_M_SM90_FP32=1. They pass the float64 tests, but
// converting each stage's slice in the multiplying warpgroup and waiting for each stage's U product made the forward
// 1.5-1.9x the mma.sync kernel's time (session 57, H100).
bool sm9_fp32_on() {
  static const bool on = env_switch_set("LORA_KERNELS_SMALL_M_SM90_FP32");
  return on;
}
std::atomic<int> sm9_state{0};

bool sm9_device_ok() {
  const void* kernel =
      reinterpret_cast<const void*>(&lora_small_m_sm90_kernel<__nv_bfloat16, __nv_bfloat16, 16, 128, false>);
  return sm90_kernel_ok(kernel, sm9_state);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Tokens rounded up to a wgmma N this kernel is built for.
int sm9_tok(int64_t M) { return M <= 16 ? 16 : M <= 32 ? 32 : M <= 48 ? 48 : 64; }

// The launch configuration of a grid of (S, row blocks) CTAs in clusters of (S, 1, 1); attr[0] holds the cluster
// shape (the caller may add attributes after it).
cudaLaunchConfig_t sm9_config(cudaLaunchAttribute* attr, int S, int64_t row_blocks, size_t smem, cudaStream_t stream) {
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)S;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3((unsigned)S, (unsigned)row_blocks);
  config.blockDim = dim3(SM9_THREADS);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// Clusters of `s` CTAs of `kernel` the device holds at once (cudaOccupancyMaxActiveClusters: clusters live inside
// one GPC, so this is below SMs / s where the GPCs' SM counts are not multiples of s), remembered per (kernel, s).
int sm9_max_clusters(const void* kernel, size_t smem, int s) {
  thread_local PlanMemo<3, int, 64> memo;
  const int64_t key[3] = {(int64_t)reinterpret_cast<uintptr_t>(kernel), s, (int64_t)compute_capability()};
  return memo.get(key, [&] {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t config = sm9_config(attr, s, 1, smem, nullptr);
    int n = 0;
    if (set_smem_once(kernel, smem) != cudaSuccess ||
        cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess)
      n = 0;
    cudaGetLastError();
    return n;
  });
}

// A forced setting from the environment (for A/B timing): LORA_KERNELS_SMALL_M_SM90_CLUSTER (1, 2, 4 or 8) and
// LORA_KERNELS_SMALL_M_SM90_BN (64 or 128); 0 where unset.
int sm9_forced(const char* name, std::initializer_list<int> allowed) {
  const char* e = getenv(name);
  const int n = e != nullptr ? atoi(e) : 0;
  return std::find(allowed.begin(), allowed.end(), n) != allowed.end() ? n : 0;
}
int sm9_forced_cluster() {
  static const int v = sm9_forced("LORA_KERNELS_SMALL_M_SM90_CLUSTER", {1, 2, 4, 8});
  return v;
}
int sm9_forced_bn() {
  static const int v = sm9_forced("LORA_KERNELS_SMALL_M_SM90_BN", {64, 128});
  return v;
}

// f(kernel, smem, BN, T{}, TA{}) for the pass (forward, or dx: bwd), x's dtype, the adapters' (x's, or fp32 on bf16
// x), the tokens and the height.
template <typename F>
cudaError_t with_sm9_kernel(bool bwd, DType x_dtype, DType a_dtype, int tok, int bn, F&& f) {
  return with_dtype16(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    auto go = [&](auto bnc, auto at, auto bwdc) {
      constexpr int BN = decltype(bnc)::value;
      constexpr bool BWD = decltype(bwdc)::value;
      using TA = decltype(at);
      constexpr bool kF = std::is_same<TA, float>::value;
      switch (tok) {
        case 16: return f(&lora_small_m_sm90_kernel<T, TA, 16, BN, BWD>, Sm9Layout<16, BN, kF>::SMEM, BN, T{}, TA{});
        case 32: return f(&lora_small_m_sm90_kernel<T, TA, 32, BN, BWD>, Sm9Layout<32, BN, kF>::SMEM, BN, T{}, TA{});
        case 48: return f(&lora_small_m_sm90_kernel<T, TA, 48, BN, BWD>, Sm9Layout<48, BN, kF>::SMEM, BN, T{}, TA{});
        default: return f(&lora_small_m_sm90_kernel<T, TA, 64, BN, BWD>, Sm9Layout<64, BN, kF>::SMEM, BN, T{}, TA{});
      }
    };
    auto by_height = [&](auto at, auto bwdc) {
      return bn == 64 ? go(std::integral_constant<int, 64>{}, at, bwdc)
                      : go(std::integral_constant<int, 128>{}, at, bwdc);
    };
    auto by_pass = [&](auto at) {
      return bwd ? by_height(at, std::true_type{}) : by_height(at, std::false_type{});
    };
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
      if (a_dtype == DType::kFloat32) return by_pass(float{});
    return by_pass(T{});
  });
}

struct Sm9Plan {
  int bn, s;
};
// The tile height BN and cluster size S: of BN in {128, 64} and S in {8, 4, 2, 1} (at least two K tiles per CTA where
// S > 1), the most CTAs the device holds in one wave (W's read needs SMs: bytes in flight per SM are bounded), BN =
// 128 on a tie (x read half as often). Where no choice fits one wave, 128 and 1.
// N: the output's rows, K: the reduction's length (dx: K and N).
Sm9Plan sm9_plan_search(bool bwd, DType x_dtype, DType a_dtype, int tok, int64_t N, int64_t K) {
  const int64_t kt = ceil_div(K, SM9_BK);
  Sm9Plan best{128, 1};
  int64_t best_ctas = 0;
  for (int bn : {128, 64}) {
    if (sm9_forced_bn() > 0 && bn != sm9_forced_bn()) continue;
    const int64_t blocks = ceil_div(N, bn);
    for (int s = SM9_MAX_CLUSTER; s >= 1; s /= 2) {
      if (sm9_forced_cluster() > 0 && s != sm9_forced_cluster()) continue;
      if (s > 1 && kt < 2 * s && sm9_forced_cluster() == 0) continue;
      int fits = 0;
      with_sm9_kernel(bwd, x_dtype, a_dtype, tok, bn, [&](auto kernel, size_t smem, int, auto, auto) {
        fits = blocks <= sm9_max_clusters(reinterpret_cast<const void*>(kernel), smem, s);
        return cudaSuccess;
      });
      if ((fits && blocks * s > best_ctas) || (sm9_forced_cluster() > 0 && best_ctas == 0)) {
        best = Sm9Plan{bn, s};
        best_ctas = fits ? blocks * s : 0;
      }
    }
  }
  while (best.s > kt) best.s /= 2;  // a forced size halved until every rank has a K tile (S divides BN)
  return best;
}
Sm9Plan sm9_plan(bool bwd, DType x_dtype, DType a_dtype, int tok, int64_t N, int64_t K) {  // the search, remembered
  thread_local PlanMemo<7, Sm9Plan, 16> memo;
  int device = 0;
  cudaGetDevice(&device);
  const int64_t key[7] = {(int64_t)x_dtype, (int64_t)a_dtype, tok, N, K, device, bwd};
  return memo.get(key, [&] { return sm9_plan_search(bwd, x_dtype, a_dtype, tok, N, K); });
}

// Launches the kernel: x (M, NR), W, A, B as the kernel reads them (see BWD), y (M, NO), u (M, r) or null.
cudaError_t sm9_launch(bool bwd, const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                       DType a_dtype, const void* B, void* y, float* u, int64_t M, int64_t N, int64_t K, int r,
                       float scaling, cudaStream_t stream) {
  const int tok = sm9_tok(M);
  const int64_t NO = bwd ? K : N, NR = bwd ? N : K;
  const Sm9Plan plan = sm9_plan(bwd, x_dtype, a_dtype, tok, NO, NR);
  return with_sm9_kernel(bwd, x_dtype, a_dtype, tok, plan.bn,
                         [&](auto kernel, size_t smem, int bn, auto xt, auto at) -> cudaError_t {
    using T = decltype(xt);
    using TA = decltype(at);
    cudaError_t e = set_smem_once(reinterpret_cast<const void*>(kernel), smem);
    if (e != cudaSuccess) return e;
    cudaLaunchAttribute attr[2];
    cudaLaunchConfig_t config = sm9_config(attr, plan.s, ceil_div(NO, bn), smem, stream);
    config.numAttrs = with_pdl(attr, 1);
    return cudaLaunchKernelEx(&config, kernel, static_cast<const T*>(x), static_cast<const T*>(W),
                              static_cast<const T*>(bias), static_cast<const TA*>(A), static_cast<const TA*>(B),
                              static_cast<T*>(y), u, (int)M, (int)N, (int)K, r, scaling);
  });
}

std::atomic<bool> sm9_dx_switch{env_switch_on("LORA_KERNELS_SMALL_M_SM90_DX")};

}  // namespace

bool set_small_m_sm90(bool on) { return sm9_switch.exchange(on); }

namespace {
// Both kernels' dtypes: 16-bit x, the adapters in x's dtype or (their bf16x3 pieces) fp32 on bf16 x at r <= 16.
const char* sm9_dtypes_unsupported(DType x_dtype, DType a_dtype, DType b_dtype, int r) {
  if (x_dtype == DType::kFloat32) return "fp32 x";
  if (a_dtype == DType::kFloat32 && b_dtype == DType::kFloat32) {
    if (!sm9_fp32_on())
      return "fp32 adapters (opt-in, slower than the mma.sync kernel: LORA_KERNELS_SMALL_M_SM90_FP32=1)";
    if (x_dtype != DType::kBFloat16) return "fp32 adapters on fp16 x";
    if (r > 16) return "fp32 adapters above r = 16 (the three pieces of r columns fill 3r <= 64 rows)";
  } else if (a_dtype != x_dtype || b_dtype != x_dtype) {
    return "lora_A and lora_B neither both in x's dtype nor both fp32";
  }
  return nullptr;
}
}  // namespace

const char* lora_small_m_sm90_unsupported(const void* x, const void* W, const void* A, const void* B, int64_t M,
                                          int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype, DType b_dtype,
                                          float p) {
  if (!sm9_switch.load(std::memory_order_relaxed)) return "off (LORA_KERNELS_SMALL_M_SM90=0 or set_small_m_sm90)";
  if (const char* why = sm9_dtypes_unsupported(x_dtype, a_dtype, b_dtype, r)) return why;
  if (p > 0.f) return "dropout (the register-direct kernel's u items mask x)";
  if (M < 1 || M > 64 || N < 1 || K < 1) return "M not in 1..64, or an empty problem";
  if (r < 1 || r > 64 || r % 8) return "r not a multiple of 8 in 8..64";
  if (K % 8 || K > INT_MAX - SM9_BK || N > (int64_t)65535 * 64) return "K not a multiple of 8, or K or N too large";
  if (!aligned16(x) || !aligned16(W) || !aligned16(A) || !aligned16(B))
    return "x, weight, lora_A and lora_B must be 16-byte aligned";
  if (!sm9_device_ok()) return "not a compute capability 9.0 device with this build's sm_90a code";
  return nullptr;
}

cudaError_t launch_lora_small_m_sm90(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                     DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                     int64_t N, int64_t K, int r, float scaling, cudaStream_t stream) {
  if (lora_small_m_sm90_unsupported(x, W, A, B, M, N, K, r, x_dtype, a_dtype, b_dtype, 0.f) != nullptr)
    return cudaErrorInvalidValue;
  return sm9_launch(false, x, x_dtype, W, bias, A, a_dtype, B, y, u, M, N, K, r, scaling, stream);
}

bool set_small_m_sm90_dx(bool on) { return sm9_dx_switch.exchange(on); }

const char* lora_small_m_sm90_dx_unsupported(const void* dy, const void* W, const void* A, const void* B, int64_t M,
                                             int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype,
                                             DType b_dtype, float p) {
  if (!sm9_dx_switch.load(std::memory_order_relaxed))
    return "off (LORA_KERNELS_SMALL_M_SM90_DX=0 or set_small_m_sm90_dx)";
  if (const char* why = sm9_dtypes_unsupported(x_dtype, a_dtype, b_dtype, r)) return why;
  if (p > 0.f) return "dropout";
  if (M < 1 || M > 64 || N < 1 || K < 1) return "M not in 1..64, or an empty problem";
  if (r < 1 || r > 64 || r % 8) return "r not a multiple of 8 in 8..64";
  if (K % 8 || N % 8 || N > INT_MAX - SM9_BK || K > (int64_t)65535 * 64)
    return "K or N not a multiple of 8, or too large";
  if (!aligned16(dy) || !aligned16(W) || !aligned16(A) || !aligned16(B))
    return "dy, weight, lora_A and lora_B must be 16-byte aligned";
  if (!sm9_device_ok()) return "not a compute capability 9.0 device with this build's sm_90a code";
  return nullptr;
}

cudaError_t launch_lora_small_m_sm90_dx(const void* dy, DType x_dtype, const void* W, const void* A, DType a_dtype,
                                        const void* B, DType b_dtype, void* dx, float* sg, int64_t M, int64_t N,
                                        int64_t K, int r, float scaling, cudaStream_t stream) {
  if (lora_small_m_sm90_dx_unsupported(dy, W, A, B, M, N, K, r, x_dtype, a_dtype, b_dtype, 0.f) != nullptr)
    return cudaErrorInvalidValue;
  // the shrink's operand is lora_B (read as Bᵀ), the expand's lora_A (read as Aᵀ)
  return sm9_launch(true, dy, x_dtype, W, nullptr, B, a_dtype, A, dx, sg, M, N, K, r, scaling, stream);
}

}  // namespace lora_kernels
