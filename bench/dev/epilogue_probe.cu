// Would a per-column scale in the fused forward's epilogue (DoRA's y = g ⊙ acc + b at p = 0) cost main-loop stages?
// Next to csrc/fused_fwd_sm90.cuh's FusedFwd (its own epilogue, LinCombPerColBias, and main loop), builds the same
// collectives from FusedFwd's tile, cluster, layouts and carveout with CUTLASS's PerColLinCombPerColBiasEltAct
// instead (per-column alpha from a pointer; a null pointer falls back to the scalar), and prints the epilogue's
// shared memory, the main loop's stage count and the kernel's shared memory (FusedFwd's lead-tile slots included)
// against the sm_90 limit.
// Host-only, no GPU needed:
//   nvcc -std=c++17 -O1 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -I$CUT/cutlass_library/source/include -I$CUT/cutlass_library/source/tools/util/include -Icsrc \
//     -DLORA_KERNELS_HAVE_SM90_GEMM=1 bench/dev/epilogue_probe.cu -o /tmp/epilogue_probe && /tmp/epilogue_probe
// ($CUT: the unpacked nvidia-cutlass 4.2.0.0 wheel, as .ci/compile_cu.sh fetches it.)
#include <cstdio>

#include "fused_fwd_sm90.cuh"

using namespace cute;
using lora_kernels::sm90fused::FusedFwd;

// FusedFwd's collectives with another epilogue fusion: only the fusion differs.
template <class F, class Fusion>
struct WithFusion {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename F::Tile, typename F::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, typename F::LayoutD, F::kAlign,
      typename F::Epilogue::ElementD, typename F::LayoutD, F::kAlign, cutlass::epilogue::TmaWarpSpecialized,
      Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename F::Mainloop::ElementA, typename F::LayoutA,
      F::kAlign, typename F::Mainloop::ElementB, typename F::LayoutB, F::kAlign, float, typename F::Tile,
      typename F::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage)) +
                                                         F::kApSlotCarveout>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Base = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    cutlass::gemm::PersistentScheduler>;
};

// The kernel's shared memory as FusedFwd::SharedStorage lays it out: CUTLASS's storage, then the lead tiles' slots
// (8 elements without lead tiles), 1 KB aligned, the struct rounded up to its 1 KB alignment.
template <class Epilogue, class Mainloop, class Base, class F>
size_t print(const char* name) {
  const size_t slots = F::kApSlotCarveout ? (size_t)F::kApSlotElems * Mainloop::DispatchPolicy::Stages * 2 : 16;
  const size_t total = ((sizeof(typename Base::SharedStorage) + 1023) / 1024 * 1024 + slots + 1023) / 1024 * 1024;
  std::printf("%-38s epilogue %6zu B | mainloop stages %d | kernel %6zu B of 232448 (%s)\n", name,
              sizeof(typename Epilogue::SharedStorage), int(Mainloop::DispatchPolicy::Stages), total,
              total <= 232448 ? "fits" : "DOES NOT FIT");
  return total;
}

template <bool kLead>
void compare(const char* variant) {
  using E = cutlass::bfloat16_t;
  using F = FusedFwd<E, kLead>;
  using Scale = WithFusion<F, cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<
                                  cutlass::epilogue::thread::Identity, E, float, E, void, float>>;
  std::printf("%s:\n", variant);
  const size_t own =
      print<typename F::Epilogue, typename F::Mainloop, typename F::Base, F>("  per-column bias (FusedFwd)");
  if (own != (size_t)F::SharedStorageSize)  // the layout rule above no longer matches FusedFwd's
    std::printf("  (FusedFwd::SharedStorage is %d B: the rule above is out of date)\n", F::SharedStorageSize);
  print<typename Scale::Epilogue, typename Scale::Mainloop, typename Scale::Base, F>("  per-column scale + bias");
}

int main() {
  compare<false>("u tiles");
  compare<true>("lead tiles");
}
