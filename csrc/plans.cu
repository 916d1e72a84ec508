// Split planners of the backward reductions and the shrink (declared in lora_kernels.cuh), and the host helpers the
// launchers share (plans.cuh): device queries, the dynamic shared-memory opt-in, the output-writing kernels' column
// groups. No torch headers.
#include "plans.cuh"

#include <map>
#include <mutex>

namespace lora_kernels {
namespace detail {

cudaError_t set_smem_once(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> opted;  // largest size set so far
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = opted[{kernel, dev}];
  if (have >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e == cudaSuccess) have = bytes;
  return e;
}

int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                               cudaSuccess || sms <= 0) {
    cudaGetLastError();
    sms = 132;
  }
  return sms;
}

bool tc_supported() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return true;  // the launch itself will report the problem
  }
  return major >= 8;
}

OutputGrid output_grid(int64_t M, int64_t cols) {
  const int64_t row_blocks = ceil_div(M, TO_BM), n_chunks = std::max<int64_t>(1, ceil_div(cols, TO_BN));
  const int64_t want = std::min<int64_t>(n_chunks, std::max<int64_t>(1, ceil_div(4 * (int64_t)num_sms(), row_blocks)));
  const int64_t cpg = ceil_div(n_chunks, std::min<int64_t>(want, 65535)), groups = ceil_div(n_chunks, cpg);
  return {dim3((unsigned)row_blocks, (unsigned)groups), cpg, groups <= 65535};
}

}  // namespace detail

using namespace detail;

namespace {
constexpr int64_t kPartialBudgetBytes = 64ll << 20;
constexpr size_t kSmemPerBlockMax = 227 * 1024;  // sm_80 / sm_90 opt-in maximum per block
constexpr size_t kSmemPerSm = 228 * 1024;

// The r-chunks of the backward kernels as the plans count them: r clamped to 1..kMaxRank, chunk width rc (at most
// 64 columns) and number of chunks zc (grid.z).
struct RankChunks {
  int r, rc;
  int64_t zc;
};
RankChunks rank_chunks(int r, int rc = 0) {  // rc: the kernel's chunk width (0: 64 or the rounded rank if smaller)
  r = std::min(std::max(r, 1), kMaxRank);
  const int rp = round16(r);
  if (rc <= 0) rc = std::min(rp, 64);
  return {r, rc, ceil_div(rp, rc)};
}
}  // namespace

