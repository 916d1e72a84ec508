// Shrink pass on Hopper (sm_90a, wgmma): u = scaling/(1-p) · (keep ⊙ x) Aᵀ (M, r) fp32, as K-split partials when
// the plan splits K, from one read of x. The same outputs and partial layout as launch_lora_shrink (shrink.cu), whose
// mma.sync kernel runs wherever this one does not (lora_shrink_sm90_unsupported says why).
//
// Math   : the G product of the streaming kernel (stream_sm90.cuh, MODE kShrink): per r-chunk z and 128 x 64 tile of
//          x,   G (128 x NW) = (keep ⊙ x)_tile . Ap_chunk^T        K = the tile's 64 columns
//          with lora_A's P pieces (bf16x3 of fp32 A on bf16 x, else cast) stacked as NW = P*RJ columns; each tile's
//          pieces are added in fp32 into the row tile's running u, scaled when written.
// Mask   : with dropout each G warpgroup reads its half of each landed x tile into wgmma's register fragments and
//          multiplies them by the forward's keep bits (dropout_bits.cu, the contract's mask), then runs the
//          register-A wgmma on them (stream_sm90.cuh, masked_frags).
// Prep   : A's pieces Ap [Z][NW][Kpad] in x's type (scratch: lora_shrink_sm90_scratch_bytes), as the dy pass's Bp.
// Tiling : as the dy pass (dy_pass_sm90.cu) without D: a loader warpgroup, a 4-stage ring of {x tile, Ap chunk},
//          mbarriers between them; warpgroup 1 multiplies the tile's rows 0-63, warpgroup 2 rows 64-127, so one
//          warpgroup holds the accumulators of a 64-row half and r up to 64 is one r-chunk even with three pieces.
// Bytes  : x once per r-chunk (once for r <= 64); Ap from L2 once per tile; partials col_groups * M * r floats
//          (summed by the pack or the reduce).
#include "stream_sm90.cuh"


namespace lora_kernels {
using namespace detail;
namespace {

std::atomic<int> sh_state{0};
bool sh_device_ok() {
  return sm90_kernel_ok(reinterpret_cast<const void*>(&stream_sm90_kernel<kShrink, __nv_bfloat16, 1, 16>), sh_state);
}

bool sh_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_SM90_SHRINK");
  return on;
}

// LORA_KERNELS_SM90_SHRINK=2: this kernel also with dropout at r <= 16 (for A/B timing: bench/dev/stream_bench.cu)
bool sh_masked_low_rank() {
  static const char* const v = getenv("LORA_KERNELS_SM90_SHRINK");
  static const bool on = v != nullptr && strcmp(v, "2") == 0;
  return on;
}

}  // namespace

SplitPlan lora_shrink_sm90_plan(int64_t M, int64_t K, int r, int pieces) {
  return stream_sm90_plan(M, K, r, pieces, kShrink);
}

const char* lora_shrink_sm90_unsupported(const void* x, DType x_dtype, DType a_dtype, int64_t M, int64_t K, int r,
                                         float p) {
  if (!sh_enabled()) return "LORA_KERNELS_SM90_SHRINK=0";
  if (x_dtype == DType::kFloat32 || !stream_pass_on_tc(x_dtype, a_dtype))
    return "x and the adapters take the FFMA kernel (fp32 x, or fp32 adapters on fp16)";
  if (!sh_device_ok()) return "not a compute capability 9.0 device with this build's sm_90a code";
  if (M < 1 || r < 1 || r > kMaxRank) return "empty problem or rank out of range";
  if (K % 8 || reinterpret_cast<uintptr_t>(x) % 16) return "K must be a multiple of 8 and x 16-byte aligned";
  if (ceil_div(K, DS_BN) < ds_min_col_tiles(r, adapter_pieces(x_dtype, a_dtype), kShrink))
    return "K below the pass's column tiles (stages - 1 tiles of 64)";
  if (ceil_div(M, DS_BM) > 0x7fffffff) return "M too large";
  if (lora_shrink_sm90_plan(M, K, r, adapter_pieces(x_dtype, a_dtype)).row_splits < 1)
    return "no column grouping fits in shared memory";
  // With dropout at r <= 16 and 16-bit adapters (one piece) the mma.sync kernel stays: 30.0 against this kernel's
  // 42.2 us at 8192 x 4096 (88 against 129 at K = 14336); with fp32 adapters (three pieces) this kernel is faster:
  // 29.2 against 36.1 us (84 against 114) (H200, bench/dev/stream_bench.cu, session 30).
  if (p > 0.f && r <= 16 && adapter_pieces(x_dtype, a_dtype) == 1 && !sh_masked_low_rank())
    return "dropout at r <= 16 with 16-bit adapters: the mma.sync kernel masks faster (measured)";
  return nullptr;
}

size_t lora_shrink_sm90_scratch_bytes(int64_t K, int r, int pieces) {
  const DsShape sh = ds_shape(r, pieces, kShrink);
  return (size_t)sh.z * sh.nw * (size_t)(ceil_div(K, DS_PREP) * DS_PREP) * 2;
}

cudaError_t launch_lora_shrink_sm90(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out,
                                    int64_t M, int64_t K, int r, SplitPlan plan, float scaling, float p,
                                    const uint8_t* keep8, void* scratch, cudaStream_t stream) {
  if (lora_shrink_sm90_unsupported(x, x_dtype, a_dtype, M, K, r, p) != nullptr ||
      plan.row_splits < 1 || !scratch || !u_out || (p > 0.f && keep8 == nullptr))
    return cudaErrorInvalidValue;
  const int pieces = adapter_pieces(x_dtype, a_dtype);
  const DsShape sh = ds_shape(r, pieces, kShrink);
  const int64_t kpad = ceil_div(K, DS_PREP) * DS_PREP;
  if (plan.col_groups > 65535 || plan.row_splits > 0x7fffffff || sh.z > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = ds_smem(sh, kShrink, 0);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)sh.z);
  const float scale = dropout_scale(scaling, p);
  return with_dtypes<true>(x_dtype, a_dtype, [&](auto xt, auto at) -> cudaError_t {
    using T = decltype(xt);
    using TA = decltype(at);
    T* ap = static_cast<T*>(scratch);
    const dim3 prep_grid((unsigned)(kpad / DS_PREP), (unsigned)(sh.z * sh.rj / 8));
    cudaError_t e = with_pieces<T>(pieces, [&](auto pc) {  // mpad = 0: every prep block writes Ap, from A's rows
      return launch_kernel(dy_sm90_prep_kernel<T, TA, decltype(pc)::value>, prep_grid, DS_PREP, 0, stream,
                           static_cast<const TA*>(A), static_cast<const float*>(nullptr), ap, static_cast<T*>(nullptr),
                           (int64_t)0, K, r, sh.rj, kpad, (int64_t)0, true);
    });
    if (e != cudaSuccess) return e;
    return with_stream_kernel<kShrink, T>(pieces, sh.rj, false, [&](auto kernel) {
      return launch_kernel_pdl(kernel, grid, DS_THREADS, smem, stream, static_cast<const T*>(x), static_cast<const T*>(ap),
                           static_cast<const T*>(nullptr), u_out, static_cast<float*>(nullptr), M, K, r, kpad,
                           (int64_t)0, p > 0.f ? keep8 : nullptr, scale, static_cast<const float*>(nullptr), 0);
    });
  });
}

}  // namespace lora_kernels
