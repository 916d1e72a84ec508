// The fused LoRA forward GEMM of fused_fwd_sm90.h, from CUTLASS 3.x (CuTe) parts: its collective main loop's TMA
// descriptors, shared-memory layouts and pipeline, and its TMA-store epilogue, with our own kernel body (the ping-pong
// schedule of sm90_gemm_tma_warpspecialized_pingpong.hpp, reduced to what this kernel uses and given the u tiles)
// and our own persistent tile order (TileOrder).
//
// Math:   per 128-row block m of x, 2 "u tiles" and ceil(N / 128) output tiles:
//           u tile j (j = 0, 1):  C (128 x nw) = x_m · Apⱼᵀ over K, Apⱼ = lora_A's pieces for u columns
//                                 [j rc, (j+1) rc); each K-tile's products summed into fp32 registers per u column,
//                                 times scale: u (fp32) and su = bf16(u) (x's dtype), then ready[m] += 1. With
//                                 dropout x_m is keep ⊙ x_m (its copy in shared memory masked from the keep
//                                 bits, mask_x_tile) and scale = scaling / (1 - p).
//           output tile n:        y_mn = x_m W_nᵀ + su_m Bx_nᵀ + bias_n, the last K-tile from (su, Bx), loaded
//                                 once ready[m] == 2.
// Tiling: 128 x 128 x 64 tiles, clusters of 1 x 2 along N (the x tile multicast to both), a TMA producer warp, two
//         consumer warpgroups taking tiles in turn (ping-pong: one's epilogue under the other's main loop). Tile
//         columns n = 0, 1 of a row block are its u tiles (one cluster), n >= 2 the output tiles n - 2. A u tile
//         runs a narrow wgmma (64 x nw_mma x 16) on the x tile and Ap's tile in place of W's, and stores nothing
//         through the epilogue. Every tile takes k_tiles_main + 1 pipeline stages; the last stage of a u tile is
//         not multiplied (its loads repeat K-tile 0).
// Lead:   the kLead variant has no u tiles: each row block's first S output tiles ("lead tiles", scheduled first;
//         S = ceil(r / 8) for fp32 adapters' 3 pieces; for 16-bit adapters ceil(r / 8) where they fit the tile
//         columns, else ceil(r / 32): Split) load a 32-row slot of lora_A's pieces with each stage and run a narrow
//         wgmma (N = 24, 8 or 32) on the x tile they already hold, each writing its u columns; every output tile of
//         the block, lead tiles included, waits for ready[m] == S.
//         No second read of x. With dropout (the kDrop variant: fp32 adapters on bf16 x) the x tile, which feeds the
//         output tile's own product too, is copied into registers and masked there for the u batch (lead_mask).
// Order:  TileOrder puts every u cluster (or lead cluster) first, then the output clusters. The producer waits for
//         ready[m] before the extension stage of an output tile. No wait can deadlock: the grid is no larger than the
//         clusters the device holds at once, each block walks its items in increasing order, the u items wait for
//         nothing (lead tiles write their u columns before they wait, and a row block's lead items are a few
//         consecutive ones), and every item before an output item is running on a resident block or done.
//         Serpentines: odd strips take their row blocks in decreasing order (TileOrder::snake), and an output tile of
//         an odd wave of items (item / gridDim.x odd) its K-tiles, so that each starts on the x the one before
//         it read last, while that is still in L2 (the lead tiles' first wave streams all of x).
// Wide:   the kWide variant (lead tiles, no dropout) takes 128 x 256 x 64 tiles and the cooperative schedule: both
//         consumer warpgroups work on one tile, 64 rows each (their own 64 x 256 accumulators and, in a lead tile,
//         their own 64 rows of u, each warpgroup counting itself into ready[m]: the target is twice the lead tiles);
//         the epilogue does not overlap the next tile's main loop, which the K-tiles of a large K hide. The sm_90
//         GEMM's measurements (gemm_sm90.cu: 0.97-0.98x cuBLAS's time against 0.90-0.96x for 128 x 128 ping-pong on
//         the large shapes) pick it where K and N >= 2048, and below N = 2048 where its tiles fill 1.5 waves.
// Split:  the kSplit variant (wide, 16-bit adapters read as they are) has no lead tiles: each CTA of a
//         cluster (1 x 2 tiles along N, as above) computes u's products on the K-tiles at positions t % 2 == its
//         rank (a 64 x 16 ceil(r / 16) x 16 wgmma per 64 x 16 block of x, all r
//         columns, accumulated on the tensor cores); after the main loop the partial sums go through distributed
//         shared memory (each CTA's own buffer, read by every CTA of the cluster; mbarriers with remote arrives, so
//         that the producer warp takes no part), each CTA sums them in rank order (the same bits everywhere), and
//         adds s·bf16(u) Bᵀ itself with one wgmma whose A operand is those registers (RS), B lora_B's tile of the
//         extension stage. No ready counters, no waits on other clusters: the clusters walk the row blocks in
//         order, so x is read from DRAM once, and u's products are spread evenly over the tiles (r / 512 of a
//         tile's MMAs; every cluster of a row block computes u). At 8192 x 4096 -> 1024 the kernel took 95.4 µs
//         against the lead tiles' 100.5, with 81.7 MB of DRAM reads against 126; on clusters of 4 (u computed once
//         per row block there) 146, and without u and the exchange still 129: not broken down
//         (bench/results/h100_2026-12-06/session58). With dropout (kDrop) each CTA copies its share's x tiles into
//         registers, masks them there from the keep bits of the pass before it, and runs u's products as a
//         register-A wgmma (mma_lead's masking on the warpgroup's 64 rows); the output's own product reads the
//         stage's unmasked tile, and the K order stays increasing (no K serpentine).
// Launch: params built on the host; the kernel launched on the caller's stream with its cluster shape and as a
//         programmatic dependent of the prep launch (pdl.cuh): its prologue runs under the prep's tail, and every
//         thread waits for the prep (pdl_wait) before its first global access. Without the prep (16-bit adapters read
//         as they are: lora_fused_fwd_sm90_direct) the same holds for whatever launch came before, and the ready
//         counters are the stream's, zeroed again by the last consumer warpgroup to leave (leave).
#pragma once

#include "dsmem.cuh"
#include "fused_fwd_sm90.h"
#include "pdl.cuh"

#include <atomic>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include <cutlass/util/packed_stride.hpp>
// the 64 x 24 x 16 wgmma of the lead tiles (3 pieces of 8 u columns): CuTe keeps the wgmma shapes whose N is not a
// multiple of 16 in these headers, outside its default set
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cute/atom/mma_traits_sm90_gmma_ext.hpp>