// dy pass plan (tensor-core tiling: TD_BM-row tiles, TD_BN-column chunks; the fp32 kernel runs any plan). Each
// candidate column-group width (in chunks, bounded by the shared memory of the dB accumulators) gets the row
// split count that makes about two blocks per SM; the plan with the smallest estimated time wins, counting the
// dy read, the partials written here and read back by launch_reduce_partials, and how well the grid fills the GPU.
SplitPlan lora_dy_pass_plan(int64_t M, int64_t N, int r, int pieces) {
  SplitPlan pl{0, TD_BM, 1, std::max<int64_t>(N, TD_BN)};
  if (M <= 0) return pl;
  const RankChunks rk = rank_chunks(r, dy_pass_rank_chunk(std::min(std::max(r, 1), kMaxRank), pieces));
  const int rc = rk.rc;
  const int64_t zc = rk.zc, sms = num_sms();
  r = rk.r;
  const int64_t tiles_m = ceil_div(M, TD_BM), tiles_n = std::max<int64_t>(1, ceil_div(N, TD_BN));
  const int64_t n1 = std::max<int64_t>(N, 1);
  const double dy_bytes = 2.0 * (double)M * (double)n1 * (double)zc;
  double best = -1.0, best_any = -1.0;  // within the partial budget / regardless of it
  SplitPlan pl_any = pl;
  for (int64_t ct = 1; ct <= tiles_n; ++ct) {
    const int64_t C = ceil_div(tiles_n, ct);
    if (ct > 1 && C == ceil_div(tiles_n, ct - 1)) continue;  // same group count with less shared memory before
    const size_t smem = dy_pass_tc_smem(rc, ct * TD_BN, pieces);
    if (smem > kSmemPerBlockMax) break;
    if (C > 65535) continue;
    // Blocks per SM: shared memory, and registers (the 64-column r-chunk kernel holds one block per SM).
    const int64_t per_sm = std::max<int64_t>(
        1, std::min<int64_t>(rc == 64 ? 1 : 2, (int64_t)(kSmemPerSm / (smem + 1024))));
    const int64_t capacity = per_sm * sms;
    // As many row splits as fit in one wave, within the partial budget.
    int64_t S = std::min(tiles_m, std::max<int64_t>(1, capacity / (C * zc)));
    S = std::min(S, std::max<int64_t>(1, kPartialBudgetBytes / (n1 * r * 4)));
    const int64_t rt = ceil_div(tiles_m, S);
    S = ceil_div(tiles_m, rt);
    const int64_t blocks = S * C * zc;
    const double partial = 8.0 * r * ((double)S * n1 + (C > 1 ? (double)C * M : 0.0));  // written + read back
    const int64_t waves = ceil_div(blocks, capacity);
    const double active = (double)std::min(blocks, capacity);
    // Achieved bandwidth: the grid must cover the SMs; a second block per SM hides the barriers and the u-tile
    // loads, so one block per SM is rated well below two (bench/results/README.md).
    const double fill = std::min(1.0, active / sms) *
                        (per_sm >= 2 ? 0.85 + 0.15 * std::min(1.0, active / (2.0 * sms)) : 0.65) *
                        (waves > 1 ? (double)blocks / (waves * capacity) : 1.0);
    const double est = (dy_bytes + partial) / fill;
    const SplitPlan cand{S, rt * TD_BM, C, ct * TD_BN};
    if (best_any < 0 || est < best_any) {
      best_any = est;
      pl_any = cand;
    }
    const bool in_budget = C == 1 || C * M * r * 4 <= kPartialBudgetBytes;
    if (in_budget && (best < 0 || est < best)) {
      best = est;
      pl = cand;
    }
  }
  return best >= 0 ? pl : pl_any;  // the budget is a preference: a plan always comes back
}

// dA plan: column groups of one TA_KC-column strip (no partial cost); row splits so that about two blocks run per
// SM (partials row_splits * r * K floats, within the budget).
SplitPlan lora_dA_plan(int64_t M, int64_t K, int r) {
  SplitPlan pl{0, TA_BM, 1, std::max<int64_t>(K, TA_KC)};
  if (M <= 0) return pl;
  const RankChunks rk = rank_chunks(r);
  const int64_t tiles_m = ceil_div(M, TA_BM), tiles_k = std::max<int64_t>(1, ceil_div(K, TA_KC));
  const int64_t ct = ceil_div(tiles_k, std::min<int64_t>(tiles_k, 65535));
  const int64_t C = ceil_div(tiles_k, ct);
  int64_t S = std::min(tiles_m, ceil_div(std::max<int64_t>(1, 2 * (int64_t)num_sms() / rk.zc), C));
  S = std::min(S, std::max<int64_t>(1, kPartialBudgetBytes / (std::max<int64_t>(K, 1) * rk.r * 4)));
  const int64_t rt = ceil_div(tiles_m, std::max<int64_t>(S, 1));
  return SplitPlan{ceil_div(tiles_m, rt), rt * TA_BM, C, ct * TA_KC};
}

SplitPlan lora_shrink_plan(int64_t M, int64_t K) {
  // Row blocks of TS_BM (the tensor-core kernel's; the fp32 kernel has its own row blocks and reads only the K
  // split). When they do not make two blocks per SM (small M), K is split into groups of whole TS_KC (= SH_KC)
  // chunks, each writing a partial u.
  SplitPlan pl{ceil_div(std::max<int64_t>(M, 1), TS_BM), TS_BM, 1, std::max<int64_t>(K, TS_KC)};
  const int64_t target = 2 * (int64_t)num_sms();
  const int64_t k_chunks = ceil_div(std::max<int64_t>(K, 1), TS_KC);
  if (pl.row_splits < target && k_chunks > 1) {
    const int64_t want = std::min(k_chunks, ceil_div(target, pl.row_splits));
    pl.cols_per_group = ceil_div(k_chunks, want) * TS_KC;
    pl.col_groups = ceil_div(K, pl.cols_per_group);
  }
  return pl;
}

}  // namespace lora_kernels
