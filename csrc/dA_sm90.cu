// dA pass on Hopper (sm_90a, wgmma): the row-split partials of dA = scaling/(1-p) · gᵀ (keep ⊙ x) (r, K) from one
// read of x. The same outputs, partial layout and reduce as launch_lora_dA (dA.cu), whose mma.sync kernel runs
// wherever this one does not (lora_dA_sm90_unsupported says why).
//
// Math   : the D product of the streaming kernel (stream_sm90.cuh, MODE kDA): per r-chunk z and 128 x 64 tile of x,
//            D (64 x NW) = x_tile^T . Up_tile^T        K = the tile's 128 rows
//          with g's P pieces (bf16x3 of the fp32 g on bf16 x, else cast) stacked as NW = P*RJ columns; each tile's
//          pieces are added in fp32 into the column group's sums in shared memory, scaled once at the end.
// Mask   : with dropout the loader stages each x tile's keep bits (dropout_bits.cu, the contract's mask) beside it,
//          and warpgroup 1 multiplies the landed tile by them in shared memory before the D warpgroup's wgmma reads
//          it; the scale is scaling/(1-p). (LORA_KERNELS_DA_MASKED=0 sends dA with dropout to the mma.sync kernel,
//          dA.cu, for A/B timing. The earlier route above r = 16, this kernel on a masked copy of x written by the
//          keep-bits pass, was slower at every rank: 52.0 + 42.8 us for that copy against 59.8 at r = 64, fp32
//          adapters, 8192 x 4096, and 36.2 + 43.0 against 47.1 with bf16 adapters; H200, thirtieth session.)
// Up     : g's rows of each 128-row tile as x's type (or their P pieces). At r <= 16 (ds_up_from_g) warpgroup 1
//          (which has no product) writes them into shared memory from g itself (beside the masking), and the pass
//          is one launch; above,
//          a prep launch stages them (Gp [Z][NW][Mpad] in x's type, scratch: lora_dA_sm90_scratch_bytes) and the
//          loader copies each row tile's.
// Tiling : as the dy pass (dy_pass_sm90.cu) without its G warpgroup's work: a loader warpgroup, a ring of x tiles
//          (4 stages; 3 where r > 32 at three pieces: one 64-column r-chunk, whose Up double buffer takes 96 KB;
//          6 with dropout where the side operand is at most 48 wide, for the masking's longer hold on each stage),
//          Up tiles per row tile in a double buffer, mbarriers between them. Warpgroup 2 computes D; warpgroup 1
//          writes the Up tiles or has no product (splitting D over both consumer warpgroups ran slower:
//          bench/results/h200_2026-12-02/session21).
// Bytes  : x once per r-chunk; g from L2 once per row tile; partials row_splits * r * K floats.
// Beside : in the backward the pass can run beside the dx GEMM instead of after it (lora_dA_sm90_beside): the GEMM,
//          bound by its tensor cores, takes a grid of fewer SMs and lets this launch start early; the pass streams x
//          on the SMs left free and waits for the GEMM at its end.
#include "gemm_sm90.h"
#include "stream_sm90.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

std::atomic<int> da_state{0};
bool da_device_ok() {
  return sm90_kernel_ok(reinterpret_cast<const void*>(&stream_sm90_kernel<kDA, __nv_bfloat16, 1, 16>), da_state);
}

bool da_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_SM90_DA");
  return on;
}

bool da_masked_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_DA_MASKED");
  return on;
}

}  // namespace

SplitPlan lora_dA_sm90_plan(int64_t M, int64_t K, int r, int pieces, bool masked, int blocks) {
  return stream_sm90_plan(M, K, r, pieces, kDA, false, masked, blocks);
}

const char* lora_dA_sm90_unsupported(const void* x, DType x_dtype, DType a_dtype, int64_t M, int64_t K, int r,
                                     float p) {
  if (!da_enabled()) return "LORA_KERNELS_SM90_DA=0";
  if (x_dtype == DType::kFloat32 || !stream_pass_on_tc(x_dtype, a_dtype))
    return "x and the adapters take the FFMA kernel (fp32 x, or fp32 adapters on fp16)";
  if (!da_device_ok()) return "not a compute capability 9.0 device with this build's sm_90a code";
  if (M < 1 || r < 1 || r > kMaxRank) return "empty problem or rank out of range";
  if (K % 8 || reinterpret_cast<uintptr_t>(x) % 16) return "K must be a multiple of 8 and x 16-byte aligned";
  if (ceil_div(K, DS_BN) < ds_min_col_tiles(r, adapter_pieces(x_dtype, a_dtype), kDA, p > 0.f))
    return "K below the pass's column tiles (stages - 1 tiles of 64)";
  if (ceil_div(M, DS_BM) > 0x7fffffff) return "M too large";
  if (lora_dA_sm90_plan(M, K, r, adapter_pieces(x_dtype, a_dtype), p > 0.f).row_splits < 1)
    return "no column grouping fits in shared memory";
  if (M <= small_m_backward_rows()) return "M <= kSmallMBackwardRows (64): the mma.sync kernel is faster";
  if (p > 0.f && !da_masked_enabled()) return "dropout: LORA_KERNELS_DA_MASKED=0";
  return nullptr;
}

