// Host side of the fused sm_90 LoRA forward (fused_fwd_sm90.h): support checks, the workspace, the prep launch that
// lays out the rank-r operands for the GEMM's TMA loads, and the dispatch to the dtype instances. No CUTLASS here.
//
// Prep (one launch, three jobs by block range; none where the lead tiles read lora_A and lora_B as they are:
// lora_fused_fwd_sm90_direct):
//   Ap [tiles][rows][K]  lora_A's rows as the tiles computing u read them (Split): tile t, column block b (u columns
//                   t rc + 8 b + 0..7) piece p at rows 8 (pieces b + p) + 0..7; the bf16x3 pieces of fp32 A on
//                   bf16 x, else A cast to x's dtype; zero rows for columns >= r and past nw.
//   Bx [N][width]   lora_B cast to x's dtype, zero columns r .. width.
//   ready [Mt]      zeroed: the tiles computing u (2 u tiles, or the lead tiles) count themselves in; the output
//                   tiles' loads wait for that count (FusedParams::ready_target).
#include "fused_fwd_sm90.h"

#include "gemm_sm90.h"
#include "gemm_sm90_instances.h"
#include "pdl.cuh"
#include "philox.cuh"
#include "plans.cuh"

#include <atomic>
#include <cstdlib>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kPrepThreads = 256;
constexpr int64_t kAlignBytes = 256;

int64_t align_up(int64_t v) { return (v + kAlignBytes - 1) / kAlignBytes * kAlignBytes; }

struct Carve {
  int64_t ap, bx, su, ready, total;
};
Carve carve(int64_t M, int64_t N, int64_t K, const sm90fused::Split& sp) {
  Carve c;
  c.ap = 0;
  c.bx = c.ap + align_up((int64_t)sp.tiles * sp.rows * K * 2);
  c.su = c.bx + align_up(N * sp.width() * 2);
  c.ready = c.su + align_up(M * sp.width() * 2);
  c.total = c.ready + align_up(ceil_div(M, 128) * 4);
  return c;
}

template <typename T, typename TA, typename TB, int P>
__global__ void __launch_bounds__(kPrepThreads)
fused_prep_kernel(const TA* __restrict__ A, const TB* __restrict__ B, T* __restrict__ ap, T* __restrict__ bx,
                  int* __restrict__ ready, int64_t N, int64_t K, int r, sm90fused::Split sp, int64_t mt,
                  int64_t blocks_ap, int64_t blocks_bx) {
  pdl_launch_dependents();  // the fused kernel launched next may set up under this launch (it waits for it)
  const int64_t blk = blockIdx.x;
  const int width = sp.width();
  if (blk < blocks_ap) {  // one thread per 8 consecutive elements of a row of Ap: (tile, row, k0); K % 8 == 0
    const int64_t t = blk * kPrepThreads + threadIdx.x, kg = K / 8;
    if (t >= (int64_t)sp.tiles * sp.rows * kg) return;
    const int64_t row_all = t / kg, k0 = 8 * (t % kg);
    const int tile = (int)(row_all / sp.rows), row = (int)(row_all % sp.rows);
    const int group = row / 8, b = group / P, p = group % P;
    const int j = tile * sp.rc() + 8 * b + row % 8;  // the u column this row serves
    const bool live = group < sp.blocks * P && j < r;
    alignas(16) T v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float a = live ? to_f<TA>(A[(int64_t)j * K + k0 + e]) : 0.f;
      if constexpr (P > 1) {
        v[e] = __float2bfloat16_rz(bf16x3_piece(a, p));
      } else {
        v[e] = from_f<T>(a);
      }
    }
    *reinterpret_cast<uint4*>(ap + row_all * K + k0) = *reinterpret_cast<const uint4*>(v);
    return;
  }
  if (blk < blocks_ap + blocks_bx) {  // one thread per 8 columns of a row of Bx
    const int64_t t = (blk - blocks_ap) * kPrepThreads + threadIdx.x;
    const int groups = width / 8;
    if (t >= N * groups) return;
    const int64_t n = t / groups;
    const int c0 = (int)(t % groups) * 8;
    alignas(16) T v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = from_f<T>(c0 + e < r ? to_f<TB>(B[n * r + c0 + e]) : 0.f);
    *reinterpret_cast<uint4*>(bx + n * width + c0) = *reinterpret_cast<const uint4*>(v);
    return;
  }
  const int64_t t = (blk - blocks_ap - blocks_bx) * kPrepThreads + threadIdx.x;
  if (t < mt) ready[t] = 0;
}

