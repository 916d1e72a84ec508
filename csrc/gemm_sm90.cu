// Host side of the sm_90 LoRA GEMM (gemm_sm90.h): support checks, the per-problem config choice, dispatch to
// the (dtype, layout) instances. No CUTLASS here, so this file compiles quickly and everywhere.
#include "gemm_sm90_instances.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace lora_kernels {

bool lora_gemm_sm90_built() { return LORA_KERNELS_HAVE_SM90_GEMM != 0; }

namespace {
struct DeviceInfo {
  int major = 0, minor = 0, sms = 0;
};
constexpr int kCachedDevices = 64;

// Device properties, read once per device (every launch asks). A device past the cache, or one whose properties
// cannot be read, gets zeros: not compute capability 9.0, so the callers keep their other path.
const DeviceInfo& device_info(int device) {
  static DeviceInfo info[kCachedDevices];
  static std::atomic<bool> read[kCachedDevices];
  static std::mutex mu;
  static const DeviceInfo none;
  if (device < 0 || device >= kCachedDevices) return none;
  if (!read[device].load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(mu);
    if (!read[device].load(std::memory_order_relaxed)) {
      DeviceInfo d;
      if (cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
          cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
          cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
        cudaGetLastError();  // not left for the next launch's error check to find
        d = DeviceInfo{};
      }
      info[device] = d;
      read[device].store(true, std::memory_order_release);
    }
  }
  return info[device];
}
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
}  // namespace

const char* lora_gemm_sm90_unsupported(const LoraGemmArgs& a, int device) {
  if (!lora_gemm_sm90_built()) return "the sm_90 GEMM was not compiled into this build (no CUTLASS headers)";
  const DeviceInfo& d = device_info(device);
  if (d.major != 9 || d.minor != 0) return "the device is not compute capability 9.0";
  if (a.M < 1 || a.N < 1 || a.K < 1) return "empty problem";
  if (a.M > INT32_MAX || a.N > INT32_MAX || a.K + a.Kx + 64 > INT32_MAX) return "a dimension exceeds 2^31";
  if (a.K % 8 || a.N % 8) return "K and N must be multiples of 8 (16-byte rows for TMA)";
  if (a.Kx < 0 || a.Kx % 64) return "Kx must be a multiple of 64";
  if (a.Kx_used < 0 || a.Kx_used > a.Kx) return "Kx_used must be in [0, Kx]";
  if (!aligned16(a.a) || !aligned16(a.b) || !aligned16(a.d) || (a.bias && !aligned16(a.bias)))
    return "pointers must be 16-byte aligned";
  if (a.Kx > 0 && (!a.ax || !a.bx || !aligned16(a.ax) || !aligned16(a.bx))) return "extension pointers missing";
  if (a.keep) {
    if (a.Kx == 0 || a.layout_b != GemmLayoutB::kKN) return "keep bits need the dx layout and an extension";
    if (a.N % 128) return "keep bits need N a multiple of 128 (16-byte rows of bits for TMA)";
    if (!aligned16(a.keep)) return "keep bits must be 16-byte aligned";
  }
  if (a.da_x) {
    if (a.layout_b != GemmLayoutB::kKN || a.Kx != 64) return "dA in the GEMM needs the dx layout and r <= 64";
    if (a.da_r < 1 || a.da_r > 64 || !a.da_partial) return "dA in the GEMM needs 1 <= da_r <= 64 and its partials";
    if (!aligned16(a.da_x) || !aligned16(a.da_partial)) return "dA's pointers must be 16-byte aligned";
  }
  return nullptr;
}

