// The forward's shrink with dropout, its mask made here: u = scaling/(1-p) · (keep ⊙ x) Aᵀ (M, r) fp32, as K-split
// partials when the plan splits K, from one read of x and no keep bits. Where it runs (lora_shrink_drop_unsupported)
// it replaces the keep-bits pass (dropout_bits.cu) plus the shrink that reads them (shrink.cu, shrink_sm90.cu).
//
// Why one pass: the keep-bits pass is bound by Philox's 32-bit multiplies (about 21 µs per 8192 x 4096 x on an H200)
// and the shrink by its read of x (about 20 µs for those 64 MiB); one after the other they add. Here every lane makes
// the mask of the x it loads, at up to 32 resident warps per SM, so that the multiplies of some warps overlap the
// loads of others. The earlier tries that made the mask inside the ring kernels (dropout_bits.cu lists them) ran
// their Philox chains on 12-24 warps per SM beside the copies and MMAs, and lost. Measured (H100, session 51,
// 8192 x 4096, r = 16, p = 0.1): 37-40 µs against 52 for the keep bits and the shrink after them (bf16 adapters),
// 43-48 against 52-54 (fp32): the loads and the Philox work overlap only in part.
//
// Math   : u[c] (M, r) = scale · (keep ⊙ x)[:, split c] · A[:, split c]ᵀ, scale = scaling / (1 - p), keep the contract's
//          mask (philox.cuh: one Philox call per 8-group of a row).
// Tiling : block = 16·MT rows (MT 16-row tiles) x one K split; its SD_WARPS warps take the split's 32-column steps in
//          turn (warp w: steps w, w + SD_WARPS, ...). In a step, lane (g = lane / 4, t = lane % 4) loads the 8-group
//          x[row, k0 + 8t .. k0 + 8t + 7] of rows g and g + 8 of each 16-row tile (one 16-byte load each), makes its
//          Philox words (one call each) and masks it in registers. The mma.sync m16n8k16 fragments are those
//          registers as they are: the step's 32 columns are summed in a permuted order, the same for x and A, so no
//          shuffle or shared memory is needed. Lane (g, t) holds, of the mma's k-slots {2t, 2t+1, 2t+8, 2t+9}, the
//          columns {8t + 4q, 8t + 4q + 1, 8t + 4q + 2, 8t + 4q + 3} in mma q (q = 0, 1): x's 32-bit words 2q and
//          2q + 1 of its 8-group, and the same words of A's 8-group (row 8n + g, columns k0 + 8t ..) for n8-tile n.
//          x's 16-byte loads: plain loads, or (sd_ring's S > 0) cp.async into a ring of S steps per warp in shared
//          memory, issued S - 1 steps ahead and read back by the lane that loaded them (no barrier): the same words
//          into the same registers, so the same sums.
//          fp32 A on bf16 x: a prep launch splits A into its bf16x3 pieces (scratch, P = 3 matrices of r x K), read
//          like 16-bit A; per step, piece 0 and pieces 1-2 go to two fresh accumulators, added to the running one in
//          fp32 (the tensor-core shrink's order, for fp32 FFMA accuracy). (Split in every step instead, the first
//          version took 60 µs at r = 16 and 250 at r = 64.)
// Reduce : the block's warps add their accumulators in a fixed tree through shared memory; warp 0 writes the split's
//          partial. No atomics: the result is the same bits on every call.
// Bytes  : x once (M·K·2); A (its pieces) from L1/L2 once per block and step; partials col_groups·M·r·4.
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lora_kernels {
using namespace detail;
namespace {

#if LK_TC_ARCH
// The keep mask of one Philox word as a 16-bit pair's multiplier: element pair (2w, 2w + 1) of an 8-group takes word
// w's low and high 16 bits (philox.cuh), each kept iff >= thr; the result is 1.0 (in T) in each kept half, else 0,
// for mul_keep_pair (ptx.cuh): x · keep exactly, as the reference computes it (inf and NaN times 0 give NaN).
// thr_hi = thr << 16 (thr <= 0xFFFF; none: thr is 65536, nothing kept): the high half is >= thr iff the word is
// >= thr_hi, the low half iff the word shifted up by 16 (a byte permute) is. Two compares and two selects, no
// multiply: the multiply pipe is Philox's.
template <typename T>
__device__ __forceinline__ uint32_t keep_pair(uint32_t word, uint32_t thr_hi, bool none) {
  constexpr uint32_t kOne = std::is_same<T, __half>::value ? 0x3C00u : 0x3F80u;
  const uint32_t lo = __byte_perm(word, 0u, 0x1044) >= thr_hi ? kOne : 0u;
  const uint32_t hi = word >= thr_hi ? (kOne << 16) : 0u;
  return none ? 0u : (lo | hi);
}
#endif

// Prep of fp32 lora_A on bf16 x: its bf16x3 pieces, piece i at ap + i·r·K (r, K) row-major; one thread per 8-group.
__global__ void __launch_bounds__(256)
shrink_drop_prep_kernel(const float* __restrict__ A, __nv_bfloat16* __restrict__ ap, int64_t groups) {
#if LK_TC_ARCH
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= groups) return;
  const float4 lo = __ldg(reinterpret_cast<const float4*>(A) + 2 * i);
  const float4 hi = __ldg(reinterpret_cast<const float4*>(A) + 2 * i + 1);
  const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  uint32_t w[3][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    __nv_bfloat16 p0[3], p1[3];
    bf16x3_split(v[2 * j], p0);
    bf16x3_split(v[2 * j + 1], p1);
#pragma unroll
    for (int pc = 0; pc < 3; ++pc)
      w[pc][j] = (uint32_t)__bfloat16_as_ushort(p0[pc]) | ((uint32_t)__bfloat16_as_ushort(p1[pc]) << 16);
  }
#pragma unroll
  for (int pc = 0; pc < 3; ++pc)
    reinterpret_cast<uint4*>(ap + pc * groups * 8)[i] = make_uint4(w[pc][0], w[pc][1], w[pc][2], w[pc][3]);
#else
  __trap();
#endif
}

template <typename T, int P, int NR, int MT, int S>
__global__ void __launch_bounds__(SD_THREADS, sd_min_blocks(NR, MT, P))
shrink_drop_kernel(const T* __restrict__ x, const T* __restrict__ ap, float* __restrict__ u_out, int64_t M, int64_t K,
                   int r, int64_t k_per_split, float scale, uint32_t thr, uint64_t seed, const int64_t* seed_ptr,
                   uint64_t offset) {
#if LK_TC_ARCH
  constexpr int kVals = MT * NR * 4;
  extern __shared__ float sd_smem[];  // [SD_WARPS / 2][kVals][32]: the reduce's tree; then the warps' x rings (S > 0)
  seed = dropout_seed(seed, seed_ptr);
  const uint32_t k0w = (uint32_t)seed, k1w = (uint32_t)(seed >> 32);
  const bool none = thr > 0xFFFFu;  // p within 2^-16 of 1: nothing kept
  const uint32_t thr_hi = thr << 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t m0 = (int64_t)blockIdx.x * (16 * MT);
  const int64_t k_begin = (int64_t)blockIdx.y * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  const int64_t K8 = dropout_groups(K);
  // this lane's rows: their x pointers (null past M) and Philox counters at column 0
  const T* xr[MT][2];
  uint64_t c0[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + 16 * mt + g + 8 * h;
      xr[mt][h] = row < M ? x + row * K : nullptr;
      c0[mt][h] = offset + (uint64_t)row * (uint64_t)K8;
    }
  float acc[MT][NR][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero_acc(acc[mt]);

  // The warp's steps: columns k0 = kw, kw + stride, ... below k_end. With a ring (S > 0) a step's x goes into the
  // warp's ring by cp.async S - 1 steps ahead (slot rs read now, slot ws written, the one the step before read), so
  // that loads stay in flight while the warp makes its Philox words and runs its MMAs; with plain loads a warp has
  // one step's loads in flight, then waits for them.
  const int64_t stride = (int64_t)SD_WARPS * SD_STEP, kw = k_begin + (int64_t)warp * SD_STEP;
  // this lane's 16 bytes of slot 0, tile 0, row g; (slot s, tile mt, row h) is 512 (2 (MT s + mt) + h) bytes on
  [[maybe_unused]] const uint32_t ring =
      smem_addr(sd_smem + (SD_WARPS / 2) * kVals * 32) + (uint32_t)((warp * S * MT * 2 * 32 + lane) * 16);
  // x at k .. k + 7 of this lane's rows into slot s: zeros past M or K; nothing at all past the warp's last step
  // (k0 = k - 8 t at or past k_end: that slot is never read)
  [[maybe_unused]] auto issue = [&](int64_t k, int s) {
    if (k - 8 * t < k_end) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool ld = k < k_end && xr[mt][h] != nullptr;
          cp_async16(ring + (uint32_t)((s * MT + mt) * 2 + h) * 512u, ld ? xr[mt][h] + k : x, ld ? 16 : 0);
        }
    }
    cp_async_commit();  // one group per step, empty ones included, so that the wait counts steps
  };
  int rs = 0, ws = S - 1;
  if constexpr (S > 0) {
#pragma unroll
    for (int s = 0; s < S - 1; ++s) issue(kw + s * stride + 8 * t, s);
  }

  for (int64_t k0 = kw; k0 < k_end; k0 += stride) {
    const int64_t k = k0 + 8 * t;
    const bool in = k < k_end;  // the whole 8-group (K % 8 == 0, splits are whole steps)
    uint32_t xw[MT][2][4];      // [tile][row g / g + 8][word]
    if constexpr (S > 0) cp_async_wait<S - 2>();  // this step's group landed (the S - 2 after it may be in flight)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if constexpr (S > 0) v = lds128(ring + (uint32_t)((rs * MT + mt) * 2 + h) * 512u);
        else if (in && xr[mt][h] != nullptr) v = __ldg(reinterpret_cast<const uint4*>(xr[mt][h] + k));
        xw[mt][h][0] = v.x;
        xw[mt][h][1] = v.y;
        xw[mt][h][2] = v.z;
        xw[mt][h][3] = v.w;
      }
    if constexpr (S > 0) {
      issue(k + (S - 1) * stride, ws);  // the step S - 1 ahead, into the slot the step before this one read
      ws = rs;
      rs = rs + 1 == S ? 0 : rs + 1;
    }
    // the mask while the loads are in flight; rows past M keep their zeros (their words are never used)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint64_t c = c0[mt][h] + (uint64_t)(k >> 3);
        uint32_t w[4];
        philox4x32_10((uint32_t)c, (uint32_t)(c >> 32), 0u, 0u, k0w, k1w, w);
#pragma unroll
        for (int j = 0; j < 4; ++j) xw[mt][h][j] = mul_keep_pair<T>(xw[mt][h][j], keep_pair<T>(w[j], thr_hi, none));
      }