// The cost model behind the choice (seconds). A wave of the GEMM's tiles takes a tile's FLOPs at kSmFlops, the rate
// of one SM's tensor cores in the sm_90 GEMM (812 TFLOP/s over 132 SMs for the 8192 x 4096 x 14336 dx on an H200).
// A dA block streams its span of x at block_bytes(), measured by bench/dev/beside_sweep.py with 4-24 blocks beside the
// GEMM (session 50, H200 and H100 alike): about 28 GB/s per block where g's pieces are at most 48 wide, 14 at 64, 9-10
// at 192, and 0.6x that with dropout (the masking warpgroup). That is a block's own rate, not memory's: an 8-stage
// ring, twice the bytes in flight, streamed no faster (the backward at 8192 x 4096 -> 1024, bf16 adapters, dA on 4
// SMs: 478 us on an H100 against the 4-stage ring's 479 on an H200), so the per-tile work bounds it. After the GEMM, on
// every SM, dA reads x at the lower of 132 blocks' rate and kDaBytes (2.3e12 B/s on an H200, 1.7e12 on an H100: 29 and
// 38.6 us for 64 MiB at r = 16); each launch adds kLaunch.
namespace {
constexpr double kSmFlops = 6.0e12, kDaBytes = 2.0e12, kLaunch = 3e-6;

double block_bytes(int nw, bool masked) {
  const double b = nw <= 48 ? 27e9 : nw <= 64 ? 14e9 : 9e9;
  return masked ? 0.6 * b : b;
}

// The model's choice: the SMs for dA (even: the GEMM keeps whole clusters of 2) that minimise the longer of the
// GEMM's waves on the rest and dA's largest span, where that beats the GEMM followed by dA by 2% or more.
DaBeside beside_by_model(const LoraGemmArgs& dx, int64_t M, int64_t K, int r, int pieces, bool masked, int sms) {
  DaBeside best{0, SplitPlan{0, 0, 0, 0}};
  int bn = 0;
  const int64_t waves_all = lora_gemm_sm90_waves(dx, sms, &bn);
  if (waves_all < 1) return best;
  const double wave = 2.0 * 128.0 * bn * (double)(ceil_div(dx.K, 64) * 64 + dx.Kx) / kSmFlops;
  const double tile_bytes = 2.0 * DS_BM * DS_BN + (masked ? (double)DS_BITS : 0.0);
  const DsShape sh = ds_shape(r, pieces, kDA);
  const double x_bytes = 2.0 * (double)M * (double)K * (double)sh.z;  // x once per r-chunk
  const double per_block = block_bytes(sh.nw, masked);
  const double after = (double)waves_all * wave + x_bytes / std::min(kDaBytes, sms * per_block) + kLaunch;
  double best_t = 0.98 * after;
  for (int b = 2; b <= sms / 4; b += 2) {
    const int64_t waves = lora_gemm_sm90_waves(dx, sms - b);
    const SplitPlan p = stream_sm90_plan(M, K, r, pieces, kDA, false, masked, b);
    if (waves < 1 || p.row_splits < 1) continue;
    const double span = (double)ceil_div(p.rows_per_split, DS_BM) * (double)ceil_div(p.cols_per_group, DS_BN);
    const double t = std::max((double)waves * wave, span * tile_bytes / per_block + kLaunch);
    if (t < best_t) {
      best_t = t;
      best = DaBeside{b, p};
    }
  }
  return best;
}
}  // namespace

DaBeside lora_dA_sm90_beside(const LoraGemmArgs& dx, int64_t M, int64_t K, int r, int pieces, bool masked,
                             int blocks) {
  const DaBeside none{0, SplitPlan{0, 0, 0, 0}};
  const int sms = num_sms();
  if (blocks == 0 || sms < 8 || !pdl_enabled()) return none;  // without PDL the pass would only wait behind
  if (blocks > 0) {  // forced
    const int b = std::min(blocks, sms - 2);
    const SplitPlan p = stream_sm90_plan(M, K, r, pieces, kDA, false, masked, b);
    return p.row_splits < 1 ? none : DaBeside{b, p};
  }
  // Below 16 Mi elements of x, dA's few microseconds are not worth a smaller GEMM grid.
  if (M * K < (int64_t(1) << 24)) return none;
  // The choice per problem, kept for this thread's next calls (a backward runs the same shapes layer after layer):
  // the model's search costs more host time than the rest of the backward's planning.
  int device = 0;
  cudaGetDevice(&device);
  const int64_t key[] = {dx.M, dx.N, dx.K, dx.Kx, K, r, pieces, masked, sms, device};
  thread_local PlanMemo<sizeof(key) / sizeof(key[0]), DaBeside> memo;
  return memo.get(key, [&] { return beside_by_model(dx, M, K, r, pieces, masked, sms); });
}

