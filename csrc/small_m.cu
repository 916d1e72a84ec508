// Small-M forward in one launch: y = x W^T + bias + u B^T with u = scaling * x A^T, for M <= 64 rows and no
// dropout (decoding, small batches, evaluation), where the usual forward (shrink with a K split, reduce or pack,
// GEMM) is three or four launches of kernels that each take a few microseconds of launch and tail time for a few
// microseconds of work.
// Tensor-core kernel (16-bit x, sm_80+), FFMA kernel (fp32 x), launch_lora_small_m_forward and its policy
// lora_small_m_unsupported.
//
// Math   : every block owns SMM_BN (32) columns of y and all M rows, and recomputes the tiny u its epilogue needs
//          (M x r: x is small, so x and A are re-read from L2 by every block; W, the big operand, is streamed once):
//            acc_y = x W[cols]^T (fp32 accumulation)          acc_u = x A^T (fp32 accumulation)
//            y[:, cols] = round(acc_y + T(scaling * acc_u) T(B[cols])^T + bias[cols])      (one rounding of y)
//          The LoRA term follows the expand pass's precision (u and B cast to x's dtype T,
//          fp32 accumulation); unlike the unfused path, y is rounded once. The saved u (fp32, for backward) follows
//          the shrink's policy: with 16-bit adapters the tensor-core acc_u itself (block 0 writes it); with fp32
//          adapters an fp32 FFMA dot product per element, each element computed by exactly one block (blocks own
//          contiguous slices of u's elements; extra "u-only" blocks join when the y tiles are fewer than needed),
//          while the epilogue's acc_u uses A split into two T terms (A = hi + lo, about 16 bits: plenty for a value
//          rounded to T; an infinite kept x times an A whose lo part is 0 gives NaN there, where fp32 gives inf).
// Tiling : 256 threads, 8 warps. K in SMM_KC (128)-column chunks through a 3- or 6-slot cp.async ring (6 where it
//          fits the GPU's shared memory: more of W in flight) holding the x chunk
//          (MP = M rounded up to 16, 32 or 64 rows), the W chunk (32 rows), the A chunk (RP = r rounded up to 16
//          rows; fp32 adapters: register-prefetched one chunk ahead and split into hi / lo). Warp w
//          takes k16-step w of every chunk (an in-block K split: each x / W / A fragment is read from shared
//          memory once) for the whole MP x 32 y tile and MP x RP u tile; the 8 warps' partial accumulators are
//          summed in warp order through shared memory at the end (deterministic), then the epilogue (one thread per
//          column, 8 row phases) adds u B^T and the bias and writes y once.
// Bytes  : W once (N*K*2), y once; x (M*K*2) and A (r*K) from L2 once per block.
// Smem   : S slots x (MP + 32 + RP (x2 with fp32 adapters)) x 136 x 2 B: 104 KB (6 slots; M, r <= 16) to 131 KB
//          (3 slots; M = 64, r = 32, fp32 adapters).
// Limits : M <= 64; r <= 64 with (MP/16) * (RP/16) <= 8 (the accumulators: M <= 64 with r <= 32, M <= 32 with
//          r <= 64); no dropout. With dropout every block would mask its own copy of x, which takes ring slots from
//          W's stream: on the H200 that version took 1.3-6.1x the unfused forward's wall time at M = 1, 16 and 64,
//          so the unfused forward runs there. Elsewhere too (lora_small_m_unsupported says why).
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

#include <climits>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kSmallMMaxM = 64;
constexpr int kSmallMMaxR = 64;