#pragma unroll
    for (int n = 0; n < NR; ++n) {
      // A's 8-group (row 8n + g, columns k ..) of each piece as B-fragment words; zero past r or the split
      uint32_t b[P][4];
      const int arow = 8 * n + g;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (in && arow < r) v = __ldg(reinterpret_cast<const uint4*>(ap + ((int64_t)i * r + arow) * K + k));
        b[i][0] = v.x;
        b[i][1] = v.y;
        b[i][2] = v.z;
        b[i][3] = v.w;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (P == 1) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const uint32_t a[4] = {xw[mt][0][2 * q], xw[mt][1][2 * q], xw[mt][0][2 * q + 1], xw[mt][1][2 * q + 1]};
            mma16816<T>(acc[mt][n], a, b[0][2 * q], b[0][2 * q + 1]);
          }
        } else {
          float hi[1][4], low[1][4];
          zero_acc(hi);
          zero_acc(low);
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const uint32_t a[4] = {xw[mt][0][2 * q], xw[mt][1][2 * q], xw[mt][0][2 * q + 1], xw[mt][1][2 * q + 1]};
            mma16816<T>(hi[0], a, b[0][2 * q], b[0][2 * q + 1]);
#pragma unroll
            for (int i = 1; i < P; ++i) mma16816<T>(low[0], a, b[i][2 * q], b[i][2 * q + 1]);
          }
          add_acc(hi, low);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][n][e] += hi[0][e];
        }
      }
    }
  }

  if constexpr (S > 0) cp_async_wait<0>();  // nothing in flight into the ring once the warp moves on

  // The block's sum, a fixed tree: warp w adds warp w + half's accumulators, half = SD_WARPS / 2, ..., 1.