size_t lora_dA_sm90_scratch_bytes(int64_t M, int r, int pieces) {
  const DsShape sh = ds_shape(r, pieces, kDA);
  if (ds_up_from_g(kDA, sh.rj)) return 0;
  return (size_t)sh.z * sh.nw * (size_t)(ceil_div(M, DS_BM) * DS_BM) * 2;
}

// The prep launch that stages g's pieces (Gp [Z][NW][Mpad] in x's type) where the pass does not build them itself.
static cudaError_t launch_dA_sm90_prep(DType x_dtype, int pieces, const DsShape& sh, const float* g, void* scratch,
                                       int64_t M, int r, cudaStream_t stream) {
  const int64_t mpad = ceil_div(M, DS_BM) * DS_BM;
  return with_dtype16(x_dtype, [&](auto xt) -> cudaError_t {
    using T = decltype(xt);
    const dim3 prep_grid((unsigned)(mpad / DS_PREP), (unsigned)(sh.z * sh.rj / 8));
    return with_pieces<T>(pieces, [&](auto pc) {  // npad = 0: every prep block writes Gp
      return launch_kernel(dy_sm90_prep_kernel<T, float, decltype(pc)::value>, prep_grid, DS_PREP, 0, stream,
                           static_cast<const float*>(nullptr), g, static_cast<T*>(nullptr), static_cast<T*>(scratch),
                           M, (int64_t)0, r, sh.rj, (int64_t)0, mpad, false);
    });
  });
}

cudaError_t launch_lora_dA_sm90_prep(DType x_dtype, DType a_dtype, const float* g, int64_t M, int r, void* scratch,
                                     cudaStream_t stream) {
  const int pieces = adapter_pieces(x_dtype, a_dtype);
  const DsShape sh = ds_shape(r, pieces, kDA);
  if (ds_up_from_g(kDA, sh.rj)) return cudaSuccess;  // the pass builds g's pieces itself
  if (!g || !scratch || M < 1) return cudaErrorInvalidValue;
  return launch_dA_sm90_prep(x_dtype, pieces, sh, g, scratch, M, r, stream);
}

cudaError_t launch_lora_dA_sm90(const void* x, DType x_dtype, DType a_dtype, const float* g, float* dA_partial,
                                int64_t M, int64_t K, int r, SplitPlan plan, float scaling, float p,
                                const uint8_t* keep8, void* scratch, cudaStream_t stream, bool beside) {
  const int pieces = adapter_pieces(x_dtype, a_dtype);
  const DsShape sh = ds_shape(r, pieces, kDA);
  const bool up_from_g = ds_up_from_g(kDA, sh.rj);
  const bool masked = p > 0.f;
  if ((masked && !keep8) || lora_dA_sm90_unsupported(x, x_dtype, a_dtype, M, K, r, p) != nullptr ||
      plan.row_splits < 1 || !g || !dA_partial || (!up_from_g && !scratch))
    return cudaErrorInvalidValue;
  const int64_t mpad = ceil_div(M, DS_BM) * DS_BM;
  const int64_t tpg = ceil_div(ceil_div(K, DS_BN), plan.col_groups);
  const size_t smem = ds_smem(sh, kDA, tpg, masked);
  if (plan.col_groups > 65535 || plan.row_splits > 0x7fffffff || sh.z > 65535 || smem > smem_per_block())
    return cudaErrorInvalidConfiguration;
  const float scale = masked ? dropout_scale(scaling, p) : scaling;
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)sh.z);
  if (!up_from_g && !beside) {  // beside: its caller ran the prep before the GEMM (launch_lora_dA_sm90_prep)
    const cudaError_t e = launch_dA_sm90_prep(x_dtype, pieces, sh, g, scratch, M, r, stream);
    if (e != cudaSuccess) return e;
  }
  // A programmatic dependent of the launch before it (the prep, or the dx GEMM in the backward): its blocks set up
  // under that launch's tail and wait for it (pdl_wait) before they read g. Beside the dx GEMM (beside), they start
  // while it runs, on the SMs it leaves free, and wait for it at their end.
  return with_dtype16(x_dtype, [&](auto xt) -> cudaError_t {
    using T = decltype(xt);
    T* gp = up_from_g ? nullptr : static_cast<T*>(scratch);
    return with_stream_kernel<kDA, T>(pieces, sh.rj, masked, [&](auto kernel) {
      return launch_kernel_pdl(kernel, grid, DS_THREADS, smem, stream, static_cast<const T*>(x),
                               static_cast<const T*>(nullptr), static_cast<const T*>(gp), static_cast<float*>(nullptr),
                               dA_partial, M, K, r, (int64_t)0, mpad, masked ? keep8 : nullptr, scale, g,
                               beside ? 1 : 0);
    });
  });
}

}  // namespace lora_kernels