constexpr int SMM_BN = 32;              // y columns per block
constexpr int SMM_KC = 128;             // K chunk: one k16 step per warp
constexpr int SMM_LD = SMM_KC + 8;      // shared-memory row pitch (elements): 16-byte rows, conflict-free ldmatrix
// Ring slots (S): S - 1 chunks in flight while one is multiplied. The kernel is bound by W's stream, which needs
// bytes in flight; 6 slots where they fit in the GPU's shared memory per block (small M and r), else 3.
constexpr int SMM_STAGES_DEEP = 6, SMM_STAGES = 3;
constexpr int SMM_EW = 4;               // fp32 adapters: u elements per warp (FFMA dot products)
constexpr int SMM_EPB = 8 * SMM_EW;     // ... per block
static_assert(SMM_KC == 16 * (kTcThreads / 32), "one k16 step per warp and chunk");
static_assert(SMM_KC == 4 * 32, "one float4 of A per lane and chunk (the FFMA dot products)");

// Row fragments (16 rows each) of the M rows: 1, 2 or 4 (M in 33..48 is padded to 64).
inline int small_m_frags(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// Bytes of one ring slot of the tensor-core kernel (see its layout).
inline size_t small_m_slot_bytes(int mf, int nr, bool af32) {
  return (size_t)(16 * mf + SMM_BN + 16 * nr * (af32 ? 2 : 1)) * SMM_LD * 2;
}

// The current device's opt-in shared memory per block (227 KB on sm_90, 163 KB on an A100; 0 when unknown).
inline size_t smem_optin_bytes() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return (size_t)bytes;
}

#if LK_TC_ARCH
// An fp32 4-group split into two T 4-groups, hi = T(v) and lo = T(v - hi): hi + lo carries about twice T's bits.
template <typename T>
__device__ __forceinline__ void split_t4(const Vec4<float>& v, uint2& hi, uint2& lo) {
  union { uint2 u; T e[4]; } h, l;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    h.e[q] = from_f<T>(v.e[q]);
    l.e[q] = from_f<T>(v.e[q] - to_f<T>(h.e[q]));
  }
  hi = h.u;
  lo = l.u;
}
#endif