#pragma unroll
  for (int half = SD_WARPS / 2; half >= 1; half /= 2) {
    if (warp >= half && warp < 2 * half) {
      float* buf = sd_smem + (warp - half) * kVals * 32;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NR; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) buf[((mt * NR + n) * 4 + e) * 32 + lane] = acc[mt][n][e];
    }
    __syncthreads();
    if (warp < half) {
      const float* buf = sd_smem + warp * kVals * 32;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NR; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][n][e] += buf[((mt * NR + n) * 4 + e) * 32 + lane];
    }
    __syncthreads();
  }
  if (warp != 0) return;
  float* u = u_out + (int64_t)blockIdx.y * M * r;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < NR; ++n) {
      const int j = 8 * n + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + 16 * mt + g + 8 * h;
        if (row < M && j < r) st2f(u + row * r + j, r - j, acc[mt][n][2 * h] * scale, acc[mt][n][2 * h + 1] * scale);
      }
    }
#else
  __trap();
#endif
}

// 16-row tiles per block for rank r: sd_mtiles, or LORA_KERNELS_SHRINK_DROP_ROWS=16 / 32 (one / two tiles, for A/B
// timing; read once).
int drop_mtiles(int r) {
  static const int forced = [] {
    const char* v = getenv("LORA_KERNELS_SHRINK_DROP_ROWS");
    return v == nullptr ? 0 : strcmp(v, "16") == 0 ? 1 : strcmp(v, "32") == 0 ? 2 : 0;
  }();
  const int nr = sd_ntiles(r);
  return forced > 0 && nr <= 4 ? forced : sd_mtiles(nr);
}

