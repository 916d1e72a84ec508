// Split planners of the backward reductions and the shrink (declared in lora_kernels.cuh), and the host helpers the
// launchers share (plans.cuh): device queries, the dynamic shared-memory opt-in, the output-writing kernels' column
// groups. No torch headers.
#include "plans.cuh"

#include <atomic>
#include <map>
#include <mutex>
#include <tuple>

namespace lora_kernels {
namespace detail {

namespace {
constexpr int kCachedDevices = 64;

// The current device, or -1 (its error cleared) when there is none.
int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return dev;
}

// A positive value of the current device, read(dev, &v) once per device and kept in `cache` (the launchers and plans
// ask on every call: driver calls each time otherwise); `fallback` when it cannot be read (no device; not kept).
template <typename Read>
int device_value(std::atomic<int> (&cache)[kCachedDevices], int fallback, Read&& read) {
  const int dev = current_device();
  if (dev < 0) return fallback;
  if (dev < kCachedDevices) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int v = 0;
  if (!read(dev, v) || v <= 0) {
    cudaGetLastError();
    return fallback;
  }
  if (dev < kCachedDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// A positive attribute of the current device (device_value).
int device_attribute(std::atomic<int> (&cache)[kCachedDevices], cudaDeviceAttr attr, int fallback) {
  return device_value(cache, fallback, [&](int dev, int& v) { return cudaDeviceGetAttribute(&v, attr, dev) == cudaSuccess; });
}
}  // namespace

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

int resident_blocks(const void* kernel, int threads, size_t smem) {
  const int dev = current_device();
  if (dev < 0) return 1;
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int>, int> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, smem, dev);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int n = 0;
  if (set_smem_once(kernel, smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();
    n = 1;
  }
  n = std::max(n, 1);
  known[key] = n;
  return n;
}

namespace {
// Zeroed device memory made outside any graph capture's rules (relaxed capture mode for this thread, zeroed on a
// private non-blocking stream), so that a first use under capture works too; nullptr when that fails.
void* zeroed_device_buffer(size_t bytes) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  void* p = nullptr;
  cudaStream_t side = nullptr;
  const bool ok = cudaMalloc(&p, bytes) == cudaSuccess &&
                  cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking) == cudaSuccess &&
                  cudaMemsetAsync(p, 0, bytes, side) == cudaSuccess && cudaStreamSynchronize(side) == cudaSuccess;
  if (side != nullptr) cudaStreamDestroy(side);
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (!ok) {
    cudaGetLastError();
    if (p != nullptr) cudaFree(p);
    return nullptr;
  }
  return p;
}

// Counters of one launch captured into a CUDA graph: a slot of its own (128-byte aligned, from 64 KiB slabs kept for
// the process), which the graph's replays reuse and its kernel returns to zero. Not the capture stream's buffer:
// graphs captured on one stream (torch.cuda.graph's shared default capture stream) and replayed concurrently on
// different streams would share it.
void* capture_counters(int dev, size_t bytes) {
  constexpr size_t kSlab = 64 * 1024, kAlign = 128;
  static std::mutex mu;
  static std::map<int, std::pair<char*, size_t>> slabs;  // device -> (slab, bytes used)
  std::lock_guard<std::mutex> lock(mu);
  const size_t need = (bytes + kAlign - 1) / kAlign * kAlign;
  if (need > kSlab) return nullptr;
  auto& s = slabs[dev];
  if (s.first == nullptr || s.second + need > kSlab) {
    void* p = zeroed_device_buffer(kSlab);
    if (p == nullptr) return nullptr;
    s = {static_cast<char*>(p), 0};
  }
  void* slot = s.first + s.second;
  s.second += need;
  return slot;
}
}  // namespace

void* stream_counters(cudaStream_t stream, StreamCounters kind, size_t bytes) {
  const int dev = current_device();
  if (dev < 0) return nullptr;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  if (capture != cudaStreamCaptureStatusNone) return capture_counters(dev, bytes);
  struct Buffer {
    void* ptr;
    size_t bytes;
  };
  static std::mutex mu;
  static std::map<std::tuple<int, cudaStream_t, int>, Buffer> bufs;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, stream, static_cast<int>(kind));
  const auto it = bufs.find(key);
  if (it != bufs.end()) return bytes <= it->second.bytes ? it->second.ptr : nullptr;
  void* p = zeroed_device_buffer(bytes);
  if (p == nullptr) return nullptr;
  bufs.emplace(key, Buffer{p, bytes});
  return p;
}

