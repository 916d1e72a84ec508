// The Hopper GEMM of gemm_sm90.h, built from CUTLASS 3.x (CuTe) parts.
//
// Math:   D = A·op(B) + Ax·op(Bx) + bias, i.e. one GEMM over the concatenated K axis [K | Kx]:
//         [A | Ax] · [op(B) ; op(Bx)]. The two halves live in different tensors, so the main loop's producer
//         (one TMA thread) takes K-tile k from (A, B) for k < ceil(K/64) and from (Ax, Bx) after that. The
//         consumer warpgroups and the epilogue are CUTLASS's own and never know there were two tensors.
// Tiling: CUTLASS's warp-specialised persistent kernels (TMA loads into a multi-stage shared-memory ring, WGMMA
//         into fp32 registers, a TMA-store epilogue that adds the bias per column). Configs in GemmConfig.
// Launch: GemmUniversalAdapter-free: params are built on the host and the kernel is launched on the caller's
//         stream with its cluster shape (sm90_launch.cuh), as a programmatic dependent of the launch before it
//         (pdl.cuh: the pack of its rank-r operands): CUTLASS's kernel waits for that launch in its load warps before
//         they touch global memory (CUTLASS_ENABLE_GDC_FOR_SM90), and its consumers only write what those loads fed.
#pragma once

// (Not in bench/dev's stream-K probe, LORA_KERNELS_PROBE_NO_GDC: CUTLASS 4.2's stream-K scheduler does not compile
// with it, and that probe launches without PDL.)
#if !defined(CUTLASS_ENABLE_GDC_FOR_SM90) && !defined(LORA_KERNELS_PROBE_NO_GDC)
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
#endif

#include "gemm_sm90.h"
#include "sm90_launch.cuh"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include <cutlass/util/packed_stride.hpp>