// a setting as kept: -1 the default, else 0, 2 or 4 (the largest of them not above v)
int ring_setting_of(int v) { return v < 0 ? -1 : v >= 4 ? 4 : v >= 2 ? 2 : 0; }

// x's loads (sd_ring's setting): -1 the default, 0 plain loads (one step in flight per warp), 2 or 4 a cp.async ring
// of that many steps per warp. LORA_KERNELS_SHRINK_DROP_RING=0 / 2 / 4 starts the process there;
// set_shrink_drop_ring changes it.
std::atomic<int>& ring_setting() {
  static std::atomic<int> setting{[] {
    const char* v = getenv("LORA_KERNELS_SHRINK_DROP_RING");
    return v == nullptr || *v == 0 ? -1 : ring_setting_of(std::max(atoi(v), 0));
  }()};
  return setting;
}

// f(kernel, smem, T{}, P) for the kernel of these dtypes, rank, tiles per block (drop_mtiles) and ring (sd_ring):
// (bf16, bf16) and (fp16, fp16) read lora_A as it is (P = 1), (bf16, fp32) its three bf16 pieces made by the prep
// launch.
template <typename F>
cudaError_t with_shrink_drop_kernel(DType x_dtype, DType a_dtype, int r, F&& f) {
  const int nr = sd_ntiles(r), mt = drop_mtiles(r), setting = ring_setting().load(std::memory_order_relaxed);
  auto pick = [&](auto xt, auto pc, auto sc) -> cudaError_t {
    using T = decltype(xt);
    constexpr int P = decltype(pc)::value, S = decltype(sc)::value;
    auto go = [&](auto kernel, int nrc, int mtc) { return f(kernel, shrink_drop_smem(nrc, mtc, S), xt, P); };
    switch (nr * 10 + mt) {
      case 11: return go(shrink_drop_kernel<T, P, 1, 1, S>, 1, 1);
      case 12: return go(shrink_drop_kernel<T, P, 1, 2, S>, 1, 2);
      case 21: return go(shrink_drop_kernel<T, P, 2, 1, S>, 2, 1);
      case 22: return go(shrink_drop_kernel<T, P, 2, 2, S>, 2, 2);
      case 41: return go(shrink_drop_kernel<T, P, 4, 1, S>, 4, 1);
      case 42: return go(shrink_drop_kernel<T, P, 4, 2, S>, 4, 2);
      default: return go(shrink_drop_kernel<T, P, 8, 1, S>, 8, 1);
    }
  };
  auto ring = [&](auto xt, auto pc) -> cudaError_t {
    const int stages = sd_ring(setting, nr, decltype(pc)::value);
    if (stages == 4) return pick(xt, pc, std::integral_constant<int, 4>{});
    if (stages == 2) return pick(xt, pc, std::integral_constant<int, 2>{});
    return pick(xt, pc, std::integral_constant<int, 0>{});
  };
  if (x_dtype == DType::kBFloat16 && a_dtype == DType::kBFloat16)
    return ring(__nv_bfloat16{}, std::integral_constant<int, 1>{});
  if (x_dtype == DType::kFloat16 && a_dtype == DType::kFloat16) return ring(__half{}, std::integral_constant<int, 1>{});
  if (x_dtype == DType::kBFloat16 && a_dtype == DType::kFloat32)
    return ring(__nv_bfloat16{}, std::integral_constant<int, 3>{});
  return cudaErrorInvalidValue;
}