// lora_small_m (tensor cores): see the top of the file. T: x's dtype; kAF32: fp32 adapters (A); MF, NR: row and
// rank fragments (MP = 16 MF, RP = 16 NR); S: ring slots. B is fp32 (b_f32) or T. n_tiles: blocks with a y tile
// (the first ones); the rest only compute their slice of u (fp32 adapters). elems_per_block: u elements per block
// (fp32 adapters).
template <typename T, bool kAF32, int MF, int NR, int S>
__global__ void __launch_bounds__(kTcThreads, 1)
lora_small_m_tc_kernel(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ bias,
                       const void* __restrict__ A_, const void* __restrict__ B_, int b_f32, T* __restrict__ y,
                       float* __restrict__ u_out, int64_t M, int64_t N, int64_t K, int r, float scale,
                       int64_t n_tiles, int elems_per_block) {
#if LK_TC_ARCH
  constexpr int MP = 16 * MF, RP = 16 * NR, LD = SMM_LD;
  using TA = typename std::conditional<kAF32, float, T>::type;
  const TA* A = static_cast<const TA*>(A_);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const LaneOffsets lo;
  const bool has_tile = (int64_t)blockIdx.x < n_tiles;
  const int64_t n0 = (int64_t)blockIdx.x * SMM_BN;
  const int64_t n_chunks = (K + SMM_KC - 1) / SMM_KC;
  extern __shared__ __align__(128) unsigned char lk_smem[];
  T* const ring = reinterpret_cast<T*>(lk_smem);
  // One ring slot: x [MP][LD] | W [32][LD] | A (hi) [RP][LD] | A lo [RP][LD] (fp32 adapters).
  constexpr int kW = MP * LD, kA = kW + SMM_BN * LD, kAL = kA + RP * LD;
  constexpr int slot_elems = kAL + (kAF32 ? RP * LD : 0);
  auto slot = [&](int64_t t) { return ring + (int)(t % S) * slot_elems; };

  // cp.async of chunk t: x (MF 8-groups per thread), and for a tile W (2) and 16-bit A (NR). Rows past M, N or r
  // and columns past K read as zeros.
  auto issue = [&](int64_t t) {
    T* s = slot(t);
    const int64_t k0 = t * SMM_KC;
#pragma unroll
    for (int i = 0; i < MF; ++i) {
      const int g = tid + i * kTcThreads, row = g / (SMM_KC / 8), col = g % (SMM_KC / 8) * 8;
      copy8_async<T>(s + row * LD + col, x + row * K + k0 + col, row < M ? n_valid(K - k0 - col, 8) : 0);
    }
    if (!has_tile) return;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int g = tid + i * kTcThreads, row = g / (SMM_KC / 8), col = g % (SMM_KC / 8) * 8;
      copy8_async<T>(s + kW + row * LD + col, W + (n0 + row) * K + k0 + col,
                     n0 + row < N ? n_valid(K - k0 - col, 8) : 0);
    }
    if constexpr (!kAF32) {
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        const int g = tid + i * kTcThreads, row = g / (SMM_KC / 8), col = g % (SMM_KC / 8) * 8;
        copy8_async<T>(s + kA + row * LD + col, A + (int64_t)row * K + k0 + col,
                       row < r ? n_valid(K - k0 - col, 8) : 0);
      }
    }
  };
  // fp32 adapters, tile blocks: the A chunk through registers (fetched a chunk ahead), split into hi / lo T parts.
  Vec4<float> a_regs[kAF32 ? 2 * NR : 1];
  auto fetch_a = [&](int64_t t) {
    if constexpr (kAF32) {
      const int64_t k0 = t * SMM_KC;
#pragma unroll
      for (int i = 0; i < 2 * NR; ++i) {
        const int g = tid + i * kTcThreads, row = g / (SMM_KC / 4), col = g % (SMM_KC / 4) * 4;
        a_regs[i] = ld4<float>(reinterpret_cast<const float*>(A) + (int64_t)row * K + k0 + col,
                               row < r ? n_valid(K - k0 - col, 4) : 0);
      }
    }
  };
  auto stash_a = [&](int64_t t) {
    if constexpr (kAF32) {
      T* s = slot(t);
#pragma unroll
      for (int i = 0; i < 2 * NR; ++i) {
        const int g = tid + i * kTcThreads, row = g / (SMM_KC / 4), col = g % (SMM_KC / 4) * 4;
        uint2 hi, lw;
        split_t4<T>(a_regs[i], hi, lw);
        *reinterpret_cast<uint2*>(s + kA + row * LD + col) = hi;
        *reinterpret_cast<uint2*>(s + kAL + row * LD + col) = lw;
      }
    }
  };

  // fp32 adapters: this block's u elements (j-major order e = j * M + m, so a warp's elements mostly share an A
  // row), SMM_EW per warp: element s of warp w is e_begin + SMM_EW * w + s; lane l sums columns 4l..4l+3 of each
  // chunk (A read as float4, one chunk ahead), and the lanes are summed at the end.
  const int64_t MR = M * (int64_t)r;
  const int64_t e_begin = kAF32 ? (int64_t)blockIdx.x * elems_per_block : 0;
  const int64_t e_end = kAF32 ? min64(MR, e_begin + elems_per_block) : 0;
  const bool has_elems = kAF32 && e_begin < e_end;
  float ue[SMM_EW];
  Vec4<float> ua[SMM_EW];
  int ue_m[SMM_EW], ue_j[SMM_EW];
#pragma unroll
  for (int s = 0; s < SMM_EW; ++s) {
    const int64_t e = e_begin + SMM_EW * warp + s;
    ue[s] = 0.f;
    ue_m[s] = e < e_end ? (int)(e % M) : -1;
    ue_j[s] = e < e_end ? (int)(e / M) : 0;
  }
  auto fetch_ue = [&](int64_t t) {
    if constexpr (kAF32) {
      const int64_t k = t * SMM_KC + 4 * lane;
#pragma unroll
      for (int s = 0; s < SMM_EW; ++s)
        if (ue_m[s] >= 0)
          ua[s] = ld4<float>(reinterpret_cast<const float*>(A) + (int64_t)ue_j[s] * K + k, n_valid(K - k, 4));
    }
  };

  float acc[MF][SMM_BN / 8][4];  // y tile: row fragment x 8-column fragment
  float uacc[MF][2 * NR][4];     // u tile (tensor cores)
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
    zero_acc(acc[mf]);
    zero_acc(uacc[mf]);
  }

  // Pipeline (one barrier per chunk): chunks 0 .. S-2 in flight; A chunk 0 staged, 1 in registers.