// Development switches, read once: LORA_KERNELS_FUSED_DEBUG (FusedParams::debug), LORA_KERNELS_FUSED_STRIP
// (FusedParams::strip) and LORA_KERNELS_FUSED_AHEAD (FusedParams::ahead).
struct DevKnobs {
  int debug = 0, strip = 0, ahead = 0;
};
[[maybe_unused]] const DevKnobs& dev_knobs() {
  static const DevKnobs k = [] {
    DevKnobs d;
    if (const char* s = std::getenv("LORA_KERNELS_FUSED_DEBUG")) d.debug = std::atoi(s);
    if (const char* s = std::getenv("LORA_KERNELS_FUSED_STRIP")) d.strip = std::atoi(s);
    if (const char* s = std::getenv("LORA_KERNELS_FUSED_AHEAD")) d.ahead = std::atoi(s);
    return d;
  }();
  return k;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-bit adapters' lead tiles of 8 u columns (Split): where ceil(r / 8) of them fit the output's tile columns and
// every row block's lead tiles together fit one wave (at most one per SM).
bool narrow_lead(int64_t M, int64_t N, int r, int pieces) {
  const int64_t tiles = (r + 7) / 8;
  return pieces == 1 && tiles <= ceil_div(N, 128) && ceil_div(M, 128) * tiles <= num_sms();
}

// The Split a launch takes, for its workspace, the wide-tile rule and the launch alike: split_for, with lead tiles
// of 8 u columns where narrow_lead takes them.
sm90fused::Split launch_split(int64_t M, int64_t N, int r, int pieces, bool lead) {
  return sm90fused::split_for(r, pieces, lead, narrow_lead(M, N, r, pieces));
}

}  // namespace

size_t lora_fused_fwd_sm90_workspace_bytes(int64_t M, int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype,
                                           bool lead) {
  return (size_t)carve(M, N, K, launch_split(M, N, r, adapter_pieces(x_dtype, a_dtype), lead)).total;
}

const char* lora_fused_fwd_sm90_unsupported(const FusedFwdArgs& a, int device) {
  (void)device;
  if (!lora_gemm_sm90_built()) return "the sm_90 kernels were not compiled into this build (no CUTLASS headers)";
  if (compute_capability() != 90) return "the device is not compute capability 9.0";
  if (a.x_dtype == DType::kFloat32) return "x is not float16 or bfloat16";
  if (a.a_dtype != a.x_dtype && !(a.a_dtype == DType::kFloat32 && a.x_dtype == DType::kBFloat16))
    return "lora_A must have x's dtype, or be fp32 on bf16 x";
  if (a.M < 1 || a.N < 1 || a.K < 1) return "empty problem";
  if (a.M > INT32_MAX / 2 || a.N > INT32_MAX / 2 || a.K > INT32_MAX / 2) return "a dimension exceeds 2^30";
  if (a.r < 1 || a.r > 64) return "r above 64";
  if (!(a.p >= 0.f && a.p < 1.f)) return "dropout p outside [0, 1)";
  if (a.lead && a.p > 0.f && adapter_pieces(a.x_dtype, a.a_dtype) != 3 && !lora_fused_fwd_sm90_split(a))
    return "lead tiles with dropout: fp32 adapters on bf16 x only (16-bit adapters: no registers for x's masked copy)";
  if (a.K % 8 || a.N % 8) return "K and N must be multiples of 8 (16-byte rows for TMA)";
  if (a.lead && (a.N + 127) / 128 < sm90fused::split_for(a.r, adapter_pieces(a.x_dtype, a.a_dtype), true).tiles)
    return "lead tiles: fewer output tile columns than lead tiles (ceil(r / 8), 16-bit adapters ceil(r / 32))";
  if (!aligned16(a.x) || !aligned16(a.w) || (a.bias && !aligned16(a.bias)) || (a.y && !aligned16(a.y)) ||
      (a.col_scale && !aligned16(a.col_scale)))
    return "x, weight, bias, col_scale and y must be 16-byte aligned";
  return nullptr;
}