// -1: where measured faster (lora_shrink_drop_unsupported), 0: off, 1: wherever the kernel runs.
// LORA_KERNELS_SHRINK_DROP=0 / 1 starts the process at 0 / 1.
std::atomic<int>& shrink_drop_mode() {
  static std::atomic<int> mode{[] {
    const char* v = getenv("LORA_KERNELS_SHRINK_DROP");
    return v == nullptr ? -1 : strcmp(v, "0") == 0 ? 0 : strcmp(v, "1") == 0 ? 1 : -1;
  }()};
  return mode;
}

}  // namespace

int set_shrink_drop(int mode) { return shrink_drop_mode().exchange(mode > 0 ? 1 : mode == 0 ? 0 : -1); }

int set_shrink_drop_ring(int stages) { return ring_setting().exchange(ring_setting_of(stages)); }

const char* lora_shrink_drop_unsupported(const void* x, DType x_dtype, const void* A, DType a_dtype, int64_t M,
                                         int64_t K, int r, float p) {
  const int mode = shrink_drop_mode().load(std::memory_order_relaxed);
  if (mode == 0) return "off (LORA_KERNELS_SHRINK_DROP=0 or set_shrink_drop(0))";
  if (!(p > 0.f)) return "no dropout";
  if (!tc_supported()) return "no tensor cores for mma.sync (below sm_80)";
  const bool dtypes = (x_dtype == a_dtype && x_dtype != DType::kFloat32) ||
                      (x_dtype == DType::kBFloat16 && a_dtype == DType::kFloat32);
  if (!dtypes) return "x and lora_A are not (bf16, bf16), (fp16, fp16) or (bf16, fp32)";
  if (M < 1 || K < 1 || r < 1) return "empty problem";
  if (r > SD_MAX_RANK) return "r above 64";
  if (K % 8 || reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(A) % 16)
    return "K must be a multiple of 8 and x, lora_A 16-byte aligned";
  if (ceil_div(M, 16) > 0x7fffffff) return "M too large";
  // Measured against the keep bits + the shrink that reads them (forward at p = 0.1, M = 8192, H100, session 51):
  // faster at r = 16 with every adapter dtype (0.91-0.99x) and at r = 32 with 16-bit ones (0.98-0.99x); not at r = 64
  // (0.995-1.02x with bf16 adapters) nor with fp32 adapters above r = 16 (1.01-1.35x: three pieces' loads and MMAs).
  const int cc = compute_capability();  // 0: no device (host tests), taken as an H100 / H200
  if (mode < 0 && cc != 90 && cc != 0)
    return "measured on compute capability 9.0 only: elsewhere the keep bits and the shrink that reads them stay "
           "(set_shrink_drop(1) forces it)";
  if (mode < 0 && r > (adapter_pieces(x_dtype, a_dtype) > 1 ? 16 : 32))
    return "r above 32 (above 16 with fp32 adapters): the keep bits and the shrink that reads them measured faster "
           "(set_shrink_drop(1) forces it)";
  return nullptr;
}

size_t lora_shrink_drop_scratch_bytes(DType x_dtype, DType a_dtype, int r, int64_t K) {
  return adapter_pieces(x_dtype, a_dtype) > 1 ? (size_t)3 * r * K * 2 : 0;
}