namespace lora_kernels {
namespace sm90fused {

using namespace cute;

__device__ __forceinline__ uint32_t globaltimer_lo() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return uint32_t(t);
}
__device__ __forceinline__ uint32_t smid() {
  uint32_t s;
  asm volatile("mov.u32 %0, %smid;" : "=r"(s));
  return s;
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Generic-proxy global writes (the u tiles' su) ordered with async-proxy reads (another block's TMA of su).
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// The wide variant's stand-in for the ping-pong order barrier: its consumer warpgroups share every tile, so they take
// no turns.
struct NoOrder {
  CUTLASS_DEVICE void wait() {}
  CUTLASS_DEVICE void arrive() {}
};

// The tile order: cluster-sized work items (1 x 2 tiles) in one linear order that every block walks with stride
// gridDim.x (a persistent grid, one cluster per item): first the clusters that compute u, row block by row block
// (u tiles: the Mt u clusters; lead tiles: each row block's first `lead` output clusters; the split variant: none),
// then the other output clusters in strips of `strip` cluster columns, row block by row block within a strip (x's
// row block and a strip of W stay in L2 together), odd strips in decreasing row-block order (snake). No item past the problem: CUTLASS's
// scheduler rounds the tile grid up to its swizzle, which with the two u columns would add up to 6 empty tile columns
// per row block.
struct TileOrder {
  int mt, ncl, strip;  // row blocks, output cluster columns, strip width (clusters)
  int lead;            // lead clusters per row block (lead tiles), 0 with u tiles
  // lead tiles only, ahead >= 0 (A/B timing): the lead clusters `ahead` row blocks before the other clusters
  // (FusedParams::ahead): step s holds row block s's lead clusters, then row block s - ahead's other clusters; 0 is
  // the row-block-major order (FusedParams::debug bit 7: each row block's clusters together, x's row block read by
  // all of them at about the same time). A row block's lead items still come before its other items, so the waits
  // stay deadlock-free. < 0: every lead cluster first (above).
  int ahead = -1;
  // Row serpentine: odd strips take their row blocks in decreasing order, so that a strip starts on the row blocks
  // whose x the strip before it read last (FusedParams::debug bit 10 turns it off).
  bool snake = true;
  bool split = false;  // the split variant: no u or lead items, every cluster an output cluster
  __host__ __device__ int items() const { return split || lead ? mt * ncl : mt * (1 + ncl); }
  // (row block, tile column as the kernel counts them: 0, 1 the u tiles, 2 + n the output tile n) of item i, rank r
  __device__ void tile(int i, int rank, int& m, int& n) const {
    if (lead && ahead >= 0) {
      const int d = min(ahead, mt), rest = ncl - lead;  // rest: the other clusters of a row block
      int col;
      if (i < d * lead) {  // steps [0, d): lead clusters only
        m = i / lead;
        col = i % lead;
      } else if (i < d * lead + (mt - d) * ncl) {  // steps [d, mt): lead clusters of s, then s - d's others
        const int j = i - d * lead, s = d + j / ncl, q = j % ncl;
        m = q < lead ? s : s - d;
        col = q;
      } else {  // steps [mt, mt + d): the others of the last d row blocks
        const int j = i - d * lead - (mt - d) * ncl;
        m = mt - d + j / rest;
        col = lead + j % rest;
      }
      n = 2 + 2 * col + rank;
      return;
    }
    const int first = split ? 0 : lead ? mt * lead : mt;  // the items that compute u
    if (i < first) {
      m = lead ? i / lead : i;
      n = lead ? 2 + 2 * (i % lead) + rank : rank;
      return;
    }
    const int c0 = split ? 0 : lead, cols = ncl - c0;  // the other output cluster columns: [c0, ncl)
    const int j = i - first, per_strip = mt * strip;
    const int g = j / per_strip, w = min(strip, cols - g * strip), jj = j - g * per_strip;
    m = snake && (g & 1) ? mt - 1 - jj / w : jj / w;
    n = 2 + 2 * (c0 + g * strip + jj % w) + rank;
  }
};

// kLead: the lead-tile variant (u computed by each row block's first output tiles), a kernel of its own so that the
// u-tile kernel's code is what was measured. kDrop: the lead tiles with dropout (fp32 adapters on bf16 x), also a
// kernel of its own: x's masked copy in registers takes 32 more per consumer thread, which the other lead variants'
// register allocation must not pay for. kSplit: the split variant (Split above), on the wide variant's schedule;
// with kDrop its u products take x from registers, masked there (16 more per consumer thread: its 64 rows).
template <class Element, bool kLead, bool kDrop = false, bool kWide = false, bool kSplit = false>
struct FusedFwd {
  static_assert(!kDrop || kSplit || (kLead && cute::is_same_v<Element, cutlass::bfloat16_t>),
                "dropout lead tiles: bf16 x with fp32 adapters' 3 pieces");
  static_assert(!kWide || (kLead && (!kDrop || kSplit)),
                "the wide (cooperative) variant: lead tiles without dropout, or the split variant");
  static_assert(!kSplit || kWide, "the split variant runs on the wide variant's tiles and schedule");
  // ---------------------------------------------------------------------------------------------- types
  using Tile = cute::conditional_t<kWide, Shape<_128, _256, _64>, Shape<_128, _128, _64>>;
  static constexpr int kTileN = size<1>(Tile{});
  // consumer warpgroups per tile: 2 (cooperative, 64 rows each) or 1 (ping-pong, all 128 rows)
  static constexpr int kTileWgs = kWide ? 2 : 1;
  static constexpr int kHalves = 2 / kTileWgs;  // 64-row halves of the tile per consumer thread
  static constexpr int kCn = 2;  // tiles per cluster, along N (x's tile multicast to both)
  using Cluster = Shape<_1, Int<kCn>, _1>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // W (N, K) row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;
  static constexpr int kUTiles = 2;  // u tiles per row block: one cluster
  // Lead tiles: a kApRows x 64 slot of lora_A's pieces next to each stage's x and W tiles (4 KB), for at most 6
  // stages (the count the carveout leaves for 128 x 128 x 64 16-bit tiles: 6 with or without the slots; 128 x 256
  // tiles: 3, the carveout counting 4 slots). The split variant: 64 rows (all of lora_A's r <= 64), 3 slots.
  static constexpr int kSlotRows = kSplit ? 64 : kApRows;
  static constexpr int kApSlotElems = kSlotRows * 64;
  static constexpr int kApSlotStages = kSplit ? 3 : kWide ? 4 : 6;
  // The split variant's exchange of u's partial sums: per consumer warpgroup, each thread's fragment of a 64 x 64
  // fp32 sum (at most 32 floats, as 8 float4 rows of 128 threads), and two mbarriers (full, empty) per warpgroup.
  static constexpr int kXuFloats = kSplit ? 2 * 32 * 128 : 4;
  static constexpr int kApSlotCarveout =
      (kLead ? kApSlotStages * kApSlotElems * 2 : 0) + (kSplit ? kXuFloats * 4 + 64 : 0);
  // y = alpha ⊙ acc + bias: alpha the scalar 1, or DoRA's per-column scale from a pointer (CUTLASS's row
  // broadcast takes a null pointer as "use the scalar"); the main loop keeps its 6 stages with this epilogue
  // (bench/dev/epilogue_probe.cu).
  using Fusion = cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<cutlass::epilogue::thread::Identity, Element,
                                                                          float, Element, void, float>;
  // CUTLASS's default epilogue subtiles (128 x 32 for the wide tile, 64 x 32 for ping-pong). The wide tile's main
  // loop then keeps 3 stages of 48 KB: 128 x 16 subtiles would leave room for 4, and measured 1-2% slower (session 25).
  using EpiTile = cutlass::epilogue::collective::EpilogueTileAuto;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, EpiTile,
      float, float, void, LayoutD, kAlign, Element, LayoutD, kAlign,
      cute::conditional_t<kWide, cutlass::epilogue::TmaWarpSpecializedCooperative,
                          cutlass::epilogue::TmaWarpSpecialized>,
      Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage)) +
                                                         kApSlotCarveout>,
      cute::conditional_t<kWide, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                          cutlass::gemm::KernelTmaWarpSpecializedPingpong>>::CollectiveOp;
  using Base = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    cutlass::gemm::PersistentScheduler>;
  using TiledMma = typename Mainloop::TiledMma;
  using SmemLayoutA = typename Mainloop::SmemLayoutA;
  using SmemLayoutB = typename Mainloop::SmemLayoutB;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using TMA_A = typename Mainloop::Params::TMA_A;
  using TMA_B = typename Mainloop::Params::TMA_B;
  using MainloopPipeline = typename Mainloop::MainloopPipeline;
  using PipelineState = typename Mainloop::PipelineState;
  static constexpr int kStages = Mainloop::DispatchPolicy::Stages;
  static_assert(kStages <= kApSlotStages, "the lead tiles' slots are carved out for kApSlotStages stages");
  static_assert(!kWide || kStages >= 3, "the wide tile keeps 3 stages");
  static constexpr int kMmaThreads = kTileWgs * cutlass::NumThreadsPerWarpGroup;  // threads that share a tile
  using IB = typename Mainloop::InternalElementB;
  using SmemLayoutApStage = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                                   Shape<Int<kSlotRows>, _64>{}));
  using SmemLayoutAp = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kSlotRows>, _64, Int<kStages>>{}));
  using GmemLayoutAp = Layout<Shape<int, int>, Stride<int64_t, _1>>;  // (tiles * kApRows, K) row-major
  using TMA_Ap = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                        make_tensor(make_gmem_ptr(static_cast<IB const*>(nullptr)), GmemLayoutAp{}),
                                        SmemLayoutApStage{}));
  struct SharedStorage {
    typename Base::SharedStorage base;
    alignas(1024) cute::array_aligned<Element, kLead ? kApSlotElems * kStages : 8> ap;  // the lead tiles' slots
    alignas(16) float xu[kXuFloats];  // the split variant's partial sums of u: [warpgroup][float4 row j][thread]
    alignas(8) uint64_t xbar[4];      // ... and their mbarriers: full[warpgroup], empty[warpgroup]
  };
  static constexpr int kTileK = 64;
  static_assert(Mainloop::K_PIPE_MMAS == 1, "the consumer loops keep one MMA batch in flight");
  static_assert(!cute::is_same_v<typename Mainloop::GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>,
                "B tiles differ across the cluster (1 x kCn along N)");

  struct Params {
    typename Base::Params gemm;  // main loop (x, W), epilogue, problem_shape (M, N, Kt); scheduler unused
    TMA_B tma_ap;                // (nw, K, 2) lora_A's pieces, one batch per u tile
    TMA_A tma_su;                // (M, width, 1) bf16(u)
    TMA_B tma_bx;                // (N, width, 1) lora_B padded
    TMA_Ap tma_apl;              // (tiles * kApRows, K) lora_A's pieces for the lead tiles
    FusedParams f;
    TileOrder order;
  };

  static constexpr int SharedStorageSize = sizeof(SharedStorage);
  static constexpr uint32_t MaxThreadsPerBlock = Base::MaxThreadsPerBlock;
  static constexpr uint32_t MinBlocksPerMultiprocessor = 1;

  // ---------------------------------------------------------------------------------------------- consumers
  // An output tile: K-tiles [0, kt) from (x, W), then the extension stage from (su, Bx), of whose 4 k-blocks the
  // first kb_ext hold u's columns (the rest are zeros on both sides and are skipped).
  template <class Accum>
  CUTLASS_DEVICE static void mma_output(MainloopPipeline& pipeline, PipelineState read, Accum& accum, int k_tiles,
                                        int kb_ext, int thread_idx, typename Mainloop::TensorStorage& smem) {
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), SmemLayoutB{});
    TiledMma tiled_mma;
    auto thr = tiled_mma.get_slice(thread_idx);
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // (MMA, MMA_M, MMA_K, PIPE)
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    PipelineState release = read;
    // one K-tile's batch: k-blocks [0, KB) of the stage (KB = 4: the whole 64-deep tile)
    auto issue = [&](auto kb_count, int stage) CUTLASS_LAMBDA_FUNC_INLINE {
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < decltype(kb_count)::value; ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    for (int t = 0; t < k_tiles; ++t) {
      auto token = pipeline.consumer_try_wait(read);
      pipeline.consumer_wait(read, token);
      const int stage = read.index();
      if (t < k_tiles - 1) {
        issue(Int<4>{}, stage);
      } else {  // the extension: its first kb_ext k-blocks
        switch (kb_ext) {
          case 1: issue(Int<1>{}, stage); break;
          case 2: issue(Int<2>{}, stage); break;
          case 3: issue(Int<3>{}, stage); break;
          default: issue(Int<4>{}, stage); break;
        }
      }
      if (t > 0) {
        warpgroup_wait<1>();  // the batch of K-tile t - 1 is done: release its stage
        warpgroup_fence_operand(accum);
        pipeline.consumer_release(release);
        ++release;
      }
      ++read;
    }
    warpgroup_fence_operand(accum);
  }

  // One K-tile's u products (a u or lead tile's narrow wgmma accumulator, whose column group Pieces b + p holds piece
  // p of u's column block b) added, in fp32 and per u column, into the warpgroup's sums tot[64-row half][row h][b]
  // [column c] (the D fragment's 2 adjacent columns and 2 rows 8 apart; a warpgroup holds both halves of the tile,
  // or in the wide variant its own). The caller has waited for the batch.
  template <int Blocks, int Pieces, int Halves, class Acc>
  CUTLASS_DEVICE static void add_u_products(Acc const& acc, float (&tot)[Halves][2][Blocks][2]) {
    static_assert(decltype(size<1>(acc))::value == Halves, "the accumulator's 64-row halves");
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < Halves; ++mm)
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h)
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < Blocks; ++b)
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < 2; ++c) {
            float v = 0.f;
            CUTLASS_PRAGMA_UNROLL
            for (int p = 0; p < Pieces; ++p) v += acc(make_coord(c, h, Pieces * b + p), mm, 0);
            tot[mm][h][b][c] += v;
          }
  }

  // A row block's u columns col0 + 8 b + 0..7 (b < Blocks) from a warpgroup's fp32 sums tot[64-row half][row h]
  // [b][column c] (the wgmma D fragment's (2 adjacent columns, 2 rows 8 apart) of its first column group; cU: the
  // (row, column) of each accumulator element, rows counted from row0 of the 128-row block): u (fp32) and
  // su = bf16(u), times scale, written; fenced for other blocks' TMA of su; then, once every thread of the warpgroup
  // has written, the row block's ready count raised (by each warpgroup of the wide variant for its own rows).
  template <int Blocks, int Halves, class CoordTensor>
  CUTLASS_DEVICE static void publish_u(float const (&tot)[Halves][2][Blocks][2], CoordTensor const& cU,
                                       FusedParams const& f, int m_blk, int row0, int col0, int thread_idx,
                                       int wg) {
    Element* su = static_cast<Element*>(f.su);
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < Halves; ++mm)
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h)
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < Blocks; ++b)
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < 2; ++c) {
            const float v = tot[mm][h][b][c] * f.scale;
            const auto rc = cU(make_coord(c, h, 0), mm, 0);  // group 0: its column is n0 + c < 8
            const int row = m_blk * 128 + row0 + get<0>(rc);
            const int col = col0 + 8 * b + get<1>(rc);
            if (row < f.M) {
              if (col < f.r && !(f.debug & 16)) f.u[(int64_t)row * f.r + col] = v;
              su[(int64_t)row * f.width + col] = Element(v);
            }
          }
    fence_proxy_async_global();
    __threadfence();
    cutlass::arch::NamedBarrier::sync(128, wg);  // every thread's u written and fenced
    if (thread_idx % cutlass::NumThreadsPerWarpGroup == 0) atomicAdd(f.ready + m_blk, 1);
  }

  // Dropout on a lead tile: x's tile is copied from the stage into the registers of the u batch's A operand (the
  // stage's own tile feeds the output's product unmasked) and masked there. The RS wgmma's A fragment
  // (GMMA::ALayout_64x16 per 64 x 16 block) gives warpgroup thread t rows base + 8 v1 + 64 mm (base = (t / 4) % 8 +
  // 16 (t / 32); mm: the 64-row half) and columns 16 kb + 2 (t % 4) + v0 + 8 v2 of the K-tile: so, of each row's 8
  // keep bytes (one per 8-group), the thread needs bits 2 (t % 4) and 2 (t % 4) + 1 of byte 2 kb + v2.
  // lead_keep_fetch reads the 8 bytes of the thread's 4 rows for K-tile t (one K-tile ahead), lead_keep_pack keeps
  // those 2 bits of each (rows 2 i' and 2 i' + 1 in bits[i']); rows past M read as all kept (their x is TMA's
  // zeros). Debug bit 32 (FusedParams::debug): no loads, everything kept (timing only).
  CUTLASS_DEVICE static int lead_row(int thread_idx, int i) {  // i = 2 mm + v1
    return ((thread_idx >> 2) & 7) + 16 * (thread_idx >> 5) + 8 * (i & 1) + 64 * (i >> 1);
  }
  // halves = 1 (the split variant): the thread's 2 rows of the warpgroup's 64-row half at row0 (raw[0], raw[1]).
  CUTLASS_DEVICE static void lead_keep_fetch(uint2 (&raw)[4], FusedParams const& f, int m_blk, int t,
                                              int thread_idx, int halves = 2, int row0 = 0) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int64_t m = int64_t(m_blk) * 128 + row0 + lead_row(thread_idx, i), g0 = int64_t(t) * 8;
      raw[i] = make_uint2(~0u, ~0u);
      if (i >= 2 * halves || m >= f.M || (f.debug & 32)) continue;
      const uint8_t* row = f.keep + m * f.groups + g0;
      if ((f.groups & 7) == 0) {  // K % 64 == 0: the K-tile's 8 bytes, 8-byte aligned (the bits' piece is aligned)
        raw[i] = __ldg(reinterpret_cast<const uint2*>(row));
      } else {
        uint32_t b8[2] = {0u, 0u};
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < 8; ++b)
          b8[b >> 2] |= uint32_t(g0 + b < f.groups ? __ldg(row + b) : 0xFF) << (8 * (b & 3));
        raw[i] = make_uint2(b8[0], b8[1]);
      }
    }
  }
  // bits q, q + 1 of each byte, packed: bits 2 g, 2 g + 1 of a row's 16 are those of 8-group g
  CUTLASS_DEVICE static void lead_keep_pack(uint32_t (&bits)[2], uint2 const (&raw)[4], int thread_idx) {
    const int q = 2 * (thread_idx & 3);
    auto pack4 = [](uint32_t v) {
      v &= 0x03030303u;
      v = (v | (v >> 6)) & 0x000F000Fu;
      return (v | (v >> 12)) & 0xFFu;
    };
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t row16 = pack4(raw[i].x >> q) | (pack4(raw[i].y >> q) << 8);
      if (i & 1) bits[i >> 1] |= row16 << 16;
      else bits[i >> 1] = row16;
    }
  }
  // x's registers (the RS A fragment of one K-tile) times the keep mask: bf16x2 / f16x2 multiplies by 1 or 0, so
  // NaN and inf stay NaN, as in the reference's x * keep.
  template <class Frag>
  CUTLASS_DEVICE static void lead_mask(Frag& frag, uint32_t const (&bits)[2]) {
    constexpr int kH = decltype(size<1>(frag))::value;  // 64-row halves: 2, or 1 in the split variant
    static_assert(decltype(size<0>(frag))::value == 8 && (kH == 1 || kH == 2) && decltype(size<2>(frag))::value == 4,
                  "(8 values, 1 or 2 halves of 64 rows, 4 k-blocks of 16) per thread");
    constexpr uint32_t kOne = cute::is_same_v<Element, cutlass::bfloat16_t> ? 0x3F80u : 0x3C00u;  // 1.0
    Tensor w = recast<uint32_t>(frag);  // (4 pairs, kH, 4): pair v1 + 2 v2 holds values v0 = 0, 1
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kH; ++mm)
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < 4; ++kb)
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < 4; ++r) {
          const int i = 2 * mm + (r & 1), g = 2 * kb + (r >> 1);
          const uint32_t two = bits[i >> 1] >> (16 * (i & 1) + 2 * g);
          const uint32_t keep2 = (two & 1u ? kOne : 0u) | (two & 2u ? kOne << 16 : 0u);
          uint32_t v = w(r, mm, kb);
          if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) {
            __nv_bfloat162 p = __hmul2(*reinterpret_cast<__nv_bfloat162 const*>(&v),
                                       *reinterpret_cast<__nv_bfloat162 const*>(&keep2));
            v = *reinterpret_cast<uint32_t*>(&p);
          } else {
            __half2 p = __hmul2(*reinterpret_cast<__half2 const*>(&v), *reinterpret_cast<__half2 const*>(&keep2));
            v = *reinterpret_cast<uint32_t*>(&p);
          }
          w(r, mm, kb) = v;
        }
  }

  // An output tile of the lead kernel. A lead tile (j < lead of its row block) runs, with each main K-tile, narrow
  // wgmmas (64 x NW x 16, NW = 8 Blocks Pieces: 24 for fp32 adapters' 3 pieces of 8 u columns, 8 or 32 for 16-bit
  // adapters' 8 or 32 u columns) of the same x tile by the first NW rows of the stage's slot of lora_A's pieces into
  // a u accumulator (as a batch of its own before the main one: interleaved with the main wgmmas it was slower in
  // every cell timed, bench/results/FINDINGS.md), and adds each K-tile's products into fp32 registers (tot, per u column) while the K-tile's main
  // wgmmas run: the tensor cores' accumulation is not an IEEE fp32 sum, and a K-long chain of it misses the
  // tolerance rule for u. After the main K-tiles it writes u's columns rc j .. rc j + rc - 1 (rc = 8 Blocks) of the
  // row block and raises the ready count, before the extension stage is waited for (its load waits for every lead
  // tile of the row block, this one included). Other tiles run mma_output's loop. One function, one loop for both,
  // so that the compiler keeps a single accumulator (two loops merged an undefined accumulator into zeros inside a
  // wgmma batch, which makes ptxas serialize every wgmma of the kernel). The last stage is released by the caller
  // (release_last), as after mma_output. kMask (dropout): the u batch's x comes from registers, the stage's tile
  // copied in and masked from the keep bits fetched a K-tile ahead (lead_keep_fetch, lead_keep_pack, lead_mask).
  template <int Blocks, int Pieces, bool kMask, class Accum>
  CUTLASS_DEVICE static void mma_lead(MainloopPipeline& pipeline, PipelineState read, Accum& accum, int k_tiles,
                                      int thread_idx, typename Mainloop::TensorStorage& smem, Element* ap_slots,
                                      FusedParams const& f, int m_blk, int j, bool is_lead, int wg) {
    constexpr int kNW = 8 * Blocks * Pieces;
    static_assert(kNW <= kApRows, "a lead tile's pieces fit its slot");
    static_assert(kNW == 8 || kNW == 24 || kNW == 32, "one wgmma per 64 x 16 block of x: N = 8, 24 or 32");
    constexpr bool kBf16 = cute::is_same_v<Element, cutlass::bfloat16_t>;
    // without dropout both operands come from shared memory (SS); with it x comes from registers (RS), masked there
    using Atom24 = cute::conditional_t<
        kMask,
        cute::conditional_t<kBf16, SM90_64x24x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>,
                            SM90_64x24x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::K>>,
        cute::conditional_t<kBf16, SM90_64x24x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>,
                            SM90_64x24x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>>>;
    using AtomN = cute::conditional_t<  // N = 8 or 32
        kMask,
        decltype(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kNW == 24 ? 32 : kNW>, _64>,
                                      GMMA::Major::K, GMMA::Major::K>()),
        decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kNW == 24 ? 32 : kNW>, _64>,
                                      GMMA::Major::K, GMMA::Major::K>())>;
    using UAtom = cute::conditional_t<kNW == 24, Atom24, AtomN>;
    using UMma = decltype(make_tiled_mma(UAtom{}));
    static_assert(size<1>(typename UMma::AtomShape_MNK{}) == kNW, "one atom spans the kNW columns");
    // the slot's first kNW rows: the same swizzled 8-row atoms as the slot's own layout
    using SmemLayoutU = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kNW>, _64>{}));
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), SmemLayoutB{});
    TiledMma tiled_mma;
    auto thr = tiled_mma.get_slice(thread_idx);
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    // The u batch's rows: the whole x tile, or in the wide variant the warpgroup's own 64 rows (a one-atom tiled MMA
    // on that half: a tiled MMA of two atoms across both warpgroups makes ptxas serialize the kernel's wgmmas, C7515)
    constexpr int kURows = 128 / kTileWgs;
    auto sAu = [&] {
      if constexpr (kWide) return flat_divide(sA, Shape<_64, _64>{})(_, _, wg, 0, _);  // (64, 64, PIPE)
      else return sA;
    }();
    UMma umma;
    auto thr_u = umma.get_slice(thread_idx % cutlass::NumThreadsPerWarpGroup);
    // SS: x's tile in the stage as the wgmma's A; RS: its registers (the stage's tile copied in, then masked)
    auto tUrA = [&] {
      if constexpr (kMask) return thr_u.partition_fragment_A(sAu(_, _, 0));  // (MMA, MMA_M, MMA_K)
      else return thr_u.make_fragment_A(thr_u.partition_A(sAu));           // (MMA, MMA_M, MMA_K, PIPE)
    }();
    Tensor acc = partition_fragment_C(umma, Shape<Int<kURows>, Int<kNW>>{});
    static_assert(size<1>(decltype(acc){}) == kHalves, "the thread's 64-row halves of the 128-row tile");
    float tot[kHalves][2][Blocks][2] = {};
    const int kt_main = k_tiles - 1;
    // Zeroed once, then opaque to the compiler: a known-zero u accumulator gets rematerialised on the other tiles'
    // path, and non-wgmma writes to accumulator registers under an in-flight batch make ptxas serialize (C7515).
    clear(acc);
    warpgroup_fence_operand(acc);
    PipelineState release = read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    uint2 keep_raw[4];  // with dropout: the next K-tile's keep bytes, loaded under this one's MMAs
    if constexpr (kMask) {
      if (is_lead) lead_keep_fetch(keep_raw, f, m_blk, 0, thread_idx);
    }
    auto main_batch = [&](int stage) CUTLASS_LAMBDA_FUNC_INLINE {
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    const bool u_batch = is_lead && !(f.debug & 64);  // debug bit 6: no u batch (wrong u: timing only)
    for (int t = 0; t < kt_main; ++t) {
      auto token = pipeline.consumer_try_wait(read);
      pipeline.consumer_wait(read, token);
      const int stage = read.index();
      // The lead tile's K-tile in one branch, u batch to drain, so that the u accumulator is not merged with the
      // other tiles' path inside the K-tile.
      if (u_batch) {
        Tensor sU = make_tensor(make_smem_ptr(ap_slots + stage * kApSlotElems), SmemLayoutU{});
        Tensor tUrB = thr_u.make_fragment_B(thr_u.partition_B(sU));  // (MMA, MMA_N, MMA_K)
        // the u batch first (with dropout from x's copy in registers, masked there), then the main batch
        if constexpr (kMask) {
          auto x_copy = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, umma);
          auto thr_copy = x_copy.get_slice(thread_idx);
          warpgroup_fence_operand(tUrA);
          copy(x_copy, thr_copy.partition_S(sA)(_, _, _, stage), thr_copy.retile_D(tUrA));
          uint32_t keep[2];
          lead_keep_pack(keep, keep_raw, thread_idx);
          lead_mask(tUrA, keep);
          warpgroup_fence_operand(tUrA);
        }
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        umma.accumulate_ = GMMA::ScaleOut::Zero;
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < size<2>(tUrA); ++k_block) {
          if constexpr (kMask) cute::gemm(umma, tUrA(_, _, k_block), tUrB(_, _, k_block), acc);
          else cute::gemm(umma, tUrA(_, _, k_block, stage), tUrB(_, _, k_block), acc);
          umma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        main_batch(stage);
        if constexpr (kMask) {
          if (t + 1 < kt_main) lead_keep_fetch(keep_raw, f, m_blk, t + 1, thread_idx);
        }
        // One batch left in flight (this K-tile's main batch): the u batch and K-tile t - 1's main batch are
        // done. The u sums are drained under the main batch, so the tensor cores do not wait for the drain.
        warpgroup_wait<1>();
        warpgroup_fence_operand(accum);
        warpgroup_fence_operand(acc);
        if constexpr (kMask) warpgroup_fence_operand(tUrA);  // read by the u batch, now done: free to reload
        add_u_products<Blocks, Pieces>(acc, tot);
      } else {
        main_batch(stage);
        warpgroup_wait<1>();  // K-tile t - 1's main batch is done
        warpgroup_fence_operand(accum);
      }
      if (t > 0) {  // K-tile t - 1's stage
        pipeline.consumer_release(release);
        ++release;
      }
      ++read;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    if (kt_main > 0) {  // the last main K-tile's stage
      pipeline.consumer_release(release);
      ++release;
    }

    if (is_lead)  // u's columns rc j .. rc j + rc - 1 of the row block
      publish_u<Blocks>(tot, thr_u.partition_C(make_identity_tensor(Shape<Int<kURows>, Int<kNW>>{})), f, m_blk,
                        kWide ? kURows * wg : 0, 8 * Blocks * j, thread_idx, wg);

    // the extension stage: (su, Bx), its first kb_ext k-blocks
    auto token = pipeline.consumer_try_wait(read);
    pipeline.consumer_wait(read, token);
    const int stage = read.index();
    auto ext = [&](auto kb_count) {
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < decltype(kb_count)::value; ++k_block)
        cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
      warpgroup_commit_batch();
    };
    switch (f.kb_ext) {
      case 1: ext(Int<1>{}); break;
      case 2: ext(Int<2>{}); break;
      case 3: ext(Int<3>{}); break;
      default: ext(Int<4>{}); break;
    }
    warpgroup_fence_operand(accum);
  }

  // After a split tile's main loop (its share of u's products in acc, per thread the D fragment's (2 adjacent
  // columns) x (2 rows 8 apart) x (Blocks groups of 8 columns) of the warpgroup's 64 x kNW partial sum):
  //  1. exchange: the warpgroup writes acc into its buffer (float4 row j = group j's 4 values, [j][thread]), once
  //     every warpgroup of the cluster has read the previous tile's (empty); counts itself into the full mbarrier of
  //     each CTA of the cluster; waits for its own (all kCn partial sums written); reads the kCn buffers of its rows
  //     (its own warpgroup index in each CTA) and sums them in rank order from zero, so that every CTA holds the same
  //     bits; counts itself into each CTA's empty mbarrier.
  //  2. u = scale · sum: written (fp32, the backward's) by the row block's first cluster, each CTA its column groups
  //     b % kCn == rank; rounded to x's dtype into the A fragment of an RS wgmma (64 x 256 x 16: the D fragment's
  //     (row, column) pairs are the A fragment's, value v0 + 2 v1 + 4 v2 = (column + v0, row + 8 v1, column + 8 v2)).
  //  3. the extension stage (its B slot: lora_B's tile, columns past r TMA's zeros; its A slot unused): accum +=
  //     bf16(u) Bxᵀ over ceil(kNW / 16) k-blocks. The caller releases the stage (release_last).
  template <int Blocks, class Accum, class UAcc, class CoordTensor>
  CUTLASS_DEVICE static void split_expand(MainloopPipeline& pipeline, PipelineState read, Accum& accum,
                                          UAcc const& acc, CoordTensor const& cU,
                                          typename Mainloop::TensorStorage& smem, FusedParams const& f, int m_blk,
                                          bool write_u, int rank, int wg, int wg_thread, int tile_i, float* xu,
                                          uint64_t* xbar) {
    static_assert(Blocks % 2 == 0 && Blocks <= 8, "k-blocks of 16 u columns, at most 64");
    float4* mine = reinterpret_cast<float4*>(xu) + wg * 8 * cutlass::NumThreadsPerWarpGroup;
    const uint32_t full = cute::cast_smem_ptr_to_uint(xbar + wg);
    const uint32_t empty = cute::cast_smem_ptr_to_uint(xbar + 2 + wg);
    const bool exchange = !(f.debug & 2048);  // debug bit 11: each CTA its own partial sum (wrong u: timing only)
    if (exchange && tile_i > 0) detail::mbar_wait_cluster(empty, uint32_t(tile_i - 1) & 1u);
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < Blocks; ++b)
      mine[b * cutlass::NumThreadsPerWarpGroup + wg_thread] =
          make_float4(acc(make_coord(0, 0, b), 0, 0), acc(make_coord(1, 0, b), 0, 0), acc(make_coord(0, 1, b), 0, 0),
                      acc(make_coord(1, 1, b), 0, 0));
    asm volatile("fence.acq_rel.cluster;" ::: "memory");
    cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, wg);
    if (exchange && wg_thread == 0) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCn; ++c) detail::mbar_arrive_cluster(full, c);
    }
    if (exchange) detail::mbar_wait_cluster(full, uint32_t(tile_i) & 1u);
    float4 sum[Blocks];
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < Blocks; ++b) sum[b] = make_float4(0.f, 0.f, 0.f, 0.f);
    const uint32_t own = cute::cast_smem_ptr_to_uint(mine + wg_thread);
    constexpr int kChunk = Blocks < 4 ? Blocks : 4;  // float4 loads in flight per CTA read (registers: 4 per load)
    CUTLASS_PRAGMA_UNROLL
    for (int b0 = 0; b0 < Blocks; b0 += kChunk)
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCn; ++c) {
        const uint32_t at = detail::cluster_addr(own, exchange ? c : rank);
        float4 v[kChunk];
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < kChunk; ++b)
          v[b] = detail::ld_cluster4(at + (b0 + b) * cutlass::NumThreadsPerWarpGroup * 16);
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < kChunk; ++b) {
          sum[b0 + b].x += v[b].x;
          sum[b0 + b].y += v[b].y;
          sum[b0 + b].z += v[b].z;
          sum[b0 + b].w += v[b].w;
        }
      }
    cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, wg);  // every thread's reads are back
    if (exchange && wg_thread == 0) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCn; ++c) detail::mbar_arrive_cluster(empty, c);
    }

    float u[2][Blocks][2];  // [row + 8 h][group b][column + c]
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < Blocks; ++b) {
      u[0][b][0] = sum[b].x * f.scale;
      u[0][b][1] = sum[b].y * f.scale;
      u[1][b][0] = sum[b].z * f.scale;
      u[1][b][1] = sum[b].w * f.scale;
    }
    if (write_u && !(f.debug & 16)) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h)
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < Blocks; ++b)
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < 2; ++c) {
            if (b % kCn != rank) continue;
            const auto rc = cU(make_coord(c, h, 0), 0, 0);  // group 0: its column is c0 + c < 8
            const int row = m_blk * 128 + 64 * wg + get<0>(rc), col = 8 * b + get<1>(rc);
            if (row < f.M && col < f.r) f.u[(int64_t)row * f.r + col] = u[h][b][c];
          }
    }

    using XAtom = decltype(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kTileN>, _64>,
                                                GMMA::Major::K, GMMA::Major::K>());
    using XMma = decltype(make_tiled_mma(XAtom{}));
    XMma xmma;
    auto thr_x = xmma.get_slice(wg_thread);
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), SmemLayoutB{});
    auto sAu = flat_divide(sA, Shape<_64, _64>{})(_, _, wg, 0, _);  // (64, 64, PIPE): the warpgroup's rows
    Tensor tXrA = thr_x.partition_fragment_A(sAu(_, _, 0));          // (MMA, 1, 4) registers
    Tensor tXrB = thr_x.make_fragment_B(thr_x.partition_B(sB));      // (MMA, 1, 4, PIPE)
    static_assert(decltype(size<0>(tXrA))::value == 8 && decltype(size<2>(tXrA))::value == 4,
                  "8 values per thread per 64 x 16 k-block, 4 k-blocks");
    constexpr int KB = Blocks / 2;
    CUTLASS_PRAGMA_UNROLL
    for (int kb = 0; kb < KB; ++kb)
      CUTLASS_PRAGMA_UNROLL
      for (int v = 0; v < 8; ++v) tXrA(v, 0, kb) = Element(u[(v >> 1) & 1][2 * kb + (v >> 2)][v & 1]);
    auto token = pipeline.consumer_try_wait(read);
    pipeline.consumer_wait(read, token);
    const int stage = read.index();
    warpgroup_fence_operand(tXrA);
    warpgroup_fence_operand(accum);
    warpgroup_arrive();
    CUTLASS_PRAGMA_UNROLL
    for (int kb = 0; kb < KB; ++kb) cute::gemm(xmma, tXrA(_, _, kb), tXrB(_, _, kb, stage), accum);
    warpgroup_commit_batch();
    warpgroup_fence_operand(accum);
  }

  // Dropout in a u tile: its copy of x's K-tile t (128 x 64 in the stage's A slot, swizzled in 16-byte chunks of 8
  // elements) masked in place. Chunk (row, c) of thread chunk i (g = thread + 128 i: row g / 8, c = g % 8) is the
  // 8-group (m, k8) = (128 m_blk + row, 8 t + c), whose keep byte the caller loaded into kb[i] (load_keep: one K-tile
  // ahead, under the MMAs of the one before); a dropped element is multiplied by 0 (bf16x2 / f16x2 multiplies), so
  // NaN and inf stay NaN, as in the reference's x * keep. Rows past M and groups past K hold TMA's zeros (their byte
  // reads 0xFF: left alone). Then the writes are made visible to the wgmma (async proxy) and every thread of the
  // warpgroup waits for all of them.
  CUTLASS_DEVICE static void load_keep(uint32_t (&kb)[8], FusedParams const& f, int m_blk, int t, int thread_idx) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 8; ++i) {
      const int g = thread_idx + 128 * i;
      const int64_t m = int64_t(m_blk) * 128 + (g >> 3), k8 = int64_t(t) * 8 + (g & 7);
      kb[i] = (m < f.M && k8 < f.groups) ? uint32_t(__ldg(f.keep + m * f.groups + k8)) : 0xFFu;
    }
  }
  template <class SmemTensor>
  CUTLASS_DEVICE static void mask_x_tile(SmemTensor& sA, int stage, uint32_t const (&kb)[8], int thread_idx, int wg) {
    constexpr uint32_t kOne = cute::is_same_v<Element, cutlass::bfloat16_t> ? 0x3F80u : 0x3C00u;  // 1.0
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 8; ++i) {
      if (kb[i] == 0xFFu) continue;  // all kept (or outside the problem)
      const int g = thread_idx + 128 * i;
      uint4* chunk = reinterpret_cast<uint4*>(raw_pointer_cast(&sA(g >> 3, 8 * (g & 7), stage)));
      uint4 v = *chunk;
      uint32_t* vw = &v.x;
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < 4; ++q) {  // elements 2q (low half) and 2q + 1 (high half)
        const uint32_t keep2 = ((kb[i] >> (2 * q)) & 1u ? kOne : 0u) | ((kb[i] >> (2 * q + 1)) & 1u ? kOne << 16 : 0u);
        if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) {
          __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162 const*>(&vw[q]),
                                     *reinterpret_cast<__nv_bfloat162 const*>(&keep2));
          vw[q] = *reinterpret_cast<uint32_t*>(&r);
        } else {
          __half2 r = __hmul2(*reinterpret_cast<__half2 const*>(&vw[q]), *reinterpret_cast<__half2 const*>(&keep2));
          vw[q] = *reinterpret_cast<uint32_t*>(&r);
        }
      }
      *chunk = v;
    }
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(128, wg);
  }

  // A u tile: x_m · Apⱼᵀ over the k_tiles - 1 main K-tiles with a 64 x NW x 16 wgmma on the first NW rows of the B
  // slot (Ap's tile), x masked first with dropout, then the stage of the extension slot (not multiplied); then, out
  // of the ordered section, u written. Returns after the ready count is raised.
  template <int Blocks, int Pieces, class Arrive>
  CUTLASS_DEVICE static void u_tile(MainloopPipeline& pipeline, PipelineState read, int k_tiles, int thread_idx,
                                    typename Mainloop::TensorStorage& smem, FusedParams const& f, int m_blk, int j,
                                    int wg, Arrive&& arrive_ordered) {
    constexpr int kNW = 8 * Blocks * Pieces;                   // rows of Ap that hold pieces
    constexpr int kNWm = kNW <= 8 ? 8 : kNW <= 16 ? 16 : kNW <= 32 ? 32 : kNW <= 64 ? 64 : 96;  // wgmma N
    static_assert(kNW <= 96, "at most 4 column blocks of 3 pieces");
    using Atom = decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kNWm>, _64>, GMMA::Major::K,
                                               GMMA::Major::K>());
    using UMma = decltype(make_tiled_mma(Atom{}));
    using SmemLayoutU = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kNWm>, _64>{}));
    static_assert(cute::is_same_v<typename Mainloop::SmemLayoutAtomB, GMMA::Layout_K_SW128_Atom<Element>>,
                  "Ap's rows are the first rows of the B slot's layout");
    constexpr int kStageElems = size<0>(Tile{}) * kTileK;  // B slot stage stride (elements)

    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    UMma umma;
    auto thr = umma.get_slice(thread_idx);
    Tensor tUrA = thr.make_fragment_A(thr.partition_A(sA));  // (MMA, MMA_M, MMA_K, PIPE)
    Tensor acc = partition_fragment_C(umma, Shape<_128, Int<kNWm>>{});
    // Each K-tile's products are summed in the wgmma accumulator and then added, in fp32 and per u column, into
    // tot: the tensor cores' accumulation is not an IEEE fp32 sum, and a 4096-long chain of it misses the tolerance
    // rule for u (the streaming shrink sums the same way, per 64-wide K tile). The wait per K-tile costs little: a u
    // tile is bound by its loads.
    float tot[2][2][Blocks][2] = {};
    static_assert(size<1>(decltype(acc){}) == 2, "two 64-row halves of the 128-row tile");
    const bool dropout = f.keep != nullptr;
    uint32_t kb[8];  // with dropout: this K-tile's keep bytes, loaded during the previous one
    if (dropout) load_keep(kb, f, m_blk, 0, thread_idx);
    for (int t = 0; t < k_tiles; ++t) {
      auto token = pipeline.consumer_try_wait(read);
      pipeline.consumer_wait(read, token);
      const int stage = read.index();
      if (t < k_tiles - 1 && !(f.debug & 2)) {
        if (dropout) mask_x_tile(sA, stage, kb, thread_idx, wg);
        Tensor sU = make_tensor(make_smem_ptr(smem.smem_B.data() + stage * kStageElems), SmemLayoutU{});
        Tensor tUrB = thr.make_fragment_B(thr.partition_B(sU));  // (MMA, MMA_N, MMA_K)
        umma.accumulate_ = GMMA::ScaleOut::Zero;
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < size<2>(tUrA); ++k_block) {
          cute::gemm(umma, tUrA(_, _, k_block, stage), tUrB(_, _, k_block), acc);
          umma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        if (dropout && t + 1 < k_tiles - 1) load_keep(kb, f, m_blk, t + 1, thread_idx);  // under the MMAs
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc);
        add_u_products<Blocks, Pieces>(acc, tot);
      }
      pipeline.consumer_release(read);  // its MMAs are done (or there were none)
      ++read;
    }
    arrive_ordered();

    publish_u<Blocks>(tot, thr.partition_C(make_identity_tensor(Shape<_128, Int<kNWm>>{})), f, m_blk, 0,
                      j * 8 * Blocks, thread_idx, wg);
  }

  // An output tile of the lead kernel on the mma_lead instance of this launch's split: fp32 adapters on bf16 x, 8 u
  // columns of 3 pieces per lead tile (with dropout, x masked in registers); 16-bit adapters, 8 or 32 columns of 1.
  template <class Accum>
  CUTLASS_DEVICE static void lead_tile(MainloopPipeline& pipeline, PipelineState read, Accum& accum, int k_tiles,
                                       int thread_idx, typename Mainloop::TensorStorage& smem, Element* ap_slots,
                                       FusedParams const& f, int m_blk, int n_out, int wg) {
    const bool is_lead = n_out < f.lead;
    if constexpr (kDrop) {
      mma_lead<1, 3, true>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, n_out, is_lead, wg);
    } else {
      bool three = false;
      if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) three = f.pieces == 3;
      if (three)
        mma_lead<1, 3, false>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, n_out, is_lead, wg);
      else if (f.blocks == 1)
        mma_lead<1, 1, false>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, n_out, is_lead, wg);
      else
        mma_lead<4, 1, false>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, n_out, is_lead, wg);
    }
  }

  // A tile of the split variant (kNW = 8 Blocks = 16 ceil(r / 16) u columns): the main loop, in which the K-tiles
  // at positions t % kCn == rank (this CTA's share) also run a 64 x kNW x 16 wgmma per 64 x 16 block of x (the
  // warpgroup's rows) by the stage's slot of lora_A's rows, in the same batch, ahead of the main wgmmas. u's products
  // accumulate in the wgmma accumulator over the share's K-tiles (half of K: the tensor cores' sum is far
  // inside the tolerance of a 16-bit u; fp32 adapters, whose baseline is an fp32 u, do not take this variant). Then
  // split_expand. One loop for every K-tile, the u accumulator zeroed before it, as in mma_lead (ptxas C7515).
  // With dropout (kDrop) the share's x tiles are copied into registers and masked there (the stage's tile feeds the
  // output's own product unmasked), from the keep bits fetched one share K-tile ahead, and the u products run as a
  // register-A wgmma, as mma_lead's. That block is written out here rather than shared with mma_lead: as a shared
  // helper it left ptxas short of registers in this kernel, which then serialised its wgmmas (C7512), as it does in
  // the fp16 instance (not built).
  template <int Blocks, class Accum>
  CUTLASS_DEVICE static void mma_split(MainloopPipeline& pipeline, PipelineState read, Accum& accum, int k_tiles,
                                       int thread_idx, typename Mainloop::TensorStorage& smem, Element* ap_slots,
                                       FusedParams const& f, int m_blk, int rank, int wg, int tile_i, bool write_u,
                                       float* xu, uint64_t* xbar) {
    constexpr int kNW = 8 * Blocks;
    static_assert(kNW == 16 || kNW == 32 || kNW == 64, "u's columns rounded up to 16, at most 64");
    constexpr bool kMask = kDrop;
    using UMma = decltype(make_tiled_mma(cute::conditional_t<
        kMask,
        decltype(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kNW>, _64>, GMMA::Major::K,
                                      GMMA::Major::K>()),
        decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kNW>, _64>, GMMA::Major::K,
                                      GMMA::Major::K>())>{}));
    using SmemLayoutU = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kNW>, _64>{}));
    const int wg_thread = thread_idx % cutlass::NumThreadsPerWarpGroup;
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), SmemLayoutB{});
    TiledMma tiled_mma;
    auto thr = tiled_mma.get_slice(thread_idx);
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    auto sAu = flat_divide(sA, Shape<_64, _64>{})(_, _, wg, 0, _);  // (64, 64, PIPE): the warpgroup's rows
    UMma umma;
    auto thr_u = umma.get_slice(wg_thread);
    // SS: the stage's x tile as the wgmma's A, (MMA, 1, 4, PIPE); RS: its registers, (MMA, 1, 4)
    auto tUrA = [&] {
      if constexpr (kMask) return thr_u.partition_fragment_A(sAu(_, _, 0));
      else return thr_u.make_fragment_A(thr_u.partition_A(sAu));
    }();
    Tensor acc = partition_fragment_C(umma, Shape<_64, Int<kNW>>{});
    clear(acc);
    warpgroup_fence_operand(acc);
    umma.accumulate_ = GMMA::ScaleOut::One;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    PipelineState release = read;
    const int kt_main = k_tiles - 1;
    const bool u_on = !(f.debug & 64);  // debug bit 6: no u products (wrong u and y: timing only)
    uint2 keep_raw[4];  // with dropout: the keep bytes of the share's next K-tile, loaded under the MMAs before it
    if constexpr (kMask) {
      if (u_on && rank < kt_main) lead_keep_fetch(keep_raw, f, m_blk, rank, wg_thread, 1, 64 * wg);
    }
    for (int t = 0; t < kt_main; ++t) {
      auto token = pipeline.consumer_try_wait(read);
      pipeline.consumer_wait(read, token);
      const int stage = read.index();
      auto main_mmas = [&] {
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
          cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
      };
      // each branch a whole batch (arrive to commit), so that no register move of the untouched u accumulator
      // lands inside a batch (ptxas then injects arrives: C7519)
      if (u_on && t % kCn == rank) {
        Tensor sU = make_tensor(make_smem_ptr(ap_slots + stage * kApSlotElems), SmemLayoutU{});
        Tensor tUrB = thr_u.make_fragment_B(thr_u.partition_B(sU));  // (MMA, 1, 4)
        if constexpr (kMask) {  // x's 64 x 64 block of this warpgroup into registers, times the keep bits
          auto x_copy = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, umma);
          auto thr_copy = x_copy.get_slice(wg_thread);
          warpgroup_fence_operand(tUrA);
          copy(x_copy, thr_copy.partition_S(sAu)(_, _, _, stage), thr_copy.retile_D(tUrA));
          uint32_t keep[2];
          lead_keep_pack(keep, keep_raw, wg_thread);
          lead_mask(tUrA, keep);
          warpgroup_fence_operand(tUrA);
        }
        warpgroup_fence_operand(accum);
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < size<2>(tUrA); ++k_block) {
          if constexpr (kMask) cute::gemm(umma, tUrA(_, _, k_block), tUrB(_, _, k_block), acc);
          else cute::gemm(umma, tUrA(_, _, k_block, stage), tUrB(_, _, k_block), acc);
        }
        main_mmas();
        warpgroup_commit_batch();
        if constexpr (kMask) {
          if (t + kCn < kt_main) lead_keep_fetch(keep_raw, f, m_blk, t + kCn, wg_thread, 1, 64 * wg);
        }
      } else {
        warpgroup_fence_operand(accum);
        warpgroup_arrive();
        main_mmas();
        warpgroup_commit_batch();
      }
      warpgroup_wait<1>();  // K-tile t - 1's batch is done
      warpgroup_fence_operand(accum);
      warpgroup_fence_operand(acc);
      if constexpr (kMask) warpgroup_fence_operand(tUrA);  // read by K-tile t - 1's batch, now done
      if (t > 0) {  // K-tile t - 1's stage
        pipeline.consumer_release(release);
        ++release;
      }
      ++read;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    warpgroup_fence_operand(acc);
    if (kt_main > 0) {  // the last main K-tile's stage
      pipeline.consumer_release(release);
      ++release;
    }
    split_expand<Blocks>(pipeline, read, accum, acc,
                         thr_u.partition_C(make_identity_tensor(Shape<_64, Int<kNW>>{})), smem, f, m_blk, write_u,
                         rank, wg, wg_thread, tile_i, xu, xbar);
  }

  // A tile of the split variant at this launch's u width (kb_ext k-blocks of 16 u columns).
  template <class Accum>
  CUTLASS_DEVICE static void split_tile(MainloopPipeline& pipeline, PipelineState read, Accum& accum, int k_tiles,
                                        int thread_idx, typename Mainloop::TensorStorage& smem, Element* ap_slots,
                                        FusedParams const& f, int m_blk, int rank, int wg, int tile_i, bool write_u,
                                        float* xu, uint64_t* xbar) {
    if constexpr (kSplit) {
      if (f.kb_ext == 1)
        mma_split<2>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, rank, wg, tile_i, write_u,
                     xu, xbar);
      else if (f.kb_ext == 2)
        mma_split<4>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, rank, wg, tile_i, write_u,
                     xu, xbar);
      else
        mma_split<8>(pipeline, read, accum, k_tiles, thread_idx, smem, ap_slots, f, m_blk, rank, wg, tile_i, write_u,
                     xu, xbar);
    }
  }

  // After a tile's main loop: its last stage's batch waited for, that stage released.
  CUTLASS_DEVICE static void release_last(MainloopPipeline& pipeline, PipelineState read, int k_tiles) {
    read.advance(k_tiles - 1);
    warpgroup_wait<0>();
    pipeline.consumer_release(read);
  }

  // The stream's ready counters (FusedParams::exit): a consumer warpgroup counts itself out once all its threads
  // are done (its block's producer read its last counter before the last stage they consumed); the last of all the
  // warpgroups (two per block) zeroes the row blocks' counters and the exit count for the next launch.
  CUTLASS_DEVICE static void leave(FusedParams const& f, int wg_thread, int wg, int mt) {
    __threadfence();
    cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, wg);
    if (wg_thread >= 32) return;
    unsigned ticket = 0;
    if (wg_thread == 0) ticket = atomicAdd(f.exit, 1u);
    ticket = __shfl_sync(0xffffffffu, ticket, 0);
    if (ticket != 2u * gridDim.x * gridDim.y * gridDim.z - 1) return;
    __threadfence();
    for (int i = wg_thread; i < mt; i += 32) f.ready[i] = 0;
    if (wg_thread == 0) *f.exit = 0u;
    __threadfence();
  }

  template <class Fn>
  CUTLASS_DEVICE static void with_split(int blocks, int pieces, Fn&& fn) {
    if (pieces == 3) {
      if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) {
        if (blocks == 1) fn(Int<1>{}, Int<3>{});
        else if (blocks == 2) fn(Int<2>{}, Int<3>{});
        else fn(Int<4>{}, Int<3>{});
      }
    } else {
      if (blocks == 1) fn(Int<1>{}, Int<1>{});
      else if (blocks == 2) fn(Int<2>{}, Int<1>{});
      else fn(Int<4>{}, Int<1>{});
    }
  }

  // ---------------------------------------------------------------------------------------------- kernel
  CUTLASS_DEVICE void operator()(Params const& params, char* smem_buf) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    enum class Role { Producer = 0, Consumer0 = 1, Consumer1 = 2 };
    SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem_buf);
    const int thread_idx = int(threadIdx.x);
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int wg_thread = thread_idx % cutlass::NumThreadsPerWarpGroup;
    const auto role = Role(cutlass::canonical_warp_group_idx());
    const int lane_predicate = cute::elect_one_sync();
    const uint32_t block_rank = cute::block_rank_in_cluster();
    auto const& mp = params.gemm.mainloop;
    FusedParams const& f = params.f;

    if (warp_idx == 0 && lane_predicate) {
      cute::prefetch_tma_descriptor(mp.tma_load_a.get_tma_descriptor());
      cute::prefetch_tma_descriptor(mp.tma_load_b.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_ap.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_su.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_bx.get_tma_descriptor());
      if (f.lead > 0 || kSplit) cute::prefetch_tma_descriptor(params.tma_apl.get_tma_descriptor());
      Epilogue::prefetch_tma_descriptors(params.gemm.epilogue);
    }

    typename MainloopPipeline::Params pp;
    if (role == Role::Producer && warp_idx % 4 == 0) pp.role = MainloopPipeline::ThreadCategory::Producer;
    if (role != Role::Producer) pp.role = MainloopPipeline::ThreadCategory::Consumer;
    pp.is_leader = wg_thread == 0;
    pp.num_consumers = kMmaThreads;
    pp.transaction_bytes = mp.tma_transaction_bytes;
    MainloopPipeline pipeline(shared.base.pipelines.mainloop, pp, Cluster{});
    if constexpr (kSplit) {  // the exchange's mbarriers: one arrive per CTA of the cluster completes a phase
      if (warp_idx == 0 && lane_predicate) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < 4; ++i) cutlass::arch::ClusterBarrier::init(&shared.xbar[i], kCn);
        cutlass::arch::fence_barrier_init();
      }
    }

    using EpiLoadPipeline = typename Epilogue::LoadPipeline;
    typename EpiLoadPipeline::Params elp;
    if (role != Role::Producer) elp.role = EpiLoadPipeline::ThreadCategory::Consumer;
    elp.dst_blockid = block_rank;
    elp.producer_arv_count = cutlass::NumThreadsPerWarp;
    elp.consumer_arv_count = kMmaThreads;
    if constexpr (Epilogue::RequiresTransactionBytes) elp.transaction_bytes = params.gemm.epilogue.tma_transaction_bytes;
    EpiLoadPipeline epi_load_pipeline(shared.base.pipelines.epi_load, elp);
    using EpiStorePipeline = typename Epilogue::StorePipeline;
    typename EpiStorePipeline::Params esp;
    esp.always_wait = true;
    EpiStorePipeline epi_store_pipeline(esp);

    // ping-pong: the consumer warpgroups take their main loops and their epilogues in turn
    auto order = [&] {
      if constexpr (kWide) {
        return NoOrder{};
      } else {
        typename Base::MathWarpGroupOrderBarrier::Params obp;
        obp.group_id = cutlass::canonical_warp_group_idx() - 1;
        obp.group_size = cutlass::NumThreadsPerWarpGroup;
        return typename Base::MathWarpGroupOrderBarrier(shared.base.pipelines.math_wg_order, obp);
      }
    }();

    PipelineState consumer_state;
    typename Epilogue::LoadPipelineState epi_load_state;
    PipelineState producer_state = cutlass::make_producer_start_state<MainloopPipeline>();
    auto epi_store_state = cutlass::make_producer_start_state<EpiStorePipeline>();

    // problem_shape is the real (M, N, Kt): the epilogue's bounds
    auto problem = params.gemm.problem_shape;
    const int M = get<0>(problem), N = get<1>(problem), L = 1;
    const int k_tiles = f.k_tiles_main + 1;
    const int n_tiles_sched = kCn * params.order.ncl + kUTiles;  // tile columns (trace records)
    auto blk_shape = Tile{};
    auto c_tile_count = Epilogue::get_load_pipe_increment(blk_shape);
    auto d_tile_count = Epilogue::get_store_pipe_increment(blk_shape);

    // this block's items: blockIdx.x, + gridDim.x, ...; the producer takes each, the consumers every other one
    TileOrder const& to = params.order;
    const int items = to.items(), stride = int(gridDim.x), rank = int(block_rank);
    int item = int(blockIdx.x);
    if (!kWide && role == Role::Consumer1) {
      item += stride;
      consumer_state.advance(k_tiles);
      epi_load_state.advance(c_tile_count);
      epi_store_state.advance(d_tile_count);
    }

    // cluster-wide barrier: the pipelines' initialisation visible to the other block
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
    // Launched with programmatic stream serialization (pdl.cuh): everything above overlapped the prep launch; its
    // staged operands and zeroed counters (and everything before it) are visible from here on.
    pdl_wait();

    if (role == Role::Producer) {
      cutlass::arch::warpgroup_reg_dealloc<Base::LoadRegisterRequirement>();
      if (warp_idx % 4 != 0 || !cute::elect_one_sync()) return;
      // (BLK, BLK_K, tile, k, l) views of each operand's TMA tensor
      auto tile_view = [&](auto const& tma, int rows, int cols, int batches, auto step) {
        return local_tile(tma.get_tma_tensor(make_shape(rows, cols, batches)), Tile{}, make_coord(_, _, _), step);
      };
      using X = Underscore;
      const int K = f.k_tiles_main * kTileK;  // the K-tile grid (TMA fills past the real K with zeros)
      const int width = f.width;
      Tensor gX = tile_view(mp.tma_load_a, M, K, L, Step<_1, X, _1>{});
      Tensor gW = tile_view(mp.tma_load_b, N, K, L, Step<X, _1, _1>{});
      Tensor gAp = tile_view(params.tma_ap, 8 * f.blocks * f.pieces, K, kUTiles, Step<X, _1, _1>{});
      Tensor gSu = tile_view(params.tma_su, M, width, L, Step<_1, X, _1>{});
      Tensor gBx = tile_view(params.tma_bx, N, width, L, Step<X, _1, _1>{});
      Tensor sA = make_tensor(make_smem_ptr(shared.base.tensors.mainloop.smem_A.data()), SmemLayoutA{});
      Tensor sB = make_tensor(make_smem_ptr(shared.base.tensors.mainloop.smem_B.data()), SmemLayoutB{});
      // the lead tiles' slots of lora_A's pieces: lead tile t's (kApRows, 64) boxes start at row t ap_pitch
      auto ta_apl = params.tma_apl.get_slice(0);
      Tensor mApl = params.tma_apl.get_tma_tensor(make_shape(max(f.lead, 1) * f.ap_pitch + kSlotRows, K));
      Tensor tAplS = ta_apl.partition_D(
          make_tensor(make_smem_ptr(reinterpret_cast<IB*>(shared.ap.data())), SmemLayoutAp{}));
      // x and su multicast to every block of the cluster (one row block); W, Ap, Bx per block
      const uint2 cid = {block_rank % size<0>(Cluster{}), block_rank / size<0>(Cluster{})};
      auto ta_x = mp.tma_load_a.get_slice(cid.y);
      auto ta_su = params.tma_su.get_slice(cid.y);
      auto tb_w = mp.tma_load_b.get_slice(cid.x);
      auto tb_ap = params.tma_ap.get_slice(cid.x);
      auto tb_bx = params.tma_bx.get_slice(cid.x);
      Tensor tAsA = ta_x.partition_D(sA);
      Tensor tBsB = tb_w.partition_D(sB);
      uint16_t mcast_a = 0;
      {
        auto block_layout = Layout<Cluster>{};
        for (int n = 0; n < size<1>(block_layout); ++n) mcast_a |= uint16_t(1) << block_layout(cid.x, n, Int<0>{});
      }
      for (; item < items; item += stride) {
        int m_blk, n_tile;
        to.tile(item, rank, m_blk, n_tile);
        const bool u_tile = n_tile < kUTiles;
        const int n_out = n_tile - kUTiles;
        const bool lead_tile = f.lead > 0 && !u_tile && n_out < f.lead;
        // K serpentine: an output tile of an odd wave of items takes its main K-tiles in decreasing order, so
        // that it starts on the x columns the wave before it read last (still in L2). Not the u tiles nor the
        // dropout lead kernel, whose consumers fetch their keep bits by K-tile index. Debug bit 9: all increasing.
        const bool k_down = !kDrop && !u_tile && !(f.debug & 512) && ((item / stride) & 1);
        Tensor tAplG = ta_apl.partition_S(  // (TMA, TMA_M, TMA_K, k)
            local_tile(domain_offset(make_coord(lead_tile ? n_out * f.ap_pitch : 0, 0), mApl),
                       Shape<Int<kSlotRows>, _64>{}, make_coord(0, _)));
        Tensor tAgX = ta_x.partition_S(gX(_, _, m_blk, _, 0));     // (TMA, TMA_M, TMA_K, k)
        Tensor tAgSu = ta_su.partition_S(gSu(_, _, m_blk, _, 0));
        Tensor tBgW = tb_w.partition_S(gW(_, _, u_tile ? 0 : n_tile - kUTiles, _, 0));
        Tensor tBgAp = tb_ap.partition_S(gAp(_, _, 0, _, u_tile ? n_tile : 0));
        Tensor tBgBx = tb_bx.partition_S(gBx(_, _, u_tile ? 0 : n_tile - kUTiles, _, 0));
        for (int k = 0; k < k_tiles; ++k) {
          const bool ext = k == f.k_tiles_main;
          if (!kSplit && ext && !u_tile && !(f.debug & 1)) {  // bf16(u) of this row block: wait until both u tiles wrote it
            const uint32_t w0 = (f.debug & 16) ? globaltimer_lo() : 0;
            while (ld_acquire(f.ready + m_blk) < f.ready_target) __nanosleep(128);
            fence_proxy_async_global();
            if (f.debug & 16) {  // trace: the producer's wait, records 16384 + tile
              uint32_t* rec = reinterpret_cast<uint32_t*>(f.u) + 4 * (16384 + m_blk * n_tiles_sched + n_tile);
              rec[0] = smid();
              rec[1] = w0;
              rec[2] = globaltimer_lo();
            }
          }
          pipeline.producer_acquire(producer_state);
          auto* bar = pipeline.producer_get_barrier(producer_state);
          const int stage = producer_state.index();
          const int kk = ext ? 0 : k_down ? f.k_tiles_main - 1 - k : k;  // the K-tile this stage holds
          // the slot: a lead tile's every main K-tile; a split tile's at positions k % kCn == its rank
          const bool slot = kSplit ? (!ext && k % kCn == rank) : (kLead && lead_tile && !ext);
          if (slot) {  // the slot's bytes on the stage's barrier, declared before any copy
            pipeline.producer_expect_transaction(producer_state, kApSlotElems * 2);
            copy(params.tma_apl.with(*bar), tAplG(_, _, _, kk), tAplS(_, _, _, stage));
          }
          if (ext && !u_tile) {
            if constexpr (kSplit)  // A slot unused (the expand's A is in registers): the last K-tile's x again
              copy(mp.tma_load_a.with(*bar, mcast_a), tAgX(_, _, _, k_down ? 0 : f.k_tiles_main - 1),
                   tAsA(_, _, _, stage));
            else
              copy(params.tma_su.with(*bar, mcast_a), tAgSu(_, _, _, 0), tAsA(_, _, _, stage));
            copy(params.tma_bx.with(*bar), tBgBx(_, _, _, 0), tBsB(_, _, _, stage));
          } else {
            copy(mp.tma_load_a.with(*bar, mcast_a), tAgX(_, _, _, kk), tAsA(_, _, _, stage));
            if (u_tile) copy(params.tma_ap.with(*bar), tBgAp(_, _, _, kk), tBsB(_, _, _, stage));
            else copy(mp.tma_load_b.with(*bar), tBgW(_, _, _, kk), tBsB(_, _, _, stage));
          }
          ++producer_state;
        }
      }
      pipeline.producer_tail(producer_state);  // the other block's consumers are done with our multicasts
      return;
    }

    // consumers
    cutlass::arch::warpgroup_reg_alloc<Base::MmaRegisterRequirement>();
    Epilogue epilogue(params.gemm.epilogue, shared.base.tensors.epilogue);
    TiledMma tiled_mma;
    const int wg = cutlass::canonical_warp_group_idx() - 1;
    auto problem_mnkl = make_shape(M, N, get<2>(problem), L);
    const bool trace = f.debug & 16;  // per tile: SM, start, main loop end, end (u as uint32 records)
    if constexpr (kWide) {
      // both warpgroups on each tile (64 rows each), its epilogue after its main loop; the TMA stores of the last
      // tile waited for once, after the loop
      const int mma_thread = thread_idx - cutlass::NumThreadsPerWarpGroup;  // 0 .. 255 over both warpgroups
      bool stored = false;
      int tile_i = 0;  // tiles done (the split variant's exchange phases)
      for (; item < items; item += stride) {
        int m_blk, n_tile;
        to.tile(item, rank, m_blk, n_tile);
        uint32_t* rec = reinterpret_cast<uint32_t*>(f.u) + 4 * (m_blk * n_tiles_sched + n_tile);
        if (trace && mma_thread == 0) {
          rec[0] = smid();
          rec[1] = globaltimer_lo();
        }
        Tensor accum = partition_fragment_C(tiled_mma, take<0, 2>(blk_shape));
        const int n_out = n_tile - kUTiles;
        if constexpr (kSplit)  // the row block's first cluster writes u
          split_tile(pipeline, consumer_state, accum, k_tiles, mma_thread, shared.base.tensors.mainloop,
                     shared.ap.data(), f, m_blk, rank, wg, tile_i, n_out < kCn, shared.xu, shared.xbar);
        else
          lead_tile(pipeline, consumer_state, accum, k_tiles, mma_thread, shared.base.tensors.mainloop,
                    shared.ap.data(), f, m_blk, n_out, wg);
        ++tile_i;
        if (trace && mma_thread == 0) rec[2] = globaltimer_lo();
        release_last(pipeline, consumer_state, k_tiles);
        consumer_state.advance(k_tiles);
        auto blk_coord = make_coord(m_blk, n_out, _, 0);
        auto [el, es] = epilogue.store(epi_load_pipeline, epi_load_state, epi_store_pipeline, epi_store_state,
                                       problem_mnkl, blk_shape, blk_coord, accum, tiled_mma, mma_thread,
                                       shared.base.tensors.epilogue);
        epi_load_state = el;
        epi_store_state = es;
        stored = true;
        if (trace && mma_thread == 0) rec[3] = globaltimer_lo();
      }
      if (stored) epilogue.store_tail(epi_load_pipeline, epi_load_state, epi_store_pipeline, epi_store_state);
      // split: every CTA of the cluster has read this warpgroup's last buffer before the block may exit
      if constexpr (kSplit) {
        if (tile_i > 0 && !(f.debug & 2048))
          detail::mbar_wait_cluster(cute::cast_smem_ptr_to_uint(shared.xbar + 2 + wg), uint32_t(tile_i - 1) & 1u);
      }
    } else {
      for (; item < items; item += 2 * stride) {
        int m_blk, n_tile;
        to.tile(item, rank, m_blk, n_tile);
        uint32_t* rec = reinterpret_cast<uint32_t*>(f.u) + 4 * (m_blk * n_tiles_sched + n_tile);
        if (trace && wg_thread == 0) {
          rec[0] = smid() | (wg << 16);
          rec[1] = globaltimer_lo();
        }
        order.wait();
        if (!kLead && n_tile < kUTiles) {
          with_split(f.blocks, f.pieces, [&](auto blocks, auto pieces) {
            u_tile<decltype(blocks)::value, decltype(pieces)::value>(pipeline, consumer_state, k_tiles, wg_thread,
                                                                     shared.base.tensors.mainloop, f, m_blk, n_tile, wg,
                                                                     [&] {
                                                                       order.arrive();
                                                                       if (trace && wg_thread == 0)
                                                                         rec[2] = globaltimer_lo();
                                                                     });
          });
          consumer_state.advance(k_tiles * 2);
          order.wait();  // the epilogue's turn: nothing to store
          epi_load_state.advance(c_tile_count * 2);
          epi_store_state.advance(d_tile_count * 2);
          order.arrive();
        } else {
          Tensor accum = partition_fragment_C(tiled_mma, take<0, 2>(blk_shape));
          const int n_out = n_tile - kUTiles;
          if constexpr (kLead) {
            lead_tile(pipeline, consumer_state, accum, k_tiles, wg_thread, shared.base.tensors.mainloop,
                      shared.ap.data(), f, m_blk, n_out, wg);
          } else {
            mma_output(pipeline, consumer_state, accum, k_tiles, f.kb_ext, wg_thread, shared.base.tensors.mainloop);
          }
          order.arrive();
          if (trace && wg_thread == 0) rec[2] = globaltimer_lo();
          release_last(pipeline, consumer_state, k_tiles);
          consumer_state.advance(k_tiles * 2);
          order.wait();
          auto blk_coord = make_coord(m_blk, n_tile - kUTiles, _, 0);
          auto [el, es] = epilogue.store(epi_load_pipeline, epi_load_state, epi_store_pipeline, epi_store_state,
                                         problem_mnkl, blk_shape, blk_coord, accum, tiled_mma, wg_thread,
                                         shared.base.tensors.epilogue);
          auto [el2, es2] = epilogue.store_tail(epi_load_pipeline, el, epi_store_pipeline, es);
          epi_load_state = el2;
          epi_store_state = es2;
          epi_load_state.advance(c_tile_count);
          epi_store_state.advance(d_tile_count);
          order.arrive();
        }
        if (trace && wg_thread == 0) rec[3] = globaltimer_lo();
      }
    }
    if (f.exit != nullptr) leave(f, wg_thread, wg, (M + 127) / 128);