// LORA_KERNELS_SM90_GEMM_CONFIG: 1 or 4 forces that GemmConfig (the two compiled into the extension) on every auto
// call, for A/B timing; unset or other values: the per-problem choice below. Read once.
static GemmConfig env_config() {
  static const GemmConfig c = [] {
    const char* v = std::getenv("LORA_KERNELS_SM90_GEMM_CONFIG");
    if (v != nullptr && std::strcmp(v, "1") == 0) return GemmConfig::kPing128x128_c12;
    if (v != nullptr && std::strcmp(v, "4") == 0) return GemmConfig::kCoop128x256_c12;
    return GemmConfig::kAuto;
  }();
  return c;
}

namespace {
// Waves of an M x N grid of bm x bn tiles in clusters of cluster_n along N at swizzle s, `wave` tiles in flight: the
// swizzle CUTLASS takes (get_log_swizzle_size: 4 needs 3 CTAs along the shorter mode, 2 needs 2), then the grid it
// runs, each mode rounded up to swizzle x cluster.
int64_t tile_waves(int64_t M, int64_t N, int bm, int bn, int cluster_n, int s, int wave) {
  auto up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  const int64_t tm = (M + bm - 1) / bm, tn = up((N + bn - 1) / bn, cluster_n);  // CTAs per mode, whole clusters
  const int64_t shorter = tm < tn ? tm : tn;
  const int e = s >= 4 && shorter >= 3 ? 4 : s >= 2 && shorter >= 2 ? 2 : 1;
  return (up(tm, e) * up(tn, (int64_t)e * cluster_n) + wave - 1) / wave;
}
}  // namespace

int lora_gemm_sm90_swizzle(int64_t M, int64_t N, int bm, int bn, int cluster_n, int wave) {
  int best = 4;
  for (int s : {2, 1})
    if (tile_waves(M, N, bm, bn, cluster_n, s, wave) < tile_waves(M, N, bm, bn, cluster_n, best, wave)) best = s;
  return best;
}

// LORA_KERNELS_SM90_GEMM_SWIZZLE: 1, 2 or 4 forces that swizzle on every call that does not set its own, for A/B
// timing; unset or other values: lora_gemm_sm90_swizzle's choice. Read once.
static int env_swizzle() {
  static const int s = [] {
    const char* v = std::getenv("LORA_KERNELS_SM90_GEMM_SWIZZLE");
    if (v == nullptr) return 0;
    return std::strcmp(v, "1") == 0 ? 1 : std::strcmp(v, "2") == 0 ? 2 : std::strcmp(v, "4") == 0 ? 4 : 0;
  }();
  return s;
}

