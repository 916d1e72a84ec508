// dA as a GEMM on Hopper (gemm_sm90.h, DaGemmArgs): the backward's dA at p = 0, adapters in x's dtype or fp32 on bf16.
//
// Math   : dA (r, K) = Vᵀ X summed over the M tokens, V = s·g (M, r) the dx GEMM's packed operand (vx: s·(dy B)
//          rounded to x's dtype, which the dx term multiplies too; with fp32 adapters on bf16 x the bf16x3 pieces of
//          the fp32 s·g, stacked as 3r columns, whose exact products the reduce adds in fp32) and X = x (M, K). As a
//          GEMM in CUTLASS's terms,
//          D (M' = K, N' = r) = A (M' x K') · B (K' x N') with K' the tokens:
//            A = Xᵀ  (x's columns contiguous: ColumnMajor A),
//            B = V   (r contiguous at row pitch ldv: RowMajor B),
//            D = dAᵀ (x's columns contiguous: ColumnMajor D, i.e. dA (r, K) row-major).
//          Both operands are MN-major, which TMA and WGMMA take for 16-bit types as they are: no transposed copy.
// Split  : the tokens in `splits` equal ranges, CUTLASS's batch mode L (A, B and D advance by a range per batch);
//          each range's fp32 product is its partial (splits, pieces, r, K), summed in a fixed order by the caller's
//          reduce. So every partial is written by one block, without atomics: the same bits on every call.
// Tiling : 128 x 64 tiles (128 of x's columns, 64 per consumer warpgroup, x 64 of V's columns, padded) over 64-token
//          K-tiles, CUTLASS's TMA + WGMMA cooperative persistent kernel, in clusters of 2 along x's columns that
//          share V's K-tile (multicast). Each tile reads its columns of x once: 128 columns x the range's tokens.
//          Above 64 of V's columns (fp32 adapters above r = 21, r > 64) an x tile has one tile per 64 of them, taken
//          one after another in the tile order (along N, no swizzle): they run at once, and all but one read x from
//          L2.
//          The kernel is bound by that read (2·M·K bytes against 2·M·K·r FLOPs), not by its MMAs.
// Sums   : each 64-token K-tile's wgmma products go into a scratch accumulator that is added into the tile's fp32
//          accumulator in registers after the K-tile (CUTLASS's FP8 mainloop "promotion", which is not FP8-specific).
//          The tensor cores' fp32 accumulation truncates, so tensor-core chains stay one tile long, as in the passes
//          (dy_pass.cu, dy_pass_sm90.cu). Summed in the tensor cores' accumulator alone, one range of 65600 tokens
//          had a dA error of 0.28 with fp32 adapters where the same-precision baseline's was 1.6e-3 (H100, session
//          62); the dA pass, which adds every 64-token product in fp32, passed that case (session 53). (With 16-bit
//          adapters dA's rounding to bf16 or fp16 is larger than that error.) The fp32 sum of a range's K-tile sums
//          then rounds with the square root of their count, so a range holds at most 16384 tokens
//          (lora_dA_gemm_sm90_splits; 65600 tokens in one range had 3.0x the baseline's error, session 63).
// Launch : after the dx GEMM, as a programmatic dependent launch: the load warps wait for the launch before it (and
//          so for the pack that wrote V) before they read.
#include "gemm_sm90_instances.h"

#include <cstdlib>

#if LORA_KERNELS_HAVE_SM90_GEMM
#if !defined(CUTLASS_ENABLE_GDC_FOR_SM90)
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
#endif
#include "sm90_launch.cuh"

#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include <cutlass/util/packed_stride.hpp>