namespace {
// The wide variant's tile rule for a lead-tile launch, whatever its dropout (lora_fused_fwd_sm90_wide).
bool wide_tiles(const FusedFwdArgs& a) {
  if (!a.lead) return false;
  LoraGemmArgs g;
  g.M = a.M;
  g.N = a.N;
  g.K = a.K;
  const sm90fused::Split sp = launch_split(a.M, a.N, a.r, adapter_pieces(a.x_dtype, a.a_dtype), true);
  g.Kx = sp.width();
  // the device's SMs, as the GEMM's own launch counts them (its 128 x 256 tile below N = 2048 needs 1.5 waves)
  return lora_gemm_sm90_pick(g, num_sms()).config == GemmConfig::kCoop128x256_c12 && (a.N + 255) / 256 >= sp.tiles;
}
}  // namespace

bool lora_fused_fwd_sm90_wide(const FusedFwdArgs& a) { return a.p == 0.f && wide_tiles(a); }

namespace {
int env_split_mode() {
  const char* s = std::getenv("LORA_KERNELS_FUSED_SPLIT");
  return s == nullptr || *s == 0 ? -1 : std::atoi(s) > 0 ? 1 : 0;
}
std::atomic<int> split_mode{env_split_mode()};
}  // namespace

int set_fused_split(int mode) { return split_mode.exchange(mode > 0 ? 1 : mode == 0 ? 0 : -1); }

bool lora_fused_fwd_sm90_split(const FusedFwdArgs& a) {
  const int mode = split_mode.load(std::memory_order_relaxed);
  // with dropout only where asked for (mode 1): it measured 1.39x slower than the shrink + GEMM path (session 60)
  if (mode == 0 || (a.p > 0.f && (mode < 0 || a.x_dtype != DType::kBFloat16)) || !lora_fused_fwd_sm90_direct(a) ||
      !wide_tiles(a))
    return false;
  return mode > 0 || a.N <= 4 * 256;
}

bool lora_fused_fwd_sm90_direct(const FusedFwdArgs& a) {
  // With one piece lead tile t's u columns t rc .. (Split) are lora_A's rows t rc .., which its slot's box (kApRows
  // rows, the first rc multiplied) loads from there, and Bx's columns are lora_B's; TMA fills the rows and columns
  // past r with zeros, as the prep does.
  return !(dev_knobs().debug & 256) && a.lead && a.a_dtype == a.x_dtype && a.b_dtype == a.x_dtype &&
         adapter_pieces(a.x_dtype, a.a_dtype) == 1 && a.r % 8 == 0 && aligned16(a.lora_A) && aligned16(a.lora_B) &&
         ceil_div(a.M, 128) <= sm90fused::kFusedReadyCap;
}

cudaError_t launch_lora_fused_fwd_sm90(const FusedFwdArgs& a, cudaStream_t stream) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (lora_fused_fwd_sm90_unsupported(a, device) != nullptr || !a.workspace || !a.y || !a.u ||
      !aligned16(a.workspace) || (a.p > 0.f && a.keep == nullptr))
    return cudaErrorNotSupported;