GemmChoice lora_gemm_sm90_pick(const LoraGemmArgs& a, int sms) {
  // Clusters of 1x2 tiles along N, tile order along M with a swizzle (below). The tile, measured against cuBLAS in the
  // targets grid's burst regime (bench/dev/gemm_sm90_probe.py --regime burst, session 24) over the Llama-3-8B layer
  // shapes at M = 2048 and 8192, forward and dx layouts:
  //  - 128x256 cooperative where K >= 2048 and N >= 2048: enough K-tiles to hide its unoverlapped epilogue and
  //    enough 256-wide tile columns (0.970-0.983x cuBLAS's time against 0.904-0.996x for the ping-pong tile; at
  //    K = 14336 0.98 against 0.91);
  //  - 128x128 ping-pong elsewhere: at N = 1024 the wide tile leaves too few tiles (0.54x at M = 2048) and at
  //    K = 1024 its epilogue shows (0.97 against 1.05);
  //  - except the forward layout (W as (N, K)) at K >= 2048 with at least 1.5 waves of wide tiles: 128x256 there too.
  //    At 8192 x 4096 -> 1024 (256 wide tiles on 132 SMs, r = 16 / 64) the K-extended GEMM with the shrink took
  //    125.5 / 134.0 us against 133.6 / 136.8 on ping-pong tiles, the fused forward 102.1 / 107.0 against 103.5 /
  //    110.8 (H100, session 52, bench/dev/fused_gap.py: kernels queued behind a GPU sleep); the targets grid, which
  //    times bursts of calls, moved within its noise there.
  // The swizzle: 4 (session 24's probe), except where it pads the tile grid by more waves than 2 or 1 would.
  // CUTLASS's persistent scheduler rounds the grid up to a multiple of swizzle x cluster along each mode
  // (PersistentTileSchedulerSm90Params::initialize) and runs the padding tiles in full: their loads come back
  // zero-filled and their stores are masked off, but their MMAs take a tile's time. At N = 11008 on 128 x 256 tiles
  // the 43 tile columns ran as 48 with swizzle 4: 24 waves of 132 tiles where 44 columns (swizzle 2) take 22.
  // Measured (session 34, forward at M = 8192, GPU time / cuBLAS): 4096->11008 1.274 -> 1.120, 13824->5120 1.350 ->
  // 1.055, and M = 8200 at 4096->4096 1.279 -> 1.138.
  const int wave = sms > 0 ? sms : 132;  // tiles in flight at once (no count given: an H100 / H200)
  const int64_t wide_tiles = (a.M + 127) / 128 * ((a.N + 255) / 256);
  const bool wide = a.K + a.Kx >= 2048 &&
                    (a.N >= 2048 || (a.layout_b == GemmLayoutB::kNK && 2 * wide_tiles >= 3 * (int64_t)wave));
  GemmChoice c{wide ? GemmConfig::kCoop128x256_c12 : GemmConfig::kPing128x128_c12, 4, 1};
  if (env_config() != GemmConfig::kAuto) c.config = env_config();
  if (a.config != GemmConfig::kAuto) c.config = a.config;
  if (c.config == GemmConfig::kCoop128x256_c12 || c.config == GemmConfig::kPing128x128_c12)
    c.swizzle = lora_gemm_sm90_swizzle(a.M, a.N, 128, c.config == GemmConfig::kCoop128x256_c12 ? 256 : 128, 2, wave);
  if (env_swizzle() > 0) c.swizzle = env_swizzle();
  if (a.swizzle > 0) c.swizzle = a.swizzle;
  if (a.raster > 0) c.raster = a.raster;
  return c;
}

int64_t lora_gemm_sm90_waves(const LoraGemmArgs& a, int sms, int* tile_n) {
  const int wave = sms / 2 * 2;  // whole clusters of 2
  if (wave < 2) return 0;
  const GemmChoice c = lora_gemm_sm90_pick(a, wave);
  if (c.config != GemmConfig::kCoop128x256_c12 && c.config != GemmConfig::kPing128x128_c12) return 0;
  const int bn = c.config == GemmConfig::kCoop128x256_c12 ? 256 : 128;
  if (tile_n) *tile_n = bn;
  return tile_waves(a.M, a.N, 128, bn, 2, c.swizzle, wave);
}

cudaError_t launch_lora_gemm_sm90(const LoraGemmArgs& a, cudaStream_t stream) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (lora_gemm_sm90_unsupported(a, device) != nullptr) return cudaErrorNotSupported;
#if LORA_KERNELS_HAVE_SM90_GEMM
  const int sms = a.sms > 0 && a.sms < device_info(device).sms ? a.sms : device_info(device).sms;
  const GemmChoice c = lora_gemm_sm90_pick(a, sms);
  // [dtype: bf16, fp16][layout: nk, kn][config: 4, 1]
  static constexpr sm90::RunFn kRun[2][2][2] = {
      {{sm90::run_bf16_nk_c4, sm90::run_bf16_nk_c1}, {sm90::run_bf16_kn_c4, sm90::run_bf16_kn_c1}},
      {{sm90::run_fp16_nk_c4, sm90::run_fp16_nk_c1}, {sm90::run_fp16_kn_c4, sm90::run_fp16_kn_c1}}};
  if (c.config != GemmConfig::kPing128x128_c12 && c.config != GemmConfig::kCoop128x256_c12)
    return cudaErrorNotSupported;  // a config the extension does not compile
  const int cfg = c.config == GemmConfig::kCoop128x256_c12 ? 0 : 1;
  const sm90::RunFn run = kRun[a.dtype == GemmDType::kBFloat16 ? 0 : 1][a.layout_b == GemmLayoutB::kNK ? 0 : 1][cfg];
  return run(a, c.swizzle, c.raster, sms, stream);