// Row blocks of the kernel's 16 * drop_mtiles rows; K split into about two waves of resident blocks or more (the
// kernel is bound by its Philox multiplies on every SM: blocks handed out as SMs free up even out the SMs' shares;
// LORA_KERNELS_SHRINK_DROP_WAVES sets another count, for A/B timing), each warp keeping at least two steps, the
// partials at most 1/16 of x's bytes, each split a whole number of rounds of the block's warps (SD_WARPS steps)
// where K allows.
SplitPlan lora_shrink_drop_plan(int64_t M, int64_t K, int r, int blocks_per_sm) {
  r = std::min(std::max(r, 1), SD_MAX_RANK);
  const int64_t rows = 16 * drop_mtiles(r);
  const int64_t row_blocks = ceil_div(std::max<int64_t>(M, 1), rows);
  const int64_t steps = ceil_div(std::max<int64_t>(K, 1), SD_STEP);
  const int64_t wave = (int64_t)std::max(blocks_per_sm, 1) * num_sms();
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>({65535, steps / (2 * SD_WARPS), K / (32 * r)}));
  // LORA_KERNELS_SHRINK_DROP_WAVES (1 to 4, for A/B timing; read once)
  static const int waves = env_int_in("LORA_KERNELS_SHRINK_DROP_WAVES", 2, 1, 4);
  const int64_t want = std::min(most, std::max<int64_t>(1, ceil_div(waves * wave, row_blocks)));
  int64_t per = ceil_div(steps, want);                           // steps per split
  if (per > SD_WARPS) per = ceil_div(per, SD_WARPS) * SD_WARPS;  // whole rounds
  return SplitPlan{row_blocks, rows, ceil_div(steps, per), per * SD_STEP};
}

int lora_shrink_drop_resident_blocks(DType x_dtype, DType a_dtype, int r) {
  int n = 1;
  with_shrink_drop_kernel(x_dtype, a_dtype, r, [&](auto kernel, size_t smem, auto, int) {
    n = resident_blocks(reinterpret_cast<const void*>(kernel), SD_THREADS, smem);
    return cudaSuccess;
  });
  return n;
}

cudaError_t launch_lora_shrink_drop(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out,
                                    int64_t M, int64_t K, int r, SplitPlan plan, float scaling, float p,
                                    uint64_t seed, const int64_t* seed_ptr, uint64_t offset, void* scratch,
                                    cudaStream_t stream) {
  if (lora_shrink_drop_unsupported(x, x_dtype, A, a_dtype, M, K, r, p) != nullptr || u_out == nullptr)
    return cudaErrorInvalidValue;
  if (plan.col_groups < 1 || plan.col_groups > 65535 || plan.cols_per_group % SD_STEP ||
      plan.rows_per_split != 16 * drop_mtiles(r))
    return cudaErrorInvalidConfiguration;
  const bool pieces = lora_shrink_drop_scratch_bytes(x_dtype, a_dtype, r, K) > 0;
  if (pieces && (scratch == nullptr || reinterpret_cast<uintptr_t>(scratch) % 16)) return cudaErrorInvalidValue;
  if (pieces) {  // lora_A's bf16x3 pieces, read by every block as 16-bit A
    const int64_t groups = (int64_t)r * K / 8;
    const cudaError_t e = launch_kernel(shrink_drop_prep_kernel, dim3((unsigned)ceil_div(groups, 256)), 256, 0, stream,
                                        static_cast<const float*>(A), static_cast<__nv_bfloat16*>(scratch), groups);
    if (e != cudaSuccess) return e;
  }
  const void* ap = pieces ? scratch : A;
  const dim3 grid((unsigned)ceil_div(M, plan.rows_per_split), (unsigned)plan.col_groups);
  const float scale = dropout_scale(scaling, p);
  return with_shrink_drop_kernel(x_dtype, a_dtype, r, [&](auto kernel, size_t smem, auto xt, int) {
    using T = decltype(xt);
    return launch_kernel(kernel, grid, SD_THREADS, smem, stream, static_cast<const T*>(x), static_cast<const T*>(ap),
                         u_out, M, K, r, plan.cols_per_group, scale, dropout_threshold(p), seed, seed_ptr, offset);
  });
}

}  // namespace lora_kernels