namespace lora_kernels {
namespace sm90 {
namespace {
using namespace cute;

using DaTile = Shape<_128, _64, _64>;
using DaCluster = Shape<_2, _1, _1>;

template <class Element>
struct DaGemm {
  using LayoutA = cutlass::layout::ColumnMajor;  // Xᵀ: (K, tokens), x's columns contiguous
  using LayoutB = cutlass::layout::RowMajor;     // V: (tokens, r), r contiguous
  using LayoutD = cutlass::layout::ColumnMajor;  // dAᵀ: (K, r), the partial (r, K) row-major
  static constexpr int kAlign = 8, kAlignD = 4;  // 16 bytes: TMA's alignment
  // fp32 accumulators and partials, spelled through Element: a builder type that depends on none of the template's
  // parameters does not survive nvcc's host pass (its decltype-laden spelling is re-parsed there).
  using Acc = cute::conditional_t<sizeof(Element) == 2, float, void>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, DaTile, DaCluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, LayoutD, kAlignD, Acc, LayoutD, kAlignD,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  // The stages that fit beside the epilogue (1 KB left for the kernel's barriers; 8 at most): 24 KB each.
  static constexpr int kStageBytes = (128 + 64) * 64 * int(sizeof(Element)) + 32;
  static constexpr int kStages =
      cute::min(8, (232448 - 1024 - static_cast<int>(sizeof(typename Epilogue::SharedStorage))) / kStageBytes);
  using Built = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, Acc,
      DaTile, DaCluster, cutlass::gemm::collective::StageCount<kStages>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  // The builder's main loop (its layouts, copies and MMA) under the promoting dispatch policy (Sums above).
  using Promoting = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm90TmaGmmaWarpSpecializedFP8<kStages, DaCluster,
                                                           cutlass::gemm::KernelTmaWarpSpecializedCooperative>,
      DaTile, Element, typename Built::StrideA, Element, typename Built::StrideB, typename Built::TiledMma,
      typename Built::GmemTiledCopyA, typename Built::SmemLayoutAtomA, typename Built::SmemCopyAtomA,
      typename Built::TransformA, typename Built::GmemTiledCopyB, typename Built::SmemLayoutAtomB,
      typename Built::SmemCopyAtomB, typename Built::TransformB>;
  // The promoting loop adds into the kernel's accumulator, which nothing on this path zeroes (the kernel makes it in
  // registers per tile): zeroed here first.
  struct Mainloop : Promoting {
    template <class FrgTensorC>
    CUTLASS_DEVICE void mma(typename Promoting::MainloopPipeline pipeline, typename Promoting::PipelineState read,
                            FrgTensorC& accum, int k_tiles, int thread_idx,
                            typename Promoting::TensorStorage& smem, typename Promoting::Params const& params) {
      cute::clear(accum);
      Promoting::mma(pipeline, read, accum, k_tiles, thread_idx, smem, params);
    }
  };
  // The promotion interval in MMAs (16 tokens each, a multiple of a K-tile's 4): every K-tile, or every n K-tiles with
  // LORA_KERNELS_DA_GEMM_PROMOTE=n (0: only at the range's end, the tensor cores' accumulator alone), for A/B timing.
  static uint32_t promote_every() {
    static const uint32_t every = [] {
      const char* v = getenv("LORA_KERNELS_DA_GEMM_PROMOTE");
      const long n = v ? strtol(v, nullptr, 10) : 1;
      return n <= 0 || n > (1 << 20) ? (1u << 30) : uint32_t(n) * 4u;
    }();
    return every;
  }
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;

  static cudaError_t run(const DaGemmArgs& a, int sms, cudaStream_t stream) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    // V's columns: r, or its pieces [p][r] (each piece's product a partial of its own)
    const int K = int(a.K), r = a.r * a.pieces, rows = int(a.M / a.splits), splits = int(a.splits);
    typename Kernel::Arguments args;
    args.mode = splits > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {K, r, rows, splits};
    // A (K, rows, splits): packed, x's rows of K elements one after another
    StrideA da = cutlass::make_cute_packed_stride(StrideA{}, {K, rows, splits});
    get<2>(da) = splits > 1 ? int64_t(K) * rows : 0;  // in 64 bits (the helper multiplies ints)
    // B (r, rows, splits): V's rows at pitch ldv
    StrideB db{};
    get<1>(db) = a.ldv;
    get<2>(db) = a.ldv * rows;
    args.mainloop = {static_cast<Element const*>(a.x), da, static_cast<Element const*>(a.v), db, promote_every()};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = a.partial;
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, {K, r, splits});
    args.epilogue.dC = args.epilogue.dD;
    args.hw_info.device_id = 0;  // only read when sm_count <= 0
    args.hw_info.sm_count = sms;
    // Over 64 of V's columns: their tiles of one x tile next to each other in the tile order (no swizzle), so that
    // the blocks that read that x tile run at once and all but the first find it in L2.
    if (r > 64) {
      args.scheduler.raster_order = cutlass::gemm::kernel::detail::RasterOrderOptions::AlongN;
      args.scheduler.max_swizzle_size = 1;
    }
    if (!Kernel::can_implement(args) || Kernel::get_workspace_size(args) != 0) return cudaErrorNotSupported;
    const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
    return launch_cutlass<Kernel>(params, true, stream);
  }
};

}  // namespace

cudaError_t run_dA_bf16(const DaGemmArgs& a, int sms, cudaStream_t s) {
  return DaGemm<cutlass::bfloat16_t>::run(a, sms, s);
}
cudaError_t run_dA_fp16(const DaGemmArgs& a, int sms, cudaStream_t s) { return DaGemm<cutlass::half_t>::run(a, sms, s); }

}  // namespace sm90
}  // namespace lora_kernels
#endif  // LORA_KERNELS_HAVE_SM90_GEMM