#else
  return cudaErrorNotSupported;
#endif
}

const char* lora_dA_gemm_sm90_unsupported(const DaGemmArgs& a, int device) {
  if (!lora_gemm_sm90_built()) return "the sm_90 GEMM was not compiled into this build (no CUTLASS headers)";
  const DeviceInfo& d = device_info(device);
  if (d.major != 9 || d.minor != 0) return "the device is not compute capability 9.0";
  if (a.M < 1 || a.K < 1) return "empty problem";
  if (a.pieces != 1 && (a.pieces != 3 || a.dtype != GemmDType::kBFloat16)) return "pieces: 1, or 3 on bf16";
  if (a.r < 8 || a.r % 8 || a.r * a.pieces > 192)
    return "r must be a multiple of 8 (V's rows 16-byte aligned), r x pieces at most 192";
  if (a.K % 8 || a.ldv % 8 || a.ldv < a.r * a.pieces) return "K and ldv must be multiples of 8, ldv >= r x pieces";
  if (a.splits < 1 || a.M % a.splits) return "splits must divide M";
  if (a.K > INT32_MAX || a.M / a.splits > INT32_MAX) return "a dimension exceeds 2^31";
  if (!aligned16(a.x) || !aligned16(a.v) || !aligned16(a.partial)) return "pointers must be 16-byte aligned";
  return nullptr;
}

int64_t lora_dA_gemm_sm90_splits(int64_t M, int64_t K, int64_t n, int sms) {
  // 128-column tiles in whole clusters of 2, times V's 64-column tiles: one wave of them wants `wave` ranges
  const int64_t tiles = ((K + 127) / 128 + 1) / 2 * 2 * std::max<int64_t>(1, (n + 63) / 64);
  const int64_t wave = sms > 0 ? std::max<int64_t>(1, sms / tiles) : 1;
  // Ranges of at most kDaGemmRange tokens: a range's K-tile sums are added one after another into one fp32
  // accumulator, whose rounding grows with the square root of their count. Over one 65600-token range that error was
  // 3.0x the same-precision baseline's (4.7e-3 against 1.6e-3, fp32 adapters, H100, session 63); 16384-token ranges
  // have a quarter of its K-tiles. At the benchmarks' 8192 tokens the wave alone sets the ranges.
  constexpr int64_t kDaGemmRange = 16384;
  const int64_t shortest = (M + kDaGemmRange - 1) / kDaGemmRange;
  if (shortest > wave) {
    // the first count from `shortest` up that divides M (at most twice as many ranges)
    for (int64_t s = shortest; s <= 2 * shortest; ++s)
      if (M % s == 0 && M / s >= 64) return s;
    return 0;
  }
  // the wave's count, or the first below it that divides M (down to half the wave, not below `shortest`)
  for (int64_t s = wave; 2 * s >= wave && s >= shortest && s >= 1; --s)
    if (M % s == 0 && M / s >= 64) return s;
  return 0;
}

cudaError_t launch_lora_dA_gemm_sm90(const DaGemmArgs& a, cudaStream_t stream) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (lora_dA_gemm_sm90_unsupported(a, device) != nullptr) return cudaErrorNotSupported;
#if LORA_KERNELS_HAVE_SM90_GEMM
  const int sms = device_info(device).sms;
  return a.dtype == GemmDType::kBFloat16 ? sm90::run_dA_bf16(a, sms, stream) : sm90::run_dA_fp16(a, sms, stream);
#else
  return cudaErrorNotSupported;
#endif
}

}  // namespace lora_kernels