int num_sms() {
  static std::atomic<int> cache[kCachedDevices];
  return device_attribute(cache, cudaDevAttrMultiProcessorCount, 132);
}

int compute_capability() {
  static std::atomic<int> cache[kCachedDevices];
  return device_value(cache, 0, [](int dev, int& v) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
      return false;
    v = 10 * major + minor;
    return true;
  });
}

#ifndef LORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK
#define LORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK (227 * 1024)
#endif

size_t smem_per_block() {
  static std::atomic<int> cache[kCachedDevices];
  return (size_t)device_attribute(cache, cudaDevAttrMaxSharedMemoryPerBlockOptin, LORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK);
}

size_t smem_per_sm() {
  static std::atomic<int> cache[kCachedDevices];
  return (size_t)device_attribute(cache, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                  LORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK + 1024);
}

bool tc_supported() {
  // Without a device: true, and the launch itself will report the problem.
  const int cc = compute_capability();
  return cc == 0 || cc >= 80;
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

// Time estimate of a split of a bandwidth pass, in units of one block's tile: the blocks run in waves of `wave`
// (blocks_per_sm per SM, as the occupancy calculator says), each wave as long as a block's tiles; the partials
// written and read back count as tiles of tile_bytes spread over a wave. A grid under one wave leaves SMs idle or
// short of latency hiding, which is what the estimate steers away from.
struct SplitCost {
  int64_t wave;
  double tile_bytes;
  double estimate(int64_t blocks, double tiles_per_block, double partial_bytes) const {
    return (double)ceil_div(blocks, wave) * tiles_per_block + partial_bytes / (tile_bytes * (double)wave);
  }
};
}  // namespace

// dy pass plan (tensor-core tiling: TD_BM-row tiles, TD_BN-column chunks; the fp32 kernel runs any plan). Each
// candidate column-group width (in chunks, bounded by the shared memory of the dB accumulators) gets the row
// split count that makes about two blocks per SM; the plan with the smallest estimated time wins, counting the
// dy read, the partials written here and read back by launch_reduce_partials, and how well the grid fills the GPU.
// Where not even one chunk per group fits the device's shared memory (fp32 adapters, or r > 32, on an sm_86 / sm_89
// GPU's 99 KB), the launcher runs the FFMA kernel: its plan is one column group (no g partials) and about two blocks
// per SM of row splits, within the partial budget.
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
  const size_t smem_max = smem_per_block(), smem_sm = smem_per_sm();
  for (int64_t ct = 1; ct <= tiles_n; ++ct) {
    const int64_t C = ceil_div(tiles_n, ct);
    if (ct > 1 && C == ceil_div(tiles_n, ct - 1)) continue;  // same group count with less shared memory before
    const size_t smem = dy_pass_tc_smem(rc, ct * TD_BN, pieces);
    if (smem > smem_max) break;
    if (C > 65535) continue;
    // Blocks per SM: shared memory, and registers (the 64-column r-chunk kernel holds one block per SM).
    const int64_t per_sm = std::max<int64_t>(
        1, std::min<int64_t>(rc == 64 ? 1 : 2, (int64_t)(smem_sm / (smem + 1024))));
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
  if (best_any < 0) {  // no tensor-core plan fits: the FFMA kernel's (one column group)
    int64_t S = std::min(tiles_m, std::max<int64_t>(1, 2 * sms));
    S = std::min(S, std::max<int64_t>(1, kPartialBudgetBytes / (n1 * r * 4)));
    const int64_t rt = ceil_div(tiles_m, S);
    return SplitPlan{ceil_div(tiles_m, rt), rt * TD_BM, 1, std::max<int64_t>(N, TD_BN)};
  }
  return best >= 0 ? pl : pl_any;  // the budget is a preference: a plan always comes back
}