namespace lora_kernels {
namespace sm90 {

using namespace cute;

// ------------------------------------------------------------------------------------------------ mainloop
// CUTLASS's TMA + WGMMA warp-specialised mainloop with a second pair of TMA descriptors for the extension, and
// optional keep bits that mask the extension's term (gemm_sm90.h). Base is the CollectiveMma the CollectiveBuilder
// picks. The producer (load) chooses the source of each K-tile; the consumer (mma) is Base's loop plus one step.
//   Unmasked: K-tiles [0, kt_main) from (A, B), then [kt_main, kt_main + kt_ext) from (Ax, Bx).
//   The extension's last K-tile is r's last columns and zero padding: its consumer skips the 16-deep k-blocks past
//   r (k_ext_used), which would add zeros (at r = 16, 3 of the tile's 4).
//   Masked:   the extension's K-tiles first, the keep bits of the output tile loaded by TMA with the last of them
//             (into that stage's keep slot, counted on the same barrier); after that tile's MMAs the consumer zeroes
//             the dropped accumulator elements, then the main K-tiles accumulate on top.
//   dA:       (dx, kDaTiles) two K-tiles after all others carry dA's product instead of D's:
//             dA (r, K) = Axᵀ X summed over M, with Ax = s·g (M, Kx) the extension's rank-r operand and X = x (M, N)
//             the layer input whose gradient D is. Output tile (m, n) reads X's rows of m and its kTileN columns of n
//             in 64-column chunks (one per consumer warpgroup per dA K-tile: in the A slot, then in the B slot) and
//             Ax's rows of m (in the B slot after the chunks); each warpgroup multiplies its chunk transposed,
//             (64 columns x 128 rows) by (128 rows x NP), NP = r rounded up to 16, 32 or 64, and stores the r x 64
//             fp32 product as row block m's partial of dA (da_partial, (ceil(M / kTileM), r, N)), which a reduce
//             sums in a fixed order. So x is read by the GEMM that already streams dy and W instead of by a pass of
//             its own. Masked, each dA K-tile also loads the output tile's keep bits, and each warpgroup zeroes its
//             chunk's dropped elements in shared memory before its product (dA = Axᵀ (keep ⊙ X), Ax scaled by
//             s / (1 - p) by the pack). The consumer finds (m, n) from the persistent scheduler's order: the tile's
//             index in the block's sequence is its pipeline count over the K-tiles per tile.
template <class Base>
struct KExtendedMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::DispatchPolicy;
  using InternalElementA = typename Base::InternalElementA;
  using InternalElementB = typename Base::InternalElementB;
  using TMA_A = typename Base::Params::TMA_A;
  using TMA_B = typename Base::Params::TMA_B;
  static constexpr int kTileM = size<0>(TileShape{});
  static constexpr int kTileN = size<1>(TileShape{});
  static constexpr int kTileK = size<2>(TileShape{});
  static constexpr int kStages = DispatchPolicy::Stages;
  static constexpr int kMmaK = size<2>(typename TiledMma::AtomShape_MNK{});  // 16 for 16-bit types
  static constexpr int kKBlocks = kTileK / kMmaK;                              // MMA k-blocks per K-tile
  // Keep bits of one output tile: kTileM rows of kTileN / 8 bytes, one slot per pipeline stage.
  static constexpr int kKeepRowBytes = kTileN / 8;
  static constexpr int kKeepBytes = kTileM * kKeepRowBytes;
  static_assert(kKeepRowBytes % 16 == 0, "a TMA box row of keep bits is a multiple of 16 bytes");
  using KeepTile = Shape<Int<kTileM>, Int<kKeepRowBytes>>;
  using SmemLayoutKeepStage = Layout<KeepTile, Stride<Int<kKeepRowBytes>, _1>>;
  using SmemLayoutKeep = Layout<Shape<Int<kTileM>, Int<kKeepRowBytes>, Int<kStages>>,
                                Stride<Int<kKeepRowBytes>, _1, Int<kKeepBytes>>>;
  using GmemLayoutKeep = Layout<Shape<int, int>, Stride<int, _1>>;  // (M, N/8) row-major
  using TMA_Keep = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                          make_tensor(make_gmem_ptr(static_cast<uint8_t const*>(nullptr)),
                                                      GmemLayoutKeep{}),
                                          SmemLayoutKeepStage{}));

  // dA in the GEMM: X's chunk as a (64 columns, kTileM rows) MN-major operand (the bytes a K-major (kTileM, 64) tile
  // of the A slot would hold), Ax's rows as (NP, kTileM) MN-major, NP = 16, 32 or 64 (its swizzle: NP 16-bit
  // elements per row); global views (columns, rows) with unit column stride.
  static constexpr int kDaTiles = 2;
  static constexpr int kDaChunks = kTileN / 128;  // X's 64-column chunks per dA K-tile: one per consumer warpgroup
  static constexpr int kMmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
  static constexpr bool kDaBuilt = kTileM == 128 && kTileK == 64 && kDaChunks == kMmaWarpGroups &&
                                   sizeof(InternalElementA) == 2 && cute::is_same_v<InternalElementA, InternalElementB>;
  using SmemLayoutDaX =
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<InternalElementA>{}, Shape<_64, Int<kTileM>>{}));
  template <int NP>
  using DaVAtom = cute::conditional_t<NP == 16, GMMA::Layout_MN_SW32_Atom<InternalElementA>,
                                      cute::conditional_t<NP == 32, GMMA::Layout_MN_SW64_Atom<InternalElementA>,
                                                          GMMA::Layout_MN_SW128_Atom<InternalElementA>>>;
  template <int NP>
  using SmemLayoutDaV = decltype(tile_to_shape(DaVAtom<NP>{}, Shape<Int<NP>, Int<kTileM>>{}));
  using GmemLayoutDa = Layout<Shape<int, int>, Stride<_1, int>>;  // (columns, rows)
  template <class SmemLayout>
  using TmaDa = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                       make_tensor(make_gmem_ptr(static_cast<InternalElementA const*>(nullptr)),
                                                   GmemLayoutDa{}),
                                       SmemLayout{}));
  using SchedParams = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90Params;
  // dA's K-tiles address a stage's A and B slots as kTileM x 64 and kTileN x 64 elements from the ring's start
  static_assert(cute::cosize_v<SmemLayoutA> == kTileM * kTileK * kStages &&
                    cute::cosize_v<SmemLayoutB> == kTileN * kTileK * kStages,
                "stages of whole tiles, one after another");

  struct TensorStorage : Base::TensorStorage {
    alignas(128) cute::array_aligned<uint8_t, cute::cosize_v<SmemLayoutKeep>> smem_keep;
  };

  // Where a dA K-tile's operands sit in stage `stage`: X's chunk j in the A slot (j = 0), then in the B slot's
  // kTileM x 64 pieces; Ax's rows after the chunks. The producer's loads and the consumer's products both use these.
  CUTLASS_DEVICE static auto* da_chunk(TensorStorage& s, int stage, int j) {
    return j == 0 ? s.smem_A.data() + stage * (kTileM * kTileK)
                  : s.smem_B.data() + stage * (kTileN * kTileK) + (j - 1) * (64 * kTileM);
  }
  CUTLASS_DEVICE static auto* da_ax_rows(TensorStorage& s, int stage) { return da_chunk(s, stage, kDaChunks); }
  // f(Int<NP>{}) for the width NP (16, 32 or 64) that da_np holds
  template <class F>
  CUTLASS_DEVICE static void with_da_np(int da_np, F&& f) {
    if (da_np == 16) f(Int<16>{});
    else if (da_np == 32) f(Int<32>{});
    else f(Int<64>{});
  }

  struct Arguments {
    ElementA const* ptr_A;   // (M, K)
    StrideA dA;
    ElementB const* ptr_B;   // (N, K) in CUTLASS's (N, K, L) view
    StrideB dB;
    ElementA const* ptr_Ax;  // (M, Kx)
    StrideA dAx;
    ElementB const* ptr_Bx;  // (N, Kx)
    StrideB dBx;
    int k_main;              // K of (A, B); the problem shape's K is k_tiles_main * kTileK + Kx
    int k_ext;               // Kx (a multiple of kTileK, may be 0)
    uint8_t const* ptr_keep = nullptr;  // (M, N/8) keep bits, or null
    // A pass launched after this kernel runs beside it on the SMs its smaller grid leaves free (gemm_sm90.h, sms):
    // each block lets it start as soon as it has waited for the launch before it.
    int early_dependents = 0;
    uint32_t mma_promotion_interval = 4;
    int k_ext_used = 0;      // Kx's columns that can be nonzero (0: all); the zero padding past them is not multiplied
    // dA in the GEMM (dx; Kx = 64): X (M, N) row-major, dA's partials (ceil(M / kTileM), da_r, N) fp32; the
    // problem's K counts kDaTiles more K-tiles. Null: none.
    ElementA const* ptr_dax = nullptr;
    float* ptr_da = nullptr;
    int da_r = 0;
  };

  struct Params : Base::Params {
    TMA_A tma_load_ax;
    TMA_B tma_load_bx;
    TMA_Keep tma_load_keep;
    int k_main;
    int k_ext;
    int k_tiles_main;
    int k_tiles_ext;
    int masked;
    int early_dependents;
    int ext_k_blocks;  // the MMA k-blocks of the extension's last K-tile that can be nonzero (kKBlocks: all)
    int keep_rows, keep_cols;  // the keep descriptor's (M, N/8), or (M, kKeepRowBytes) when unmasked
    TmaDa<SmemLayoutDaX> tma_load_dax;
    TmaDa<SmemLayoutDaV<16>> tma_load_dav16;
    TmaDa<SmemLayoutDaV<32>> tma_load_dav32;
    TmaDa<SmemLayoutDaV<64>> tma_load_dav64;
    float* da_partial;
    int da_tiles;  // kDaTiles, or 0
    int da_r, da_np, da_cols, da_rows;
    int da_deficit;  // a dA K-tile's bytes short of a stage's (its barrier expects a whole stage)
    SchedParams sched;  // the kernel's scheduler (set by Gemm::run): the consumer's tile coordinates
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void*) {
    auto shape = append<4>(problem_shape, 1);
    int M = get<0>(shape), N = get<1>(shape), L = get<3>(shape);
    auto make_a = [&](ElementA const* p, StrideA s, int k) {
      auto t = make_tensor(reinterpret_cast<InternalElementA const*>(p), make_layout(make_shape(M, k, L), s));
      return make_tma_copy_A_sm90(GmemTiledCopyA{}, t, SmemLayoutA{}(_, _, Int<0>{}), TileShape{},
                                  typename DispatchPolicy::ClusterShape{});
    };
    auto make_b = [&](ElementB const* p, StrideB s, int k) {
      auto t = make_tensor(reinterpret_cast<InternalElementB const*>(p), make_layout(make_shape(N, k, L), s));
      return make_tma_copy_B_sm90(GmemTiledCopyB{}, t, SmemLayoutB{}(_, _, Int<0>{}), TileShape{},
                                  typename DispatchPolicy::ClusterShape{});
    };
    Params p;
    p.tma_load_a = make_a(args.ptr_A, args.dA, args.k_main);
    p.tma_load_b = make_b(args.ptr_B, args.dB, args.k_main);
    // Without an extension the second pair is never read; it still needs valid descriptors.
    bool ext = args.k_ext > 0;
    p.tma_load_ax = ext ? make_a(args.ptr_Ax, args.dAx, args.k_ext) : p.tma_load_a;
    p.tma_load_bx = ext ? make_b(args.ptr_Bx, args.dBx, args.k_ext) : p.tma_load_b;
    p.tma_transaction_bytes = Base::TmaTransactionBytes;
    p.tma_transaction_bytes_mk = Base::TmaTransactionBytesMK;
    p.tma_transaction_bytes_nk = Base::TmaTransactionBytesNK;
    p.k_main = args.k_main;
    p.k_ext = args.k_ext;
    p.k_tiles_main = (args.k_main + kTileK - 1) / kTileK;
    p.k_tiles_ext = args.k_ext / kTileK;
    // Unmasked, the keep descriptor is never used; it still needs a valid one: A's first 16 bytes of each row.
    p.masked = args.ptr_keep != nullptr && args.k_ext > 0;
    p.early_dependents = args.early_dependents;
    // k_ext_used past the extension's last K-tile's start: ceil(columns / 16) of its k-blocks
    const int last_cols = args.k_ext_used - (p.k_tiles_ext - 1) * kTileK;
    p.ext_k_blocks = args.k_ext_used > 0 && p.k_tiles_ext > 0 && last_cols > 0 && last_cols < kTileK
                         ? (last_cols + kMmaK - 1) / kMmaK
                         : kKBlocks;
    auto keep_src = p.masked ? args.ptr_keep : reinterpret_cast<uint8_t const*>(args.ptr_A);
    int keep_pitch = p.masked ? N / 8 : args.k_main * int(sizeof(ElementA));
    p.keep_rows = M;
    p.keep_cols = p.masked ? N / 8 : kKeepRowBytes;
    p.tma_load_keep = make_tma_copy(
        SM90_TMA_LOAD{},
        make_tensor(make_gmem_ptr(keep_src),
                    GmemLayoutKeep{make_shape(p.keep_rows, p.keep_cols), make_stride(keep_pitch, _1{})}),
        SmemLayoutKeepStage{});
    // dA: without it the descriptors are never used; they still need valid ones (A read as (K, M)).
    p.da_tiles = kDaBuilt && args.ptr_dax != nullptr && args.ptr_da != nullptr && args.da_r > 0 ? kDaTiles : 0;
    p.da_r = args.da_r;
    p.da_np = args.da_r <= 16 ? 16 : args.da_r <= 32 ? 32 : 64;
    p.da_cols = N;
    p.da_rows = M;
    p.da_partial = args.ptr_da;
    auto da_view = [&](ElementA const* ptr, int cols) {
      return make_tensor(make_gmem_ptr(reinterpret_cast<InternalElementA const*>(ptr)),
                         GmemLayoutDa{make_shape(cols, M), make_stride(_1{}, cols)});
    };
    auto x_view = p.da_tiles ? da_view(args.ptr_dax, N) : da_view(args.ptr_A, args.k_main);
    auto v_view = p.da_tiles ? da_view(args.ptr_Ax, args.k_ext) : da_view(args.ptr_A, args.k_main);
    p.tma_load_dax = make_tma_copy(SM90_TMA_LOAD{}, x_view, SmemLayoutDaX{});
    p.tma_load_dav16 = make_tma_copy(SM90_TMA_LOAD{}, v_view, SmemLayoutDaV<16>{});
    p.tma_load_dav32 = make_tma_copy(SM90_TMA_LOAD{}, v_view, SmemLayoutDaV<32>{});
    p.tma_load_dav64 = make_tma_copy(SM90_TMA_LOAD{}, v_view, SmemLayoutDaV<64>{});
    p.da_deficit = int(Base::TmaTransactionBytes) -
                   (kDaChunks * 64 * kTileM + p.da_np * kTileM) * int(sizeof(InternalElementA));
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, Kt, L] = append<4>(problem_shape, 1);
    int tiles = (args.k_main + kTileK - 1) / kTileK;
    const bool da = args.ptr_dax != nullptr;
    // dA: built for this tile, one extension K-tile (r <= 64)
    if (da && (!kDaBuilt || args.k_ext != kTileK || args.da_r < 1 || args.da_r > 64 ||
               args.ptr_da == nullptr))
      return false;
    return args.k_ext % kTileK == 0 && Kt == tiles * kTileK + args.k_ext + (da ? kDaTiles * kTileK : 0) &&
           Base::can_implement(make_shape(M, N, args.k_main, L), typename Base::Arguments{}) &&
           (args.k_ext == 0 || Base::can_implement(make_shape(M, N, args.k_ext, L), typename Base::Arguments{}));
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    cute::prefetch_tma_descriptor(p.tma_load_a.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b.get_tma_descriptor());
    if (p.k_ext > 0) {
      cute::prefetch_tma_descriptor(p.tma_load_ax.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_load_bx.get_tma_descriptor());
    }
    if (p.masked) cute::prefetch_tma_descriptor(p.tma_load_keep.get_tma_descriptor());
    if (p.da_tiles) cute::prefetch_tma_descriptor(p.tma_load_dax.get_tma_descriptor());
  }

  // (BLK_M, BLK_K, m, k, l) / (BLK_N, BLK_K, n, k, l) views of the four tensors, from their TMA descriptors.
  // The first two span the whole concatenated K axis: the kernels take the K-tile count from the problem shape
  // (cooperative) or from these views (ping-pong), and both must count the extension's tiles. load() reads the
  // first two only at k < k_tiles_main, where they coincide with (A, B).
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
    using X = Underscore;
    int M = get<0>(problem_shape_MNKL), N = get<1>(problem_shape_MNKL), Kt = get<2>(problem_shape_MNKL),
        L = get<3>(problem_shape_MNKL);
    auto tile = [&](auto const& tma, auto rows, int k, auto step) {
      return local_tile(tma.get_tma_tensor(make_shape(rows, k, L)), TileShape{}, make_coord(_, _, _), step);
    };
    int kx = p.k_ext > 0 ? p.k_ext : p.k_main;
    return cute::make_tuple(tile(p.tma_load_a, M, Kt, Step<_1, X, _1>{}),
                            tile(p.tma_load_b, N, Kt, Step<X, _1, _1>{}),
                            tile(p.tma_load_ax, M, kx, Step<_1, X, _1>{}),
                            tile(p.tma_load_bx, N, kx, Step<X, _1, _1>{}));
  }

  // Producer: k_tile_count K-tiles starting at *k_tile_iter of the concatenated K axis.
  template <class TensorA, class TensorB, class TensorAx, class TensorBx, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorAx, TensorBx> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    // CUTLASS's kernel has waited for the launch before this one (wait_on_dependent_grids) before its first load: from
    // here on the pass launched after this GEMM may start on the SMs this grid leaves free. It reads nothing this GEMM
    // writes, and waits for it before it exits (launch_lora_dA_sm90, beside).
    if (p.early_dependents) pdl_launch_dependents();
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    using ClusterShape = typename DispatchPolicy::ClusterShape;
    constexpr uint32_t cluster_shape_x = get<0>(ClusterShape());
    uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};
    auto block_tma_a = p.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = p.tma_load_b.get_slice(cluster_local_block_id.x);
    auto block_tma_ax = p.tma_load_ax.get_slice(cluster_local_block_id.y);
    auto block_tma_bx = p.tma_load_bx.get_slice(cluster_local_block_id.x);

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
    Tensor tBgB = block_tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAgAx = block_tma_ax.partition_S(get<2>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tBgBx = block_tma_bx.partition_S(get<3>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAsA = block_tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE); the same for either source
    Tensor tBsB = block_tma_b.partition_D(sB);

    // Multicast masks: the A tile goes to every block of the cluster's row, the B tile to its column.
    uint16_t mcast_mask_a = 0, mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int n = 0; n < size<1>(block_layout); ++n)
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m)
        mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
    }

    // The keep bits of this output tile (read only when masked)
    Tensor gKeep = local_tile(p.tma_load_keep.get_tma_tensor(make_shape(p.keep_rows, p.keep_cols)), KeepTile{},
                              make_coord(m_coord, n_coord));  // (BLK_M, BLK_N / 8)
    auto thr_keep = p.tma_load_keep.get_slice(0);
    Tensor tKgK = thr_keep.partition_S(gKeep);
    Tensor tKsK = thr_keep.partition_D(make_tensor(make_smem_ptr(shared_tensors.smem_keep.data()), SmemLayoutKeep{}));

    // dA K-tile d of this output tile: X's chunks d * kDaChunks + j (j = 0 into the A slot, j > 0 into the B slot's
    // (j - 1)-th 16 KB), Ax's rows of m after them. The stage's barrier expects a whole stage's bytes: the producer
    // completes those that the tile does not load (a complete_tx after the arrive that set them).
    auto thr_dax = p.tma_load_dax.get_slice(0);
    Tensor tXgX = thr_dax.partition_S(local_tile(p.tma_load_dax.get_tma_tensor(make_shape(p.da_cols, p.da_rows)),
                                                 Shape<_64, Int<kTileM>>{}, make_coord(_, _)));  // (TMA,..,cols,rows)
    const int da_m = int(m_coord), da_n = int(n_coord);  // (a lambda may not capture structured bindings in C++17)
    auto load_da = [&](int d, int stage, auto* tma_barrier) {
      if (p.masked) {  // the output tile's keep bits too, which mask X (declared before any copy is issued)
        pipeline.producer_expect_transaction(smem_pipe_write, kKeepBytes);
        copy(p.tma_load_keep.with(*tma_barrier), tKgK, tKsK(_, _, _, stage));
      }
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kDaChunks; ++j) {
        const int col_tile = da_n * (kTileN / 64) + d * kDaChunks + j;
        copy(p.tma_load_dax.with(*tma_barrier), tXgX(_, _, _, col_tile, da_m),
             thr_dax.partition_D(make_tensor(make_smem_ptr(da_chunk(shared_tensors, stage, j)), SmemLayoutDaX{})));
      }
      with_da_np(p.da_np, [&](auto np) {
        constexpr int NP = decltype(np)::value;
        auto const& tma = [&]() -> auto const& {
          if constexpr (NP == 16) return p.tma_load_dav16;
          else if constexpr (NP == 32) return p.tma_load_dav32;
          else return p.tma_load_dav64;
        }();
        auto thr = tma.get_slice(0);
        Tensor gV = local_tile(tma.get_tma_tensor(make_shape(p.k_ext, p.da_rows)), Shape<Int<NP>, Int<kTileM>>{},
                               make_coord(0, da_m));
        copy(tma.with(*tma_barrier), thr.partition_S(gV),
             thr.partition_D(make_tensor(make_smem_ptr(da_ax_rows(shared_tensors, stage)), SmemLayoutDaV<NP>{})));
      });
      if (p.da_deficit > 0)
        cutlass::arch::ClusterTransactionBarrier::complete_transaction(tma_barrier, block_rank_in_cluster,
                                                                       uint32_t(p.da_deficit));
    };

    // Tile k of this tile's K axis: masked, the extension's tiles first (the mask applies to their sum only), else
    // the main ones first; the dA K-tiles, where there are any, last.
    const int kt_ext = p.k_tiles_ext, kt_main = p.k_tiles_main;
    int k = static_cast<int>(get<0>(*k_tile_iter));
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      int stage = smem_pipe_write.index();
      if (k >= kt_main + kt_ext) {
        load_da(k - kt_main - kt_ext, stage, tma_barrier);
        ++smem_pipe_write;
        continue;
      }
      const int kx = p.masked ? k : k - kt_main;  // index into the extension when in [0, kt_ext)
      if (kx >= 0 && kx < kt_ext) {
        if (p.masked && kx == kt_ext - 1) {
          // more bytes on this stage's barrier, declared before any of its copies is issued
          pipeline.producer_expect_transaction(smem_pipe_write, kKeepBytes);
          copy(p.tma_load_keep.with(*tma_barrier), tKgK, tKsK(_, _, _, stage));
        }
        copy(p.tma_load_ax.with(*tma_barrier, mcast_mask_a), tAgAx(_, _, _, kx), tAsA(_, _, _, stage));
        copy(p.tma_load_bx.with(*tma_barrier, mcast_mask_b), tBgBx(_, _, _, kx), tBsB(_, _, _, stage));
      } else {
        const int km = p.masked ? k - kt_ext : k;
        copy(p.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, km), tAsA(_, _, _, stage));
        copy(p.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, km), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }

  // Consumer: Base's pipelined WGMMA loop over k_tile_count K-tiles (one MMA batch in flight, each stage released
  // once the batch after it is issued), plus, when masked, the keep step after the last extension tile: wait for
  // its MMAs, zero the dropped accumulator elements (x 0, so that a NaN or inf stays NaN, as in the reference's
  // keep * term), and go on with the main K-tiles.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                          int k_tile_count, int thread_idx, TensorStorage& shared_tensors, Params const& p) {
    static_assert(Base::K_PIPE_MMAS == 1, "this loop keeps one MMA batch in flight");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    constexpr int MmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCsA = thread_mma.partition_A(sA);  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCsB = thread_mma.partition_B(sB);  // (MMA,MMA_N,MMA_K,PIPE)
    Tensor tCrA = thread_mma.make_fragment_A(tCsA);
    Tensor tCrB = thread_mma.make_fragment_B(tCsB);
    // (m, n) in the tile of each of this thread's accumulator elements
    Tensor tCcC = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
    CUTE_STATIC_ASSERT_V(size(tCcC) == size(accum));

    const int keep_tile = p.masked ? p.k_tiles_ext - 1 : -1;  // the K-tile after which the mask applies
    // A thread's WGMMA accumulators (PTX ISA, wgmma D fragments): mode 0 is (2 adjacent columns, 2 rows 8 apart,
    // G column groups 8 apart), so for each row (mode-0 row h, MMA_M index, MMA_N index) the thread holds columns
    // n0 + c + 8 j (c < 2, j < G) with n0 % 8 in {0, 2, 4, 6}: the bits of 32 of its columns sit in one 32-bit word
    // of the row, shifted by n0 % 32 (< 8 while the atom's N is a multiple of 32).
    using Frag0 = decltype(shape<0>(accum));
    static_assert(rank(Frag0{}) == 3 && size<0>(Frag0{}) == 2 && size<1>(Frag0{}) == 2, "a WGMMA D fragment");
    constexpr int kGroups = size<2>(Frag0{});
    static_assert(kGroups % 4 == 0, "whole 32-column words per row");
    auto apply_keep = [&](int stage) {
      uint32_t const* words = reinterpret_cast<uint32_t const*>(shared_tensors.smem_keep.data() + stage * kKeepBytes);
      warpgroup_wait<0>();
      warpgroup_fence_operand(accum);
      CUTLASS_PRAGMA_UNROLL
      for (int mm = 0; mm < size<1>(accum); ++mm) {
        CUTLASS_PRAGMA_UNROLL
        for (int nn = 0; nn < size<2>(accum); ++nn) {
          CUTLASS_PRAGMA_UNROLL
          for (int h = 0; h < 2; ++h) {
            const auto c0 = tCcC(make_coord(0, h, 0), mm, nn);
            const int m = get<0>(c0), n0 = get<1>(c0);
            uint32_t const* row = words + m * (kKeepRowBytes / 4) + n0 / 32;
            const int sh = n0 % 32;
            CUTLASS_PRAGMA_UNROLL
            for (int q = 0; q < kGroups / 4; ++q) {  // one word: column groups 4q .. 4q + 3
              const uint32_t w = row[q] >> sh;
              CUTLASS_PRAGMA_UNROLL
              for (int j = 0; j < 4; ++j) {
                CUTLASS_PRAGMA_UNROLL
                for (int c = 0; c < 2; ++c) {
                  auto& a = accum(make_coord(c, h, 4 * q + j), mm, nn);
                  if (!((w >> (8 * j + c)) & 1u)) a = a * 0.f;  // x 0: NaN and inf stay NaN, as in keep * term
                }
              }
            }
          }
        }
      }
      warpgroup_fence_operand(accum);
    };

    // The extension's last K-tile holds r's columns and zero padding: only its first ext_k_blocks k-blocks are
    // multiplied (at r = 16 one of the four). Unmasked it is the tile's last K-tile, masked the keep tile. -1: none.
    static_assert(kKBlocks == 4, "a 64-deep K-tile of 16-deep MMAs");
    const int trim_tile =
        p.ext_k_blocks < kKBlocks ? (p.masked ? p.k_tiles_ext - 1 : p.k_tiles_main + p.k_tiles_ext - 1) : -1;
    // One K-tile's MMAs, k-blocks [0, KB) of the stage; the first one of K-tile 0 zero-initialises the accumulator.
    // Each batch is fenced and committed as a whole, in every branch (a batch that spans the branches' join makes
    // ptxas inject warpgroup arrives).
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
    auto issue_tile = [&](int t, int stage) CUTLASS_LAMBDA_FUNC_INLINE {
      if (t == trim_tile) {
        switch (p.ext_k_blocks) {
          case 1: return issue(Int<1>{}, stage);
          case 2: return issue(Int<2>{}, stage);
          case 3: return issue(Int<3>{}, stage);
        }
      }
      issue(Int<kKBlocks>{}, stage);
    };

    // This tile's index in the block's sequence of tiles (dA's K-tiles find the tile's coordinates with it)
    const uint32_t tile_seq = smem_pipe_read.count() / uint32_t(k_tile_count);
    k_tile_count -= p.da_tiles;  // the main loop's K-tiles (D's)

    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    {  // K-tile 0
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      int read_stage = smem_pipe_read.index();
      issue_tile(0, read_stage);
      if (keep_tile == 0) apply_keep(read_stage);
      ++smem_pipe_read;
    }
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    warpgroup_fence_operand(accum);

    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 1; t < k_tile_count; ++t) {
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      int read_stage = smem_pipe_read.index();
      issue_tile(t, read_stage);
      if (t == keep_tile) apply_keep(read_stage);
      warpgroup_wait<1>();  // the batch of K-tile t - 1 is done: release its stage
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_read;
      ++smem_pipe_release;
    }
    warpgroup_fence_operand(accum);

    // The dA K-tiles last (load's order), while the producer already fills the ring with the next tile's. Each
    // warpgroup multiplies its X chunk transposed, (64 columns, 128 rows), by Ax's rows, (128 rows, NP), and stores
    // the product's first da_r columns as its part of row block m's dA partial. Each K-tile's wait for its product
    // also covers the K-tile before it, which is released then, as in the loop above; the last one is mma_tail's. The
    // tile's (m, n): the persistent scheduler's tile at this block's sequence index. Rows past M (the scheduler's
    // padding tiles) store nothing.
    if (p.da_tiles > 0) {
      cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90 sched(p.sched);
      sched.advance_to_next_work(tile_seq);
      const auto work = sched.get_current_work();
      const bool store = work.M_idx * kTileM < p.da_rows;
      const int j = kMmaWarpGroups > 1 ? warp_group_idx : 0;  // this warpgroup's chunk of each dA K-tile
      using MmaElement = typename TiledMma::ValTypeA;  // the 16-bit type itself (InternalElementA: its bits)
      auto da_tile = [&](int d, int stage, auto np) {
        constexpr int NP = decltype(np)::value;
        auto mma_da = make_tiled_mma(GMMA::ss_op_selector<MmaElement, MmaElement, float, Shape<_64, Int<NP>, _16>,
                                                          GMMA::Major::MN, GMMA::Major::MN>());
        Tensor sX = make_tensor(make_smem_ptr(da_chunk(shared_tensors, stage, j)), SmemLayoutDaX{});
        if (p.masked) {
          // keep ⊙ X in place, row t of the chunk by the warpgroup's thread t: its 64 columns as 8 vectors of 8
          // (the swizzle moves whole 16-byte vectors), each with one byte of the row's keep bits; a dropped element
          // times 0, so that a NaN or inf gives NaN, as in the reference's keep * x. Then the writes are made
          // visible to the wgmma's (async proxy) reads and the warpgroup waits for all of them.
          const int row = thread_idx % cutlass::NumThreadsPerWarpGroup;
          uint8_t const* bits = shared_tensors.smem_keep.data() + stage * kKeepBytes + row * kKeepRowBytes +
                                (d * kDaChunks + j) * 8;
          CUTLASS_PRAGMA_UNROLL
          for (int v = 0; v < 8; ++v) {
            const uint32_t b = bits[v];
            if (b == 0xFFu) continue;
            uint4* vec = reinterpret_cast<uint4*>(raw_pointer_cast(&sX(v * 8, row)));
            uint4 w = *vec;
            MmaElement* e = reinterpret_cast<MmaElement*>(&w);
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < 8; ++i)
              if (!((b >> i) & 1u)) e[i] = MmaElement(float(e[i]) * 0.f);
            *vec = w;
          }
          cutlass::arch::fence_view_async_shared();
          cutlass::arch::NamedBarrier::arrive_and_wait(cutlass::NumThreadsPerWarpGroup,
                                                       cutlass::canonical_warp_group_idx() - 1);
        }
        Tensor sV = make_tensor(make_smem_ptr(da_ax_rows(shared_tensors, stage)), SmemLayoutDaV<NP>{});
        auto thr = mma_da.get_slice(thread_idx % cutlass::NumThreadsPerWarpGroup);
        Tensor tXr = thr.make_fragment_A(thr.partition_A(sX));  // (MMA, 1, kTileM / 16)
        Tensor tVr = thr.make_fragment_B(thr.partition_B(sV));
        Tensor acc = partition_fragment_C(mma_da, Shape<_64, Int<NP>>{});
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        mma_da.accumulate_ = GMMA::ScaleOut::Zero;
        CUTLASS_PRAGMA_UNROLL
        for (int kb = 0; kb < size<2>(tXr); ++kb) {
          cute::gemm(mma_da, tXr(_, _, kb), tVr(_, _, kb), acc);
          mma_da.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc);
        pipeline.consumer_release(smem_pipe_release);  // the K-tile before this one
        ++smem_pipe_release;
        // acc (c, q): column c of the chunk, rank q; X's columns past N and the ranks past r are left out
        Tensor cC = thr.partition_C(make_identity_tensor(Shape<_64, Int<NP>>{}));
        float* out = p.da_partial + int64_t(work.M_idx) * p.da_r * p.da_cols;
        const int col0 = work.N_idx * kTileN + (d * kDaChunks + j) * 64;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(acc); ++i) {
          const int c = col0 + get<0>(cC(i)), q = get<1>(cC(i));
          if (store && q < p.da_r && c < p.da_cols) out[int64_t(q) * p.da_cols + c] = acc(i);
        }
      };
      for (int d = 0; d < p.da_tiles; ++d) {
        auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
        pipeline.consumer_wait(smem_pipe_read, barrier_token);
        const int stage = smem_pipe_read.index();
        with_da_np(p.da_np, [&](auto np) { da_tile(d, stage, np); });
        ++smem_pipe_read;
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------ kernels
template <int TM, int TN, int CM, int CN, bool Coop>
struct Config {
  using Tile = Shape<Int<TM>, Int<TN>, _64>;
  using Cluster = Shape<Int<CM>, Int<CN>, _1>;
  // Cooperative: both consumer warpgroups work on one tile (split along M). Ping-pong: they alternate tiles, so
  // one's epilogue overlaps the other's main loop.
  using Mainloop = cute::conditional_t<Coop, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                       cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using Epilogue = cute::conditional_t<Coop, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                       cutlass::epilogue::TmaWarpSpecialized>;
};
// The configs, indexed by GemmConfig (gemm_sm90.h).
template <int C> struct ConfigOf;
template <> struct ConfigOf<0> { using type = Config<256, 128, 1, 2, true>; };
template <> struct ConfigOf<1> { using type = Config<128, 128, 1, 2, false>; };
template <> struct ConfigOf<2> { using type = Config<128, 256, 2, 1, true>; };
template <> struct ConfigOf<3> { using type = Config<256, 128, 2, 1, true>; };
template <> struct ConfigOf<4> { using type = Config<128, 256, 1, 2, true>; };
template <> struct ConfigOf<5> { using type = Config<128, 128, 2, 1, false>; };

// Scheduler: CUTLASS's persistent data-parallel one (production); bench/dev's probe also builds the cooperative config
// on CUTLASS's stream-K scheduler, which splits the K axis of a partial last wave of tiles across blocks.
template <class Element, class LayoutB, class Cfg, class Scheduler = cutlass::gemm::PersistentScheduler>
struct Gemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // 16 bytes of a 16-bit type: TMA's alignment
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBias<Element, float, Element, void, float>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, Element, LayoutD, kAlign,
      typename Cfg::Epilogue, Fusion>::CollectiveOp;

  // The stages that fit beside the epilogue, each with its A and B tiles, its keep-bits slot and its two barriers (1 KB
  // left for the kernel's other barriers; 8 at most). A fixed carveout for 8 keep slots (32 KB at 128 x 256) left the
  // 128 x 256 tile 3 stages where 4 fit.
  static constexpr int kSmemBytes = 232448;  // an sm_90 block's shared memory, 227 KB
  static constexpr int kTileM = size<0>(typename Cfg::Tile{}), kTileN = size<1>(typename Cfg::Tile{});
  static constexpr int kStageBytes = (kTileM + kTileN) * 64 * int(sizeof(Element)) + kTileM * kTileN / 8 + 32;
  static constexpr int kStages =
      cute::min(8, (kSmemBytes - 1024 - static_cast<int>(sizeof(typename Epilogue::SharedStorage))) / kStageBytes);
  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      typename Cfg::Tile, typename Cfg::Cluster, cutlass::gemm::collective::StageCount<kStages>,
      typename Cfg::Mainloop>::CollectiveOp;
  using Mainloop = KExtendedMainloop<BaseMainloop>;
  static_assert(Mainloop::kStages == kStages, "the stage count asked for");

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;

  // The kernel's arguments for a problem: the concatenated K axis, the bias epilogue, the tile order.
  static typename Kernel::Arguments arguments(const LoraGemmArgs& a, int swizzle, int raster, int sm_count) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    using E = Element;
    const int M = int(a.M), N = int(a.N), K = int(a.K), Kx = int(a.Kx);
    typename Kernel::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    const bool da = a.da_x != nullptr;
    // the concatenated K axis, and dA's K-tiles where it has them
    args.problem_shape = {M, N, int((a.K + 63) / 64) * 64 + Kx + (da ? Mainloop::kDaTiles * 64 : 0), 1};
    args.mainloop = {static_cast<E const*>(a.a), cutlass::make_cute_packed_stride(StrideA{}, {M, K, 1}),
                     static_cast<E const*>(a.b), cutlass::make_cute_packed_stride(StrideB{}, {N, K, 1}),
                     static_cast<E const*>(a.ax), cutlass::make_cute_packed_stride(StrideA{}, {M, Kx, 1}),
                     static_cast<E const*>(a.bx), cutlass::make_cute_packed_stride(StrideB{}, {N, Kx, 1}),
                     K, Kx, a.keep, a.early_dependents ? 1 : 0};
    args.mainloop.k_ext_used = int(a.Kx_used);
    args.mainloop.ptr_dax = static_cast<E const*>(a.da_x);
    args.mainloop.ptr_da = a.da_partial;
    args.mainloop.da_r = da ? a.da_r : 0;
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<E const*>(a.bias);
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = static_cast<E*>(a.d);
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, {M, N, 1});
    args.epilogue.dC = args.epilogue.dD;
    args.hw_info.device_id = 0;  // only read when sm_count <= 0
    args.hw_info.sm_count = sm_count;
    args.scheduler.max_swizzle_size = swizzle;
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.raster_order = raster == 1 ? Raster::AlongM : raster == 2 ? Raster::AlongN : Raster::Heuristic;
    return args;
  }

  // Bytes of workspace a launch needs: none on the persistent data-parallel scheduler; stream-K's partial tiles and
  // their flags.
  static size_t workspace_size(const LoraGemmArgs& a, int swizzle, int raster, int sm_count) {
    return Kernel::get_workspace_size(arguments(a, swizzle, raster, sm_count));
  }

  // workspace: workspace_size's bytes where the scheduler needs them (zeroed here before the launch), else unused.
  static cudaError_t run(const LoraGemmArgs& a, int swizzle, int raster, int sm_count, cudaStream_t stream,
                         void* workspace = nullptr, size_t workspace_bytes = 0) {
    typename Kernel::Arguments args = arguments(a, swizzle, raster, sm_count);
    if (!Kernel::can_implement(args)) return cudaErrorNotSupported;
    const size_t ws = Kernel::get_workspace_size(args);
    // the mask and dA: whole K per tile, in the data-parallel scheduler's order
    if (ws > workspace_bytes || (ws != 0 && (a.keep != nullptr || a.da_x != nullptr))) return cudaErrorNotSupported;
    // The consumer finds the extension's last K-tile by its index from the tile's K start: only a whole-K schedule
    // (data-parallel, no workspace) has the trimmed tile where it looks.
    if (ws != 0) args.mainloop.k_ext_used = 0;
    if (ws != 0 && Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess)
      return cudaErrorUnknown;
    typename Kernel::Params params = Kernel::to_underlying_arguments(args, ws != 0 ? workspace : nullptr);
    if constexpr (cute::is_same_v<typename Kernel::TileSchedulerParams, typename Mainloop::SchedParams>)
      params.mainloop.sched = params.scheduler;  // dA's consumer finds its tiles' coordinates with it
    else if (a.da_x != nullptr)
      return cudaErrorNotSupported;

    static_assert(Kernel::SharedStorageSize <= kSmemBytes, "over the 227 KB of shared memory an sm_90 block can have");
    // May start under the previous launch's tail (the load warps wait for it), except after the workspace's zeroing,
    // which the consumer warps' reduction reads, and where the kernel was built not to wait (the stream-K probe).
#if defined(CUTLASS_ENABLE_GDC_FOR_SM90)
    return launch_cutlass<Kernel>(params, ws == 0, stream);
#else
    return launch_cutlass<Kernel>(params, false, stream);
#endif
  }
};

// One config of one (dtype, layout): the unit that a translation unit instantiates.
template <class Element, class LayoutB, int C>
cudaError_t run_one(const LoraGemmArgs& a, int swizzle, int raster, int sm_count, cudaStream_t stream) {
  return Gemm<Element, LayoutB, typename ConfigOf<C>::type>::run(a, swizzle, raster, sm_count, stream);
}

}  // namespace sm90
}  // namespace lora_kernels
