// Would a per-column scale in the fused forward's epilogue (DoRA's y = g ⊙ acc + b at p = 0) cost main-loop stages?
// Builds the collectives of csrc/fused_fwd_sm90.cuh (128 x 128 x 64 tiles, 1 x 2 cluster, ping-pong, the carveout
// rule with the lead tiles' lora_A slots) once with today's epilogue (LinCombPerColBias) and once with CUTLASS's
// PerColLinCombPerColBiasEltAct (per-column alpha from a pointer; a null pointer falls back to the scalar), and prints
// the epilogue's shared memory, the main loop's stage count and the kernel's shared memory against the sm_90 limit.
// Host-only, no GPU needed:
//   nvcc -std=c++17 -O1 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -I$CUT/cutlass_library/source/include -I$CUT/cutlass_library/source/tools/util/include \
//     bench/dev/epilogue_probe.cu -o /tmp/epilogue_probe && /tmp/epilogue_probe
// ($CUT: the unpacked nvidia-cutlass 4.2.0.0 wheel, as .ci/compile_cu.sh fetches it.)
#include <cstdio>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
using namespace cute;
template <class Element, class Fusion, int kApSlotCarveout>
struct Probe {
  using Tile = Shape<_128, _128, _64>;
  using Cluster = Shape<_1, _2, _1>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float, void, LayoutD, kAlign, Element, LayoutD, kAlign, cutlass::epilogue::TmaWarpSpecialized,
      Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage)) +
                                                         kApSlotCarveout>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Base = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    cutlass::gemm::PersistentScheduler>;
  static void print(const char* name) {
    const size_t total = sizeof(typename Base::SharedStorage) + kApSlotCarveout;
    std::printf("%-38s epilogue %6zu B | mainloop stages %d | kernel %6zu B of 232448 (%s)\n", name,
                sizeof(typename Epilogue::SharedStorage), int(Mainloop::DispatchPolicy::Stages), total,
                total <= 232448 ? "fits" : "DOES NOT FIT");
  }
};
using Elt = cutlass::bfloat16_t;
using Bias = cutlass::epilogue::fusion::LinCombPerColBias<Elt, float, Elt, void, float>;
using ScaleBias = cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<cutlass::epilogue::thread::Identity, Elt,
                                                                          float, Elt, void, float>;
int main() {
  constexpr int kLeadCarveout = 6 * 32 * 64 * 2;  // kApRows = 32 x 64 bf16, 6 stages
  Probe<Elt, Bias, 0>::print("u tiles, per-column bias");
  Probe<Elt, ScaleBias, 0>::print("u tiles, per-column scale + bias");
  Probe<Elt, Bias, kLeadCarveout>::print("lead tiles, per-column bias");
  Probe<Elt, ScaleBias, kLeadCarveout>::print("lead tiles, per-column scale + bias");
}