#endif
  }

  // ---------------------------------------------------------------------------------------------- host
  static cudaError_t run(const Operands& o, const FusedParams& f, int64_t K64, int sms, cudaStream_t stream) {
    using E = Element;
    const int M = f.M, N = f.N, K = int(K64);
    const int nw = 8 * f.blocks * f.pieces, width = f.width;
    const int kt = f.k_tiles_main + 1;
    typename Base::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {M, N, kt * kTileK, 1};
    args.mainloop = {static_cast<E const*>(o.x), cutlass::make_cute_packed_stride(StrideA{}, {M, K, 1}),
                     static_cast<E const*>(o.w), cutlass::make_cute_packed_stride(StrideB{}, {N, K, 1})};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.alpha_ptr = o.col_scale;  // null: the scalar
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<E const*>(o.bias);
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = static_cast<E*>(o.y);
    args.epilogue.dD = cutlass::make_cute_packed_stride(typename Base::StrideD{}, {M, N, 1});
    args.epilogue.dC = args.epilogue.dD;
    args.hw_info.device_id = 0;
    args.hw_info.sm_count = sms;
    if (!Base::can_implement(args)) return cudaErrorNotSupported;

    Params p;
    // (x, W) main loop and epilogue over the real problem; the x and W descriptors span the real K
    args.problem_shape = {M, N, K, 1};
    p.gemm = Base::to_underlying_arguments(args, nullptr);
    p.gemm.problem_shape = {M, N, kt * kTileK, 1};
    p.order.mt = int((M + 127) / 128);
    p.order.ncl = int((N + kCn * kTileN - 1) / (kCn * kTileN));  // clusters of 1 x kCn tiles
    p.order.strip = f.strip > 0 ? f.strip : 4;
    p.order.split = kSplit;
    p.order.lead = !kSplit && f.lead > 0 ? (f.lead + 1) / 2 : 0;
    p.order.ahead = kSplit ? -1 : (f.debug & 128) ? 0 : f.ahead > 0 ? f.ahead : -1;
    p.order.snake = !(f.debug & 1024);
    using IA = typename Mainloop::InternalElementA;
    auto make_a = [&](void const* ptr, int rows, int cols, int ld) {  // (rows, cols) of a row pitch of ld
      auto t = make_tensor(static_cast<IA const*>(ptr), make_layout(make_shape(rows, cols, 1),
                                            cutlass::make_cute_packed_stride(StrideA{}, {rows, ld, 1})));
      return make_tma_copy_A_sm90(typename Mainloop::GmemTiledCopyA{}, t, SmemLayoutA{}(_, _, Int<0>{}), Tile{},
                                  Cluster{});
    };
    auto make_b = [&](void const* ptr, int rows, int cols, int batches) {
      auto t = make_tensor(static_cast<IB const*>(ptr), make_layout(make_shape(rows, cols, batches),
                                            cutlass::make_cute_packed_stride(StrideB{}, {rows, cols, batches})));
      return make_tma_copy_B_sm90(typename Mainloop::GmemTiledCopyB{}, t, SmemLayoutB{}(_, _, Int<0>{}), Tile{},
                                  Cluster{});
    };
    // direct (lead tiles only): ap is lora_A's r rows, its rows past r and the u tiles' view never read (TMA's zeros)
    p.tma_ap = o.direct ? make_b(o.ap, f.r, K, 1) : make_b(o.ap, nw, K, kUTiles);
    {  // the lead tiles' Ap (u tiles: the same buffer, 2 nw rows; never read)
      const int rows = o.direct ? f.r : f.lead > 0 ? f.lead * kApRows : kUTiles * nw;
      p.tma_apl = make_tma_copy(
          SM90_TMA_LOAD{},
          make_tensor(make_gmem_ptr(static_cast<IB const*>(o.ap)),
                      GmemLayoutAp{make_shape(rows, K), make_stride(int64_t(K), _1{})}),
          SmemLayoutApStage{});
    }
    // su's columns past those the tiles write (lead tiles: rc per tile, the row pitch rounded up to 16) come in as
    // TMA's zeros, never as memory nobody wrote
    p.tma_su = make_a(f.su, M, f.lead > 0 ? 8 * f.blocks * f.lead : width, width);
    p.tma_bx = o.direct ? make_b(o.bx, N, f.r, 1) : make_b(o.bx, N, width, 1);  // lora_B: columns past r as zeros
    p.f = f;
    // lead tile t's slot box starts at the prep's tile t, or at lora_A's rows t rc
    p.f.ap_pitch = o.direct ? 8 * f.blocks : kApRows;

    static std::atomic<bool> smem_set[64];
    constexpr int smem = SharedStorageSize;
    static_assert(smem <= 232448, "over the 227 KB of shared memory an sm_90 block can have");
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    void const* kernel = reinterpret_cast<void const*>(&cutlass::device_kernel<FusedFwd>);
    if (device >= 64 || !smem_set[device].load(std::memory_order_acquire)) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      if (device < 64) smem_set[device].store(true, std::memory_order_release);
    }
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = size<0>(Cluster{});
    attr[0].val.clusterDim.y = size<1>(Cluster{});
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.blockDim = dim3(MaxThreadsPerBlock, 1, 1);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    // A persistent grid of as many clusters as the device holds at once (an output tile's loads wait for u tiles
    // of earlier items: every item's block must be resident or done, never queued behind a waiting one), at most one
    // per item. The count is the occupancy calculator's for this kernel, read once per device.
    static std::atomic<int> resident[64];
    int clusters = device < 64 ? resident[device].load(std::memory_order_acquire) : 0;
    if (clusters <= 0) {
      config.gridDim = dim3(1, unsigned(size<1>(Cluster{})), 1);  // one cluster: the shape the query asks about
      e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
      if (e != cudaSuccess) return e;
      if (clusters <= 0) return cudaErrorInvalidConfiguration;
      if (device < 64) resident[device].store(clusters, std::memory_order_release);
    }
    config.gridDim = dim3(unsigned(std::min(clusters, p.order.items())), unsigned(size<1>(Cluster{})), 1);
    config.numAttrs = with_pdl(attr, 1);  // may start under the prep launch's tail (the kernel waits for it)
    void* kernel_params[] = {&p};
    return cudaLaunchKernelExC(&config, kernel, kernel_params);
  }
};

}  // namespace sm90fused
}  // namespace lora_kernels