#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    if (t < n_chunks) issue(t);
    cp_async_commit();
  }
  if (has_tile && n_chunks > 0) {
    fetch_a(0);
    stash_a(0);
    if (n_chunks > 1) fetch_a(1);
  }
  if (has_elems && n_chunks > 0) fetch_ue(0);
  for (int64_t t = 0; t < n_chunks; ++t) {
    cp_async_wait<S - 2>();
    __syncthreads();  // chunk t (and A chunk t) complete; chunk t-1's slot free
    if (t + S - 1 < n_chunks) issue(t + S - 1);
    cp_async_commit();
    const T* s = slot(t);
    const int kk = 16 * warp;
    if (has_tile) {
      uint32_t xa[MF][4];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) ldsm4(xa[mf], s + (16 * mf + lo.r1) * LD + kk + lo.c1);
#pragma unroll
      for (int f = 0; f < SMM_BN / 16; ++f) {
        uint32_t wb[4];
        ldsm4(wb, s + kW + (16 * f + lo.r2) * LD + kk + lo.c2);
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) mma16816x2<T>(acc[mf][2 * f], acc[mf][2 * f + 1], xa[mf], wb);
      }
#pragma unroll
      for (int f = 0; f < NR; ++f) {
        uint32_t ab[4];
        ldsm4(ab, s + kA + (16 * f + lo.r2) * LD + kk + lo.c2);
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) mma16816x2<T>(uacc[mf][2 * f], uacc[mf][2 * f + 1], xa[mf], ab);
        if constexpr (kAF32) {
          ldsm4(ab, s + kAL + (16 * f + lo.r2) * LD + kk + lo.c2);
#pragma unroll
          for (int mf = 0; mf < MF; ++mf) mma16816x2<T>(uacc[mf][2 * f], uacc[mf][2 * f + 1], xa[mf], ab);
        }
      }
    }
    if (has_elems) {  // fp32 dot products of this block's u elements over the chunk
      const T* xr = s + 4 * lane;
#pragma unroll
      for (int s_ = 0; s_ < SMM_EW; ++s_) {
        if (ue_m[s_] < 0) continue;
        union { uint2 u; T e[4]; } xv;
        xv.u = *reinterpret_cast<const uint2*>(xr + ue_m[s_] * LD);
        float v = ue[s_];
#pragma unroll
        for (int q = 0; q < 4; ++q) v = fmaf(to_f<T>(xv.e[q]), ua[s_].e[q], v);
        ue[s_] = v;
      }
      if (t + 1 < n_chunks) fetch_ue(t + 1);
    }
    if (has_tile && t + 1 < n_chunks) {  // A chunk t+1 into its slot (last read in chunk t+1-S), t+2 to registers
      stash_a(t + 1);
      if (t + 2 < n_chunks) fetch_a(t + 2);
    }
  }
  cp_async_wait<0>();

  if (has_elems) {  // the lanes' partial sums, in a fixed order; lane 0 writes the element
#pragma unroll
    for (int s_ = 0; s_ < SMM_EW; ++s_) {
      float v = ue[s_];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && ue_m[s_] >= 0) u_out[(int64_t)ue_m[s_] * r + ue_j[s_]] = v * scale;
    }
  }
  __syncthreads();  // the ring is free for the reduction buffers
  if (!has_tile) return;

  // The warps' partial tiles summed in warp order (warp 0 writes, warps 1..7 add): acc_y [MP][33], acc_u [MP][RP+1].
  constexpr int LDY = SMM_BN + 1, LDU = RP + 1;
  float* red_y = reinterpret_cast<float*>(lk_smem);
  float* red_u = red_y + MP * LDY;
  for (int w = 0; w < kTcThreads / 32; ++w) {
    if (warp == w) {
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int row = 16 * mf + lo.g + 8 * (q >> 1), col = 2 * lo.t + (q & 1);
#pragma unroll
          for (int f = 0; f < SMM_BN / 8; ++f) {
            float& d = red_y[row * LDY + 8 * f + col];
            d = w == 0 ? acc[mf][f][q] : d + acc[mf][f][q];
          }
#pragma unroll
          for (int f = 0; f < 2 * NR; ++f) {
            float& d = red_u[row * LDU + 8 * f + col];
            d = w == 0 ? uacc[mf][f][q] : d + uacc[mf][f][q];
          }
        }
    }
    __syncthreads();
  }
  // u = scale * acc_u: the saved u from block 0 (16-bit adapters), and its T-rounded value for the epilogue.
  for (int i = tid; i < MP * RP; i += kTcThreads) {
    const int m = i / RP, j = i % RP;
    float& v = red_u[m * LDU + j];
    const float us = v * scale;
    if (!kAF32 && blockIdx.x == 0 && m < M && j < r) u_out[(int64_t)m * r + j] = us;
    v = to_f<T>(from_f<T>(us));
  }
  __syncthreads();
  // Epilogue: column n0 + lane, rows warp + 8 i: y = acc_y + T(u) T(B)^T + bias, rounded once.
  const int64_t n = n0 + lane;
  if (n < N) {
    float lora[MP / 8];
#pragma unroll
    for (int i = 0; i < MP / 8; ++i) lora[i] = 0.f;
    const float* Bf = static_cast<const float*>(B_) + n * r;
    const T* Bt = static_cast<const T*>(B_) + n * r;
    for (int j = 0; j < r; ++j) {
      const float b = b_f32 ? to_f<T>(from_f<T>(Bf[j])) : to_f<T>(Bt[j]);
#pragma unroll
      for (int i = 0; i < MP / 8; ++i) lora[i] = fmaf(red_u[(warp + 8 * i) * LDU + j], b, lora[i]);
    }
    const float bv = bias != nullptr ? to_f<T>(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < MP / 8; ++i) {
      const int m = warp + 8 * i;
      if (m < M) y[m * N + n] = from_f<T>(red_y[m * LDY + lane] + lora[i] + bv);
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// lora_small_m (FFMA, fp32 x and adapters): the same block shape, all in fp32. K in SMF_KC (32)-column chunks through
// shared memory (x, W, A); thread (n = tid % 32, row phase tid / 32) accumulates y at rows phase + 8 i,
// and u elements tid + 256 i (every block computes all of u for its epilogue; block 0 writes it); each chunk's dot
// product is summed on its own and then added (a shorter rounding chain than one running sum over K, as blocked
// GEMMs have). Then y = acc_y + u B^T + bias (fp32), written once.
constexpr int SMF_KC = 32;
constexpr int SMF_LD = SMF_KC + 1;
constexpr int SMF_MAXU = kSmallMMaxM * 32 / kThreads;  // u elements per thread (M * r <= 64 * 32 by the limits)

__global__ void __launch_bounds__(kThreads, 1)
lora_small_m_ffma_kernel(const float* __restrict__ x, const float* __restrict__ W, const float* __restrict__ bias,
                         const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ y,
                         float* __restrict__ u_out, int64_t M, int64_t N, int64_t K, int r, float scale) {
  extern __shared__ float smem[];
  float* xs = smem;                           // [64][SMF_LD] x chunk
  float* ws = xs + kSmallMMaxM * SMF_LD;      // [32][SMF_LD]
  float* as = ws + SMM_BN * SMF_LD;           // [r][SMF_LD]
  const int tid = threadIdx.x, lane = tid & 31, phase = tid >> 5;
  const int64_t n0 = (int64_t)blockIdx.x * SMM_BN;
  const int MR = (int)M * r;
  float acc[kSmallMMaxM / 8], uacc[SMF_MAXU];
#pragma unroll
  for (int i = 0; i < kSmallMMaxM / 8; ++i) acc[i] = 0.f;
#pragma unroll
  for (int i = 0; i < SMF_MAXU; ++i) uacc[i] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += SMF_KC) {
    for (int gi = tid; gi < kSmallMMaxM * (SMF_KC / 4); gi += kThreads) {
      const int mm = gi / (SMF_KC / 4), c = gi % (SMF_KC / 4) * 4;
      const int64_t k = k0 + c;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (mm < M && k < K) load4<float>(x + mm * K + k, K - k < 4 ? (int)(K - k) : 4, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) xs[mm * SMF_LD + c + q] = v[q];
    }
    for (int i = tid; i < SMM_BN * SMF_KC; i += kThreads) {
      const int nn = i / SMF_KC, kk = i % SMF_KC;
      const int64_t k = k0 + kk;
      ws[nn * SMF_LD + kk] = (n0 + nn < N && k < K) ? W[(n0 + nn) * K + k] : 0.f;
    }
    for (int i = tid; i < r * SMF_KC; i += kThreads) {
      const int j = i / SMF_KC, kk = i % SMF_KC;
      const int64_t k = k0 + kk;
      as[j * SMF_LD + kk] = k < K ? A[(int64_t)j * K + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSmallMMaxM / 8; ++i) {
      const int m = phase + 8 * i;
      if (m < M) acc[i] += fma_dot<SMF_KC>(0.f, xs, m * SMF_LD, 1, ws, lane * SMF_LD, 1);
    }
#pragma unroll
    for (int i = 0; i < SMF_MAXU; ++i) {
      const int e = tid + i * kThreads;
      if (e < MR) uacc[i] += fma_dot<SMF_KC>(0.f, xs, e / r * SMF_LD, 1, as, e % r * SMF_LD, 1);
    }
    __syncthreads();
  }
  float* us = smem;  // [M][r]: scaled u (the chunk buffers are free)
#pragma unroll
  for (int i = 0; i < SMF_MAXU; ++i) {
    const int e = tid + i * kThreads;
    if (e < MR) {
      const float v = uacc[i] * scale;
      us[e] = v;
      if (blockIdx.x == 0) u_out[e] = v;
    }
  }
  __syncthreads();
  const int64_t n = n0 + lane;
  if (n >= N) return;
  const float bv = bias != nullptr ? bias[n] : 0.f;
#pragma unroll
  for (int i = 0; i < kSmallMMaxM / 8; ++i) {
    const int m = phase + 8 * i;
    if (m >= M) continue;
    float lora = 0.f;
    for (int j = 0; j < r; ++j) lora = fmaf(us[m * r + j], B[n * r + j], lora);
    y[m * N + n] = acc[i] + lora + bv;
  }
}

// f(std::integral_constant<int, MF>{}, std::integral_constant<int, NR>{}) for the supported fragment counts.
template <typename F>
cudaError_t with_small_m_frags(int mf, int nr, F&& f) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  switch (mf * 8 + nr) {
    case 8 + 1: return f(I1{}, I1{});
    case 8 + 2: return f(I1{}, I2{});
    case 8 + 4: return f(I1{}, I4{});
    case 16 + 1: return f(I2{}, I1{});
    case 16 + 2: return f(I2{}, I2{});
    case 16 + 4: return f(I2{}, I4{});
    case 32 + 1: return f(I4{}, I1{});
    case 32 + 2: return f(I4{}, I2{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

const char* lora_small_m_unsupported(int64_t M, int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype,
                                     float p) {
  if (M < 1 || M > kSmallMMaxM) return "M is not in 1..64";
  if (N < 1) return "N is 0";
  if (K < 0) return "K is negative";
  if (r < 1 || r > kSmallMMaxR) return "r is above 64";
  if (small_m_frags(M) * rank_frags(r) > 8) return "r is above 32 with M above 32";
  if (p > 0.f) return "dropout (the unfused forward is faster: see Limits above)";
  if ((N + SMM_BN - 1) / SMM_BN > INT_MAX) return "N is too large for the grid";
  if (x_dtype != DType::kFloat32) {
    if (!tc_supported()) return "16-bit x below sm_80";
    const size_t slot = small_m_slot_bytes(small_m_frags(M), rank_frags(r), a_dtype == DType::kFloat32);
    if (SMM_STAGES * slot > smem_optin_bytes()) return "its shared memory does not fit this GPU at this M and r";
  }
  return nullptr;
}

cudaError_t launch_lora_small_m_forward(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                        DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                        int64_t N, int64_t K, int r, float scaling, cudaStream_t stream) {
  if (lora_small_m_unsupported(M, N, K, r, x_dtype, a_dtype, 0.f) != nullptr) return cudaErrorInvalidValue;
  const int64_t n_tiles = (N + SMM_BN - 1) / SMM_BN;
  if (x_dtype == DType::kFloat32) {
    if (a_dtype != DType::kFloat32 || b_dtype != DType::kFloat32) return cudaErrorInvalidValue;
    const size_t smem = (size_t)((kSmallMMaxM + SMM_BN + r) * SMF_LD) * sizeof(float);
    return launch_kernel(lora_small_m_ffma_kernel, dim3((unsigned)n_tiles), kThreads, smem, stream,
                         static_cast<const float*>(x), static_cast<const float*>(W), static_cast<const float*>(bias),
                         static_cast<const float*>(A), static_cast<const float*>(B), static_cast<float*>(y), u, M, N,
                         K, r, scaling);
  }
  if ((a_dtype != DType::kFloat32 && a_dtype != x_dtype) || (b_dtype != DType::kFloat32 && b_dtype != x_dtype))
    return cudaErrorInvalidValue;
  const bool af32 = a_dtype == DType::kFloat32;
  const int mf = small_m_frags(M), nr = rank_frags(r);
  // fp32 adapters: every block owns at most SMM_EPB elements of u; blocks past the y tiles only compute u.
  const int64_t u_blocks = af32 ? (M * r + SMM_EPB - 1) / SMM_EPB : 0;
  const int64_t blocks = std::max<int64_t>(n_tiles, u_blocks);
  const int epb = af32 ? (int)((M * r + blocks - 1) / blocks) : 0;
  const size_t slot = small_m_slot_bytes(mf, nr, af32);
  const bool deep = SMM_STAGES_DEEP * slot <= smem_optin_bytes();
  const size_t smem = (deep ? SMM_STAGES_DEEP : SMM_STAGES) * slot;
  return with_dtype16(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return with_small_m_frags(mf, nr, [&](auto mfc, auto nrc) {
      constexpr int MF = decltype(mfc)::value, NR = decltype(nrc)::value;
      auto kernel = af32 ? (deep ? lora_small_m_tc_kernel<T, true, MF, NR, SMM_STAGES_DEEP>
                                 : lora_small_m_tc_kernel<T, true, MF, NR, SMM_STAGES>)
                         : (deep ? lora_small_m_tc_kernel<T, false, MF, NR, SMM_STAGES_DEEP>
                                 : lora_small_m_tc_kernel<T, false, MF, NR, SMM_STAGES>);
      return launch_kernel(kernel, dim3((unsigned)blocks), kTcThreads, smem, stream, static_cast<const T*>(x),
                           static_cast<const T*>(W), static_cast<const T*>(bias), A, B,
                           b_dtype == DType::kFloat32 ? 1 : 0, static_cast<T*>(y), u, M, N, K, r, scaling, n_tiles,
                           epb);
    });
  });
}

}  // namespace lora_kernels
