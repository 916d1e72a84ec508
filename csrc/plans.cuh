// Host side shared by the launchers (one per pass file) and the split planners (plans.cu): the tensor-core kernels'
// tile shapes and shared-memory sizes, which the plans are sized for; the device queries; dtype and rank-chunk
// choice; kernel launches with the dynamic shared-memory opt-in. No torch headers.
#pragma once
#include "common.cuh"
#include "pdl.cuh"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>

namespace lora_kernels {
namespace detail {

// shrink (shrink.cu): TS_BM-row blocks, K in TS_KC-column tiles.
constexpr int TS_BM = 128;
constexpr int TS_KC = 64;
constexpr int TS_LD = TS_KC + 8;

inline size_t shrink_tc_smem(int nf, int pieces) {
  return (size_t)(kStages * TS_BM + 2 * 16 * nf * pieces) * TS_LD * 2;
}

// the shrink with dropout (shrink_drop.cu): blocks of SD_WARPS warps on 16 * sd_mtiles rows, K in SD_STEP-column
// steps taken by the warps in turn; n8-tiles of u's columns sd_ntiles(r) (1, 2, 4 or 8: r <= 64).
constexpr int SD_WARPS = 8;
constexpr int SD_THREADS = 32 * SD_WARPS;
constexpr int SD_STEP = 32;
constexpr int SD_MAX_RANK = 64;
__host__ __device__ constexpr int sd_ntiles(int r) { return r <= 8 ? 1 : r <= 16 ? 2 : r <= 32 ? 4 : 8; }
// 16-row tiles per block: two (four Philox chains per lane and step) up to 16 columns, else one (the accumulators
// would spill)
__host__ __device__ constexpr int sd_mtiles(int ntiles) { return ntiles <= 2 ? 2 : 1; }
// Blocks per SM asked of ptxas (registers 64 / 80 / 128 at 4 / 3 / 2): the most without spills at -O3 on sm_90a,
// except fp32 A at 17 <= r <= 32 on 16 rows (8 bytes spilled at 3; not a default cell)
__host__ __device__ constexpr int sd_min_blocks(int ntiles, int mtiles, int pieces) {
  return mtiles == 1 && ntiles <= 2 && pieces == 1 ? 4 : ntiles * mtiles <= 4 ? 3 : 2;
}
// x's loads in that kernel for a ring setting (-1 the default, else 0 plain loads or 2 / 4 cp.async ring steps per
// warp): by default a ring of 2 steps above 16 u columns with 16-bit adapters, else plain loads. Measured (session
// 54, H100, bf16, p = 0.1, M = 8192): at r = 32 the shrink took 46.2-46.6 / 134.7 us against 48.9-49.0 / 155.8 with
// plain loads at K = 4096 / 14336; at r = 16 (two 16-row tiles, 80 registers) and with fp32 adapters' pieces the
// ring was 0.5-8 us slower.
__host__ __device__ constexpr int sd_ring(int setting, int ntiles, int pieces) {
  return setting >= 0 ? setting : ntiles >= 4 && pieces == 1 ? 2 : 0;
}
// the reduce's tree (SD_WARPS / 2 warps' accumulators), then each warp's ring of `ring` steps of 16 bytes per lane
// and row (2 mtiles rows)
inline size_t shrink_drop_smem(int ntiles, int mtiles, int ring = 0) {
  return (size_t)(SD_WARPS / 2) * mtiles * ntiles * 4 * 32 * sizeof(float) +
         (size_t)SD_WARPS * ring * mtiles * 2 * 32 * 16;
}

// expand and dx (expand.cu, dx.cu): the output-writing kernels, TO_BM-row blocks x groups of TO_BN-column chunks.
constexpr int TO_BM = 128;
constexpr int TO_BN = 64;
constexpr int TO_LDO = TO_BN + 8;
[[maybe_unused]] constexpr int kPrefetch = 4;  // (unused where the tensor-core kernels compile to traps)

// Shared memory of the two output-writing kernels: left operand tile + right operand chunk + output staging tile.
inline size_t expand_tc_smem(int rp) {  // us [128][rp+8], bs [2][64][rp+8], os
  return (size_t)TO_BM * (rp + 8) * 2 + (size_t)2 * TO_BN * (rp + 8) * 2 + (size_t)TO_BM * TO_LDO * 2;
}
inline size_t dx_tc_smem(int rp) {  // gs [128][rp+8], as [2][rp][72], os
  return (size_t)TO_BM * (rp + 8) * 2 + (size_t)2 * rp * (TO_BN + 8) * 2 + (size_t)TO_BM * TO_LDO * 2;
}

// dy pass (dy_pass.cu): TD_BM-row tiles x TD_BN-column chunks of dy; the dB accumulators of a column group live in
// shared memory, so the group width is bounded by dy_pass_tc_smem.
constexpr int TD_BM = 128;
constexpr int TD_BN = 64;
constexpr int TD_LDY = TD_BN + 8;

inline size_t dy_pass_tc_smem(int rc, int64_t cols_per_group, int pieces) {
  const int64_t cc = (cols_per_group + TD_BN - 1) / TD_BN * TD_BN;
  return (size_t)kStages * TD_BM * TD_LDY * 2 + (size_t)2 * pieces * (TD_BN + TD_BM) * (rc + 8) * 2 +
         (size_t)cc * (rc + 8) * 4;
}

// dA (dA.cu): TA_BM-row tiles x TA_KC-column strips of x.
constexpr int TA_BM = 64;
constexpr int TA_KC = 128;
constexpr int TA_LDX = TA_KC + 8;

inline size_t dA_tc_smem(int rc, int pieces) {
  return (size_t)kStages * TA_BM * TA_LDX * 2 + (size_t)2 * pieces * TA_BM * (rc + 8) * 2;
}

// f(T{}) with T the element type of d.
template <typename F>
cudaError_t with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// The 16-bit dtypes only (the tensor-core kernels' x dtypes).
template <typename F>
cudaError_t with_dtype16(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// f(T{}, U{}) with T the element type of a (the 16-bit ones only when kOnly16) and U that of b.
template <bool kOnly16, typename F>
cudaError_t with_dtypes(DType a, DType b, F&& f) {
  auto outer = [&](auto at) { return with_dtype(b, [&](auto bt) { return f(at, bt); }); };
  if constexpr (kOnly16)
    return with_dtype16(a, outer);
  else
    return with_dtype(a, outer);
}

// Column fragments per r-chunk of the kernels whose accumulators scale with r: 1, 2 or 4 (r-chunks of 16, 32, 64).
inline int rank_frags(int r) {
  const int rp = round16(r);
  return rp <= 16 ? 1 : rp <= 32 ? 2 : 4;
}

// The dy pass's r-chunk (columns; the kernel's RC): 16 * rank_frags(r), at most 32 with three pieces (its B and u
// buffers would not fit in shared memory otherwise).
inline int dy_pass_rank_chunk(int r, int pieces) { return 16 * std::min(rank_frags(r), pieces > 1 ? 2 : 4); }

// f(std::integral_constant<int, P>{}) for P = pieces, instantiating P = 3 for bf16 T only (adapter_pieces).
template <typename T, typename F>
cudaError_t with_pieces(int pieces, F&& f) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    if (pieces == 3) return f(std::integral_constant<int, 3>{});
  return f(std::integral_constant<int, 1>{});
}

// f(std::integral_constant<int, nf>{}) for nf = rank_frags(r).
template <typename F>
cudaError_t with_rank_frags(int nf, F&& f) {
  switch (nf) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Opt a kernel in to `bytes` of dynamic shared memory (needed above 48 KB). The attribute is set once per
// (kernel, device) and remembered: cudaFuncSetAttribute is a driver call that would otherwise run on every launch.
cudaError_t set_smem_once(const void* kernel, size_t bytes);

// Blocks of `kernel` one SM holds at `threads` threads and `smem` bytes of dynamic shared memory: the occupancy
// calculator after the shared-memory opt-in, cached per (kernel, smem, device) as set_smem_once is; at least 1. The
// split plans size their grids with it.
int resident_blocks(const void* kernel, int threads, size_t smem);

// Resident blocks per SM of the tensor-core kernel that with_kernel(f) hands to f(kernel, smem, dtype tags...)
// (kTcThreads threads; resident_blocks).
template <typename With>
int tc_resident_blocks(With&& with_kernel) {
  int n = 1;
  with_kernel([&](auto kernel, size_t smem, auto...) {
    n = resident_blocks(reinterpret_cast<const void*>(kernel), kTcThreads, smem);
    return cudaSuccess;
  });
  return n;
}

// Launches kernel with `smem` bytes of dynamic shared memory (opted in first where above 48 KB); returns the error
// of the opt-in or of the launch.
template <typename... P, typename... Args>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaError_t e = set_smem_once(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, threads, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

// launch_kernel as a programmatic dependent of the launch before it on the stream (pdl.cuh, unless
// LORA_KERNELS_PDL=0): the kernel may start while that launch runs, so it must call pdl_wait() before its first
// global access.
template <typename... P, typename... Args>
cudaError_t launch_kernel_pdl(void (*kernel)(P...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                              Args&&... args) {
  cudaError_t e = set_smem_once(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3((unsigned)threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = with_pdl(attr, 0);
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The last kSlots results of a pure planning function on this thread, keyed by its arguments and the device values it
// reads (SM count, shared memory): a backward asks for the same few plans layer after layer, each twice (the
// launcher's check, then the launch), and a search that queries the device per candidate costs more host time than a
// lookup. Declare it thread_local at the function that plans.
template <int kKey, typename V, int kSlots = 8>
class PlanMemo {
 public:
  template <typename Make>
  V get(const int64_t (&key)[kKey], Make&& make) {
    for (int i = 0; i < filled_; ++i)
      if (std::equal(key, key + kKey, keys_[i])) return values_[i];
    const V v = make();
    std::copy(key, key + kKey, keys_[next_]);
    values_[next_] = v;
    next_ = (next_ + 1) % kSlots;
    filled_ = std::min(filled_ + 1, kSlots);
    return v;
  }

 private:
  int64_t keys_[kSlots][kKey];
  V values_[kSlots];
  int filled_ = 0, next_ = 0;
};

// The current device's dynamic shared memory per block (its opt-in maximum: 227 KB on sm_90, 163 KB on sm_80, 99 KB
// on sm_86 / sm_89) and per SM, read once per device. The tensor-core kernels that need more than a device has take
// their FFMA kernels there (each launcher checks; the plans are sized by it). Without a device (host tests): an H100's
// / H200's, 227 / 228 KB, unless LORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK is defined at build time.
size_t smem_per_block();
size_t smem_per_sm();

// Streaming multiprocessors of the current device (132, as on an H100 / H200, when there is none). Read once per
// device, as tc_supported's compute capability is.
int num_sms();

// The current device's compute capability as 10 * major + minor (90 on an H100 / H200), read once per device; 0 when
// it cannot be read (no device).
int compute_capability();

// Whether the current device is compute capability 9.0 and `kernel` holds this build's sm_90a code (not a trap
// compiled for another architecture): `has_sm90a` (one per pass, 0 unknown, 1 yes, 2 no) is read on the first 9.0
// device asked about.
inline bool sm90_kernel_ok(const void* kernel, std::atomic<int>& has_sm90a) {
  if (compute_capability() != 90) return false;
  int s = has_sm90a.load(std::memory_order_acquire);
  if (s == 0) {
    cudaFuncAttributes attr{};
    const bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 &&
                    attr.binaryVersion == 90;
    cudaGetLastError();
    s = ok ? 1 : 2;
    has_sm90a.store(s, std::memory_order_release);
  }
  return s == 1;
}

// Counters that live across launches: `bytes` of zeroed device memory per (current device, stream, kind), made on
// first use and kept for the process. The kernels that use them return them to zero before they exit (the last
// block out resets them), so the next launch on the stream, or the next replay of a captured graph, starts from zero;
// eager launches on one stream never overlap, so one buffer per stream and kind is enough. A launch being captured
// into a CUDA graph gets counters of its own instead (graphs captured on one stream may replay concurrently on
// others). Made outside any graph capture's rules (relaxed capture mode for this thread, zeroed on a private
// non-blocking stream), so a first use under capture works too. nullptr when the allocation fails or `bytes` is more
// than the kind's first request.
enum class StreamCounters : int { kSmallM = 0, kFusedReady = 1 };
void* stream_counters(cudaStream_t stream, StreamCounters kind, size_t bytes);

// Whether the current device runs the tensor-core kernels (bf16 mma.sync, cp.async: sm_80+).
bool tc_supported();

// Whether the streaming passes (shrink and dA over x, the dy pass over dy) take their tensor-core kernels: a 16-bit
// streamed operand on sm_80+, with the side operand (A, B) in its dtype or fp32 through the bf16x3 pieces.
inline bool stream_pass_on_tc(DType streamed, DType side) {
  return streamed != DType::kFloat32 && (side != DType::kFloat32 || adapter_pieces(streamed, side) > 1) &&
         tc_supported();
}

// Grid of the output-writing kernels (expand, dx) over an (M, cols) output: row blocks of TO_BM rows x groups of
// chunks_per_group TO_BN-column chunks, about four blocks per SM. ok is false when the groups exceed grid.y's limit.
struct OutputGrid {
  dim3 grid;
  int64_t chunks_per_group;
  bool ok;
};
OutputGrid output_grid(int64_t M, int64_t cols);

// Launch of an output-writing pass (expand, dx) over an (M, cols) output of dtype out, with side the dtype of its
// right operand: the tensor-core kernel (16-bit output, sm_80+, its tc_smem bytes of shared memory within the
// device's) on output_grid, else the FFMA kernel on BM x BN tiles. launch(T{}, TS{}, grid) launches the kernel for
// grid's type: OutputGrid the tensor-core one, dim3 the FFMA one.
template <int BM, int BN, typename F>
cudaError_t launch_output_pass(DType out, DType side, int64_t M, int64_t cols, size_t tc_smem, F&& launch) {
  if (out != DType::kFloat32 && tc_supported() && tc_smem <= smem_per_block()) {
    const OutputGrid og = output_grid(M, cols);
    if (!og.ok) return cudaErrorInvalidConfiguration;
    return with_dtypes<true>(out, side, [&](auto t, auto ts) { return launch(t, ts, og); });
  }
  if (ceil_div(cols, BN) > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)ceil_div(M, BM), (unsigned)ceil_div(cols, BN));
  return with_dtypes<false>(out, side, [&](auto t, auto ts) { return launch(t, ts, grid); });
}

}  // namespace detail
}  // namespace lora_kernels