// dA plan: column groups of one TA_KC-column strip (no partial cost); the row split count that finishes soonest
// when blocks_per_sm blocks run on each SM (waves x row tiles per block, plus the partials written here and read back
// by launch_reduce_partials; partials row_splits * r * K floats, within the budget).
SplitPlan lora_dA_plan(int64_t M, int64_t K, int r, int blocks_per_sm) {
  SplitPlan pl{0, TA_BM, 1, std::max<int64_t>(K, TA_KC)};
  if (M <= 0) return pl;
  const RankChunks rk = rank_chunks(r);
  const int64_t tiles_m = ceil_div(M, TA_BM), tiles_k = std::max<int64_t>(1, ceil_div(K, TA_KC));
  const int64_t ct = ceil_div(tiles_k, std::min<int64_t>(tiles_k, 65535));
  const int64_t C = ceil_div(tiles_k, ct);
  const int64_t s_max =
      std::min(tiles_m, std::max<int64_t>(1, kPartialBudgetBytes / (std::max<int64_t>(K, 1) * rk.r * 4)));
  const SplitCost cost{std::max(blocks_per_sm, 1) * (int64_t)num_sms(), (double)TA_BM * TA_KC * 2};
  // Past four waves a finer split only trims the rounding of the row tiles: the search stops there.
  const int64_t s_last = std::min(s_max, 4 * cost.wave / (C * rk.zc) + 1);
  double best = -1.0;
  for (int64_t s = 1; s <= s_last; ++s) {
    const int64_t rt = ceil_div(tiles_m, s), S = ceil_div(tiles_m, rt);
    if (S != s) continue;  // the same split as a smaller s, or none
    const double est = cost.estimate(S * C * rk.zc, (double)rt * ct, 8.0 * S * rk.r * (double)K);
    if (best < 0 || est < best) {
      best = est;
      pl = SplitPlan{S, rt * TA_BM, C, ct * TA_KC};
    }
  }
  return pl;
}

SplitPlan lora_shrink_plan(int64_t M, int64_t K, int r, int blocks_per_sm) {
  // Row blocks of TS_BM (the tensor-core kernel's; the fp32 kernel has its own row blocks and reads only the K
  // split). K is split into groups of whole TS_KC (= SH_KC) chunks, each writing a partial u, when that finishes
  // sooner: the count with the smallest estimate (waves x chunks per block, plus the partials).
  const int64_t rows = ceil_div(std::max<int64_t>(M, 1), TS_BM);
  SplitPlan pl{rows, TS_BM, 1, std::max<int64_t>(K, TS_KC)};
  const RankChunks rk = rank_chunks(r, 16 * rank_frags(std::min(std::max(r, 1), kMaxRank)));
  const int64_t k_chunks = ceil_div(std::max<int64_t>(K, 1), TS_KC);
  const SplitCost cost{std::max(blocks_per_sm, 1) * (int64_t)num_sms(), (double)TS_BM * TS_KC * 2};
  double best = -1.0;
  const int64_t last = std::min<int64_t>({k_chunks, 65535, 4 * cost.wave / (rows * rk.zc) + 1});
  for (int64_t want = 1; want <= last; ++want) {
    const int64_t cpg = ceil_div(k_chunks, want), groups = ceil_div(k_chunks, cpg);
    if (groups != want) continue;  // the same split as a smaller count
    const double partial = groups > 1 ? 8.0 * groups * (double)std::max<int64_t>(M, 1) * rk.r : 0.0;
    const double est = cost.estimate(rows * groups * rk.zc, (double)cpg, partial);
    if (best < 0 || est < best) {
      best = est;
      pl.cols_per_group = cpg * TS_KC;
      pl.col_groups = groups;
    }
  }
  if (pl.col_groups == 1) pl.cols_per_group = std::max<int64_t>(K, TS_KC);
  return pl;
}

}  // namespace lora_kernels
