// dy pass on Hopper (sm_90a, wgmma): g = dy B (M, r) fp32 and the row-split partials of dB = dy^T u (N, r) from
// one read of dy. The same outputs, partial layout and reduce as launch_lora_dy_pass (dy_pass.cu), whose mma.sync
// kernel runs wherever this one does not (lora_dy_pass_sm90_unsupported says why).
//
// Math   : per r-chunk z (columns j0 = z*RJ .. j0+RJ-1 of r), with the side operands as P pieces stacked into NW = P*RJ
//          columns (P = 3: the bf16x3 split of fp32 B and u on bf16 dy, each piece exact in bf16; P = 1: cast to
//          dy's type), each 128 x 64 tile of dy gives, in fresh accumulators,
//            G (128 x NW) = dy_tile . Bp_chunk^T        K = the tile's 64 columns
//            D (64 x NW)  = dy_tile^T . Up_tile^T        K = the tile's 128 rows
//          and the pieces of each are added in fp32, hi + (mid + lo), into the running g of the row tile (registers)
//          and the dB of the column group (shared memory). Tensor-core chains stay one tile long, as in dy_pass.cu
//          (their fp32 accumulation truncates).
// Prep   : one launch writes Bp [Z][NW][Npad] and Up [Z][NW][Mpad] in dy's type (the pieces, K contiguous, zero
//          padded to Npad = N and Mpad = M rounded up to 128), so that every operand tile is a copy of
//          16-byte chunks (scratch: lora_dy_pass_sm90_scratch_bytes).
// Tiling : block (s, c, z) = row split s x column group c x r-chunk z, spans balanced in whole tiles; tiles of 128
//          rows x 64 columns, rows outer, columns inner. 384 threads, warp-specialised: warpgroup 0 loads (cp.async
//          into a 4-stage ring of {dy tile, Bp chunk}, plus a row tile's Up tile, two 64-row K blocks, into a double
//          buffer), warpgroup 1 computes G (both 64-row halves), warpgroup 2 computes D. mbarriers pass the stages:
//          full (every loader thread's copies landed), empty (lane 0 of each consumer warp, once its products are
//          done), up_free (the dB warps, at a row tile's end). No block-wide barrier inside the loop. Tiles use the
//          128-byte swizzle (16-byte chunk c of row i at chunk c ^ (i % 8)): the dy tile is the K-major A of G and,
//          as it stands, the MN-major A of D.
// Bytes  : dy once per r-chunk; Bp and Up from L2 (a chunk per tile, a u tile per row tile); the partials as
//          dy_pass.cu (row_splits * N * r + col_groups * M * r floats, written once, summed by the reduce).
#include "stream_sm90.cuh"


namespace lora_kernels {
using namespace detail;
namespace {

std::atomic<int> ds_state{0};
bool ds_device_ok() {
  return sm90_kernel_ok(reinterpret_cast<const void*>(&stream_sm90_kernel<kDy, __nv_bfloat16, 1, 16>), ds_state);
}

bool ds_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_SM90_DY");
  return on;
}

}  // namespace

SplitPlan lora_dy_pass_sm90_plan(int64_t M, int64_t N, int r, int pieces) {
  return stream_sm90_plan(M, N, r, pieces, kDy);
}

const char* lora_dy_pass_sm90_unsupported(const void* dy, DType dy_dtype, DType b_dtype, int64_t M, int64_t N,
                                          int r) {
  if (!ds_enabled()) return "LORA_KERNELS_SM90_DY=0";
  if (dy_dtype == DType::kFloat32 || !stream_pass_on_tc(dy_dtype, b_dtype))
    return "dy and the adapters take the FFMA kernel (fp32 dy, or fp32 adapters on fp16)";
  if (!ds_device_ok()) return "not a compute capability 9.0 device with this build's sm_90a code";
  if (M < 1 || r < 1 || r > kMaxRank) return "empty problem or rank out of range";
  if (N % 8 || reinterpret_cast<uintptr_t>(dy) % 16) return "N must be a multiple of 8 and dy 16-byte aligned";
  if (ceil_div(N, DS_BN) < ds_min_col_tiles(r, adapter_pieces(dy_dtype, b_dtype), kDy))
    return "N below the pass's column tiles (stages - 1 tiles of 64)";
  if (ceil_div(M, DS_BM) > 0x7fffffff) return "M too large";
  if (lora_dy_pass_sm90_plan(M, N, r, adapter_pieces(dy_dtype, b_dtype)).row_splits < 1)
    return "no column grouping fits in shared memory";
  if (M <= small_m_backward_rows()) return "M <= kSmallMBackwardRows (64): the mma.sync kernel is faster";
  return nullptr;
}

size_t lora_dy_pass_sm90_scratch_bytes(int64_t M, int64_t N, int r, int pieces) {
  const DsShape sh = ds_shape(r, pieces, kDy);
  return (size_t)sh.z * sh.nw * (size_t)(ceil_div(N, DS_PREP) * DS_PREP + ceil_div(M, DS_BM) * DS_BM) * 2;
}

cudaError_t launch_lora_dy_pass_sm90(const void* dy, DType dy_dtype, const void* B, DType b_dtype, const float* u,
                                     float* g_out, float* dB_partial, int64_t M, int64_t N, int r, SplitPlan plan,
                                     void* scratch, cudaStream_t stream) {
  if (lora_dy_pass_sm90_unsupported(dy, dy_dtype, b_dtype, M, N, r) != nullptr || plan.row_splits < 1 || !scratch)
    return cudaErrorInvalidValue;
  const int pieces = adapter_pieces(dy_dtype, b_dtype);
  const DsShape sh = ds_shape(r, pieces, kDy);
  const int64_t npad = ceil_div(N, DS_PREP) * DS_PREP, mpad = ceil_div(M, DS_BM) * DS_BM;
  const int64_t tpg = ceil_div(ceil_div(N, DS_BN), plan.col_groups);
  if (plan.col_groups > 65535 || plan.row_splits > 0x7fffffff || sh.z > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = ds_smem(sh, kDy, tpg);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)sh.z);
  return with_dtypes<true>(dy_dtype, b_dtype, [&](auto dt, auto bt) -> cudaError_t {
    using T = decltype(dt);
    using TB = decltype(bt);
    T* bp = static_cast<T*>(scratch);
    T* up = bp + (int64_t)sh.z * sh.nw * npad;
    const dim3 prep_grid((unsigned)((npad + (dB_partial ? mpad : 0)) / DS_PREP), (unsigned)(sh.z * sh.rj / 8));
    cudaError_t e = with_pieces<T>(pieces, [&](auto pc) {
      return launch_kernel(dy_sm90_prep_kernel<T, TB, decltype(pc)::value>, prep_grid, DS_PREP, 0, stream,
                           static_cast<const TB*>(B), u, bp, up, M, N, r, sh.rj, npad, mpad, false);
    });
    if (e != cudaSuccess) return e;
    return with_stream_kernel<kDy, T>(pieces, sh.rj, false, [&](auto kernel) {
      return launch_kernel_pdl(kernel, grid, DS_THREADS, smem, stream, static_cast<const T*>(dy),
                           static_cast<const T*>(bp), static_cast<const T*>(up), g_out, dB_partial, M, N, r, npad,
                           mpad, static_cast<const uint8_t*>(nullptr), 1.0f, static_cast<const float*>(nullptr), 0);
    });
  });
}

}  // namespace lora_kernels