#if LORA_KERNELS_HAVE_SM90_GEMM
  const int pieces = adapter_pieces(a.x_dtype, a.a_dtype);
  // the kernel's parameters that every variant sets alike
  sm90fused::FusedParams f;
  f.M = (int)a.M;
  f.N = (int)a.N;
  f.r = a.r;
  f.pieces = pieces;
  f.k_tiles_main = (int)ceil_div(a.K, 64);
  f.kb_ext = (a.r + 15) / 16;
  f.scale = a.p > 0.f ? dropout_scale(a.scale, a.p) : a.scale;
  f.keep = a.p > 0.f ? a.keep : nullptr;
  f.groups = dropout_groups(a.K);
  f.u = a.u;
  f.debug = dev_knobs().debug;
  f.strip = dev_knobs().strip;
  if (lora_fused_fwd_sm90_split(a)) {  // one launch: no prep, no workspace, no counters
    f.blocks = 1;
    f.lead = 0;
    f.ap_pitch = 0;
    f.ready_target = 0;
    f.width = (a.r + 15) / 16 * 16;
    f.su = const_cast<void*>(a.x);  // never read: the expand's A comes from registers (its descriptor needs an address)
    f.ready = nullptr;
    f.exit = nullptr;
    f.ahead = 0;
    sm90fused::Operands o{a.x, a.w, a.bias, a.lora_A, a.lora_B, a.y, a.col_scale, true};
    const bool bf16 = a.x_dtype == DType::kBFloat16;
    if (f.keep != nullptr)  // dropout (bf16 x only): x masked in registers for u's products
      return sm90fused::run_fused_split_drop_bf16(o, f, a.K, num_sms(), stream);
    return bf16 ? sm90fused::run_fused_split_bf16(o, f, a.K, num_sms(), stream)
                : sm90fused::run_fused_split_fp16(o, f, a.K, num_sms(), stream);
  }
  const sm90fused::Split sp = launch_split(a.M, a.N, a.r, pieces, a.lead);
  const Carve c = carve(a.M, a.N, a.K, sp);
  char* ws = static_cast<char*>(a.workspace);
  const int64_t mt = ceil_div(a.M, 128);
  const int64_t blocks_ap = ceil_div((int64_t)sp.tiles * sp.rows * (a.K / 8), kPrepThreads);  // 8 per thread
  const int64_t blocks_bx = ceil_div(a.N * (sp.width() / 8), kPrepThreads);
  const int64_t blocks_ready = ceil_div(mt, kPrepThreads);
  if (blocks_ap + blocks_bx + blocks_ready > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // Without the prep: the stream's ready counters, then its exit count (kFusedReadyCap + 1 uint32).
  unsigned* const counters =
      lora_fused_fwd_sm90_direct(a) ? static_cast<unsigned*>(stream_counters(
                                          stream, StreamCounters::kFusedReady,
                                          (sm90fused::kFusedReadyCap + 1) * sizeof(unsigned)))
                                    : nullptr;
  if (counters == nullptr) e = with_dtype16(a.x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return with_dtype(a.a_dtype, [&](auto at) {
      using TA = decltype(at);
      return with_dtype(a.b_dtype, [&](auto bt) {
        using TB = decltype(bt);
        return with_pieces<T>(pieces, [&](auto pc) {
          fused_prep_kernel<T, TA, TB, decltype(pc)::value>
              <<<(unsigned)(blocks_ap + blocks_bx + blocks_ready), kPrepThreads, 0, stream>>>(
                  static_cast<const TA*>(a.lora_A), static_cast<const TB*>(a.lora_B),
                  reinterpret_cast<T*>(ws + c.ap), reinterpret_cast<T*>(ws + c.bx),
                  reinterpret_cast<int*>(ws + c.ready), a.N, a.K, a.r, sp, mt, blocks_ap,
                  blocks_bx);
          return cudaGetLastError();
        });
      });
    });
  });
  if (e != cudaSuccess) return e;
  f.blocks = sp.blocks;
  const bool wide = lora_fused_fwd_sm90_wide(a);
  f.lead = a.lead ? sp.tiles : 0;
  f.ready_target = wide ? 2 * sp.tiles : sp.tiles;  // the wide variant's warpgroups count themselves each
  f.width = sp.width();
  f.su = ws + c.su;
  f.ready = counters != nullptr ? reinterpret_cast<int*>(counters) : reinterpret_cast<int*>(ws + c.ready);
  f.exit = counters != nullptr ? counters + sm90fused::kFusedReadyCap : nullptr;
  f.ahead = dev_knobs().ahead;
  sm90fused::Operands o{a.x, a.w, a.bias, ws + c.ap, ws + c.bx, a.y, a.col_scale};
  if (counters != nullptr) {
    o.ap = a.lora_A;
    o.bx = a.lora_B;
    o.direct = true;
  }
  if (a.lead && f.keep != nullptr) return sm90fused::run_fused_lead_drop_bf16(o, f, a.K, num_sms(), stream);
  if (wide)
    return a.x_dtype == DType::kBFloat16 ? sm90fused::run_fused_lead_wide_bf16(o, f, a.K, num_sms(), stream)
                                         : sm90fused::run_fused_lead_wide_fp16(o, f, a.K, num_sms(), stream);
  if (a.lead)
    return a.x_dtype == DType::kBFloat16 ? sm90fused::run_fused_lead_bf16(o, f, a.K, num_sms(), stream)
                                         : sm90fused::run_fused_lead_fp16(o, f, a.K, num_sms(), stream);
  return a.x_dtype == DType::kBFloat16 ? sm90fused::run_fused_bf16(o, f, a.K, num_sms(), stream)
                                       : sm90fused::run_fused_fp16(o, f, a.K, num_sms(), stream);
#else
  return cudaErrorNotSupported;
#endif
}

}  // namespace lora_kernels
