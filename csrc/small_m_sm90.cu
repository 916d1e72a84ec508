// Small-M forward on Hopper, one launch: y = x W^T + bias + u B^T and u = s / (1 - p) (keep * x) A^T, for M <= 64
// rows of 16-bit x (decoding, small batches). The register-direct kernel of small_m.cu (the fallback, and the kernel
// below sm_90) gives every 16-column tile of y its own block, which reads all of x from L2 for its 16 columns: 1x W's
// bytes at M = 16, 4x at M = 64; and it takes u from item blocks that the tiles wait for. Here a cluster of KS CTAs
// shares one 128-column tile of y, each CTA one K slice: x is read once per 128 columns, the CTAs add their partial
// tiles through distributed shared memory, and every cluster computes u itself from the x slices it already holds.
//
// Math   : cluster j owns y[:, 128 j .. 128 j + 127]; CTA c of the cluster owns K steps (32 columns each)
//          [S c / KS, S (c+1) / KS) of the S = ceil(K / 32):
//            yp_c = x[:, slice] W[cols, slice]^T      (tensor cores, fp32)
//            up_c = (keep * x)[:, slice] A[:, slice]^T (tensor cores, fp32; fp32 A as three bf16 pieces, exact
//                                                       products: bf16x3_split)
//          then u = scale * sum_c up_c and y = round(sum_c yp_c + u B[cols]^T + bias[cols]), the sums in rank order
//          (deterministic). Cluster 0 writes u (saved for backward).
// Tiling : 256 threads, 8 warps, up to two CTAs per SM. The CTA's x slice (MP = 16 MF rows, zero-filled past M)
//          lands in shared memory by cp.async, four steps per group, kept whole. Warp w owns columns 16 w .. 16 w + 15:
//          thread (g, t) = (lane / 4, lane % 4) loads 16 bytes of W rows 16 w + g and 16 w + 8 + g at columns
//          8t .. 8t+7 of each step straight into mma fragments, four steps ahead, and reads the same columns of x
//          from shared memory (the k order inside a step is permuted alike for x and W; the dot product does not
//          see it). Then the A pass: warp w takes A's rows 8 (w / WPG) .. +7 over the steps s with s % WPG ==
//          w % WPG (WPG = 8 / ceil(r / 8) warps share a group of 8 rows), the same fragments, x masked by the keep
//          bits of each 8-group (one Philox call per row and 8 columns).
// Cluster: partial tiles and partial u in each CTA's shared memory; after a cluster barrier CTA c sums its share
//          of u over the ranks and stores the result into every CTA's copy (and to global from cluster 0); after a
//          second barrier each CTA writes its share of y's elements; a third keeps every CTA resident until the
//          others have read its partials.
// Bytes  : W once; x (M K 2) from L2 once per 128 columns; A once per cluster (L2); B's tile and bias once.
// Launch : KS (1..8, a power of two) makes ceil(N / 128) KS about two CTAs per SM, and at least the slices that fit
//          shared memory (sm9_plan); lora_small_m_sm90_unsupported says why a call does not come here (the
//          register-direct kernel of small_m.cu takes it).
#include "common.cuh"
#include "lora_kernels.cuh"
#include "plans.cuh"
#include "ptx.cuh"

#include <atomic>
#include <climits>
#include <cstring>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int SM9_NW = 8;               // warps per CTA
constexpr int SM9_BN = 16 * SM9_NW;     // y columns per cluster
constexpr int SM9_BTP = SM9_BN + 1;     // B tile pitch (fp32 words): [r][129]
constexpr int SM9_CHUNK = 4;            // K steps per cp.async group of x, and W steps in flight per warp
constexpr int SM9_MAX_KS = 8;           // portable cluster size
constexpr size_t SM9_SMEM_MAX = 227 * 1024;  // one CTA per SM
constexpr size_t SM9_SMEM_TWO = 113 * 1024;  // two CTAs per SM (228 KB, 1 KB of it reserved per CTA)

struct Sm9Dropout {
  float p;
  uint64_t seed;
  const int64_t* seed_ptr;  // graph-safe device seed when not null (dropout_seed)
  uint64_t offset;
};

// Shared-memory layout (bytes): R = the x slice [MP][pitch] (T), reused after the loops for the partial tile
// [MP][128] and the B tile [r][129] (fp32); then the local partial u [MP][r], the reduced u [MP][r], bias [128].
struct Sm9Plan {
  int ks = 1, pitch = 0;
  size_t off_u = 0, off_f = 0, off_bias = 0, smem = 0;
};

inline size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// pitch (elements) of the x slice: a multiple of 32 columns plus 32, so that a row is 64 bytes (mod 128) past the
// one before it: the 16-byte reads of rows g and g + 1 by one quarter-warp fall in different banks.
inline Sm9Plan sm9_layout(int mf, int64_t K, int r, int ks) {
  Sm9Plan pl;
  pl.ks = ks;
  const int64_t steps = ceil_div(K, 32);
  const int64_t slice = ceil_div(steps, ks);
  pl.pitch = (int)((slice + (slice & 1)) * 32 + 32);
  const size_t mp = 16 * (size_t)mf;
  const size_t region = std::max(mp * pl.pitch * 2, (mp * SM9_BN + (size_t)r * SM9_BTP) * 4);
  pl.off_u = align16(region);
  pl.off_f = pl.off_u + align16(mp * r * 4);
  pl.off_bias = pl.off_f + align16(mp * r * 4);
  pl.smem = pl.off_bias + SM9_BN * 4;
  return pl;
}

// KS: the smallest power of two whose slices let two CTAs share an SM (else one), raised while the grid stays within
// two CTAs per SM; at most 8 and at most the K steps. false when even 8 slices do not fit one CTA.
inline bool sm9_plan(int mf, int64_t N, int64_t K, int r, Sm9Plan& out) {
  const int64_t steps = std::max<int64_t>(1, ceil_div(K, 32));
  const int64_t tiles = ceil_div(N, SM9_BN);
  auto smallest_fitting = [&](size_t budget) {
    int ks = 1;
    while (ks < SM9_MAX_KS && sm9_layout(mf, K, r, ks).smem > budget) ks *= 2;
    return ks;
  };
  int ks = smallest_fitting(SM9_SMEM_TWO);
  if (sm9_layout(mf, K, r, ks).smem > SM9_SMEM_TWO) ks = smallest_fitting(SM9_SMEM_MAX);
  while (ks < SM9_MAX_KS && tiles * ks * 2 <= 2 * (int64_t)num_sms()) ks *= 2;
  while (ks > 1 && ks > steps) ks /= 2;
  if (sm9_layout(mf, K, r, ks).smem > SM9_SMEM_MAX) return false;
  out = sm9_layout(mf, K, r, ks);
  return true;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Every thread of the cluster: writes before it visible to reads after it in any CTA of the cluster.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The shared::cluster address of `addr` (this CTA's shared window) in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_rank(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ float ld_cluster(uint32_t addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_cluster(uint32_t addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ uint4 lds16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// 8 fp32 of A at p (32-byte aligned) as the three bf16x3 pieces, each packed as 8 bf16 in k order.
__device__ __forceinline__ void a_pieces(const float* p, uint4 (&pc)[3]) {
  const float4 lo = __ldg(reinterpret_cast<const float4*>(p)), hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
  const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  union { uint4 u; __nv_bfloat16 e[8]; } t[3];
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    __nv_bfloat16 s[3];
    bf16x3_split(v[q], s);
#pragma unroll
    for (int i = 0; i < 3; ++i) t[i].e[q] = s[i];
  }
#pragma unroll
  for (int i = 0; i < 3; ++i) pc[i] = t[i].u;
}

// acc (16 x 8) += x fragment (rows g, g + 8: xr[0], xr[1], 8 columns each) times a B fragment of 8 columns (w): two
// k16 mmas in the permuted k order of the step.
template <typename T>
__device__ __forceinline__ void mma_step(float (&acc)[4], const uint4 (&xr)[2], uint4 w) {
  const uint32_t a1[4] = {xr[0].x, xr[1].x, xr[0].y, xr[1].y};
  const uint32_t a2[4] = {xr[0].z, xr[1].z, xr[0].w, xr[1].w};
  mma16816<T>(acc, a1, w.x, w.y);
  mma16816<T>(acc, a2, w.z, w.w);
}
#endif

template <typename T, typename TA, int MF>
__global__ void __launch_bounds__(SM9_NW * 32, 2)
    lora_small_m_sm90_kernel(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ bias,
                             const TA* __restrict__ A, const void* __restrict__ B_, int b_f32, T* __restrict__ y,
                             float* __restrict__ u_out, int M, int N, int K, int r, float scale, Sm9Dropout drop,
                             int ks, int pitch, uint32_t off_u, uint32_t off_f, uint32_t off_bias) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int MP = 16 * MF;
  constexpr int P = std::is_same<TA, float>::value ? 3 : 1;  // pieces of A (fp32 A: bf16 x only)
  extern __shared__ __align__(16) unsigned char sm9[];
  T* xs = reinterpret_cast<T*>(sm9);
  float* ypart = reinterpret_cast<float*>(sm9);     // [MP][128], after the loops
  float* btile = ypart + MP * SM9_BN;               // [r][129]
  float* ulocal = reinterpret_cast<float*>(sm9 + off_u);
  float* ufull = reinterpret_cast<float*>(sm9 + off_f);
  float* bias_s = reinterpret_cast<float*>(sm9 + off_bias);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const uint32_t rank = cluster_rank();
  const int n0 = (int)(blockIdx.x / ks) * SM9_BN;
  const int S = (K + 31) / 32;
  const int s0 = (int)((int64_t)S * rank / ks), ns = (int)((int64_t)S * (rank + 1) / ks) - s0;
  const int64_t k0 = (int64_t)s0 * 32;
  const float biasv = (tid < SM9_BN && bias != nullptr && n0 + tid < N) ? to_f<T>(bias[n0 + tid]) : 0.f;

  // x slice: group c holds steps [4c, 4c + 4); issued three groups ahead of the group the warps read
  const int groups = (ns + SM9_CHUNK - 1) / SM9_CHUNK;
  auto issue_x = [&](int c) {
    if (c < groups) {
#pragma unroll
      for (int q = 0; q < MF; ++q) {  // MP rows x 16 pieces of 16 bytes = 256 MF
        const int i = tid + q * SM9_NW * 32, row = i >> 4, col = c * 128 + (i & 15) * 8;
        const int64_t k = k0 + col;
        if (col >= ns * 32) continue;  // past the slice: never read
        const bool ok = row < M && k < K;
        cp_async16(smem_addr(xs + row * pitch + col), ok ? x + (int64_t)row * K + k : x, ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };
  issue_x(0);
  issue_x(1);
  issue_x(2);

  // W rows of this warp and their 16-byte columns, four steps in flight
  const T* wr[2];
  bool wok[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int n = n0 + 16 * warp + 8 * j + g;
    wok[j] = n < N;
    wr[j] = W + (int64_t)(wok[j] ? n : 0) * K + k0 + 8 * t;
  }
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  auto load_w = [&](uint4 (&wv)[2], int s) {
    const bool ok = s < ns && k0 + (int64_t)s * 32 + 8 * t < K;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wv[j] = ok && wok[j] ? __ldcs(reinterpret_cast<const uint4*>(wr[j] + (int64_t)s * 32)) : zero;
  };
  uint4 wv[SM9_CHUNK][2];
#pragma unroll
  for (int q = 0; q < SM9_CHUNK; ++q) load_w(wv[q], q);

  float acc[MF][2][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mf][j][q] = 0.f;

  for (int c = 0; c < groups; ++c) {
    issue_x(c + 3);
    cp_async_wait<3>();
    __syncthreads();
#pragma unroll
    for (int q = 0; q < SM9_CHUNK; ++q) {
      const int s = c * SM9_CHUNK + q;
      if (s < ns) {
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          uint4 xr[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) xr[h] = lds16(xs + (16 * mf + g + 8 * h) * pitch + s * 32 + 8 * t);
#pragma unroll
          for (int j = 0; j < 2; ++j) mma_step<T>(acc[mf][j], xr, wv[q][j]);
        }
      }
      load_w(wv[q], s + SM9_CHUNK);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the whole slice is in shared memory (also when ns is 0)

  // A pass: warp (group ag, phase ph) takes A rows 8 ag + g over the slice's steps ph, ph + wpg, ...
  const int rg = (r + 7) / 8, wpg = rg >= SM9_NW ? 1 : SM9_NW / rg;
  const int ag = warp / wpg, ph = warp % wpg;
  const bool a_on = ag < rg;
  const int ja = 8 * ag + g;
  const bool masked = drop.p > 0.f;
  const uint64_t seed = masked ? dropout_seed(drop.seed, drop.seed_ptr) : 0;
  const uint32_t thr = dropout_threshold(drop.p);
  float uacc[MF][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int q = 0; q < 4; ++q) uacc[mf][q] = 0.f;
  if (a_on) {
    const TA* ar = A + (int64_t)(ja < r ? ja : 0) * K + k0 + 8 * t;
    constexpr int AW = P == 3 ? 2 : SM9_CHUNK;  // this warp's steps of A in flight (fp32 A: 3 pieces of registers)
    for (int s_base = ph; s_base < ns; s_base += AW * wpg) {
      uint4 av[AW][P];
#pragma unroll
      for (int q = 0; q < AW; ++q) {
        const int s = s_base + q * wpg;
        const bool ok = ja < r && s < ns && k0 + (int64_t)s * 32 + 8 * t < K;
        if constexpr (P == 3) {
          if (ok) {
            a_pieces(reinterpret_cast<const float*>(ar) + (int64_t)s * 32, av[q]);
          } else {
#pragma unroll
            for (int i = 0; i < P; ++i) av[q][i] = zero;
          }
        } else {
          av[q][0] = ok ? __ldg(reinterpret_cast<const uint4*>(ar + (int64_t)s * 32)) : zero;
        }
      }
#pragma unroll
      for (int q = 0; q < AW; ++q) {
        const int s = s_base + q * wpg;
        if (s >= ns) break;
        const int64_t k = k0 + (int64_t)s * 32 + 8 * t;
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          uint4 xr[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = 16 * mf + g + 8 * h;
            xr[h] = lds16(xs + row * pitch + s * 32 + 8 * t);
            if (masked && row < M && k < K)
              xr[h] = drop8<T>(xr[h], dropout_keep_bits8(seed, dropout_counter(drop.offset, row, K, k / 8), thr));
          }
#pragma unroll
          for (int i = 0; i < P; ++i) mma_step<T>(uacc[mf], xr, av[q][i]);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the x slice: R becomes the partial tile and the B tile

  // partial tile, local partial u (phases added in order), B tile (fp32, [r][129]), bias
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * mf + g + 8 * (q >> 1), col = 16 * warp + 8 * j + 2 * t + (q & 1);
        if (row < M) ypart[row * SM9_BN + col] = acc[mf][j][q];
      }
  for (int p = 0; p < wpg; ++p) {
    if (a_on && ph == p) {
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int row = 16 * mf + g + 8 * (q >> 1), col = 8 * ag + 2 * t + (q & 1);
          if (row < M && col < r) ulocal[row * r + col] = (p == 0 ? 0.f : ulocal[row * r + col]) + uacc[mf][q];
        }
    }
    __syncthreads();
  }
  for (int i = tid; i < SM9_BN * r; i += SM9_NW * 32) {  // B rows n0 .. n0 + 127 are contiguous in B
    const int col = i / r, j = i % r, n = n0 + col;
    float v = 0.f;
    if (n < N)
      v = b_f32 ? __ldg(static_cast<const float*>(B_) + (int64_t)n * r + j)
                : to_f<T>(static_cast<const T*>(B_)[(int64_t)n * r + j]);
    btile[j * SM9_BTP + col] = v;
  }
  if (tid < SM9_BN) bias_s[tid] = biasv;
  cluster_sync();

  // u: this CTA's share of its M r elements summed over the ranks, into every CTA's copy (and u_out by cluster 0)
  const int E = M * r, per = (E + ks - 1) / ks;
  const int e_end = min(E, (int)(rank + 1) * per);
  const uint32_t ul = smem_addr(ulocal), uf = smem_addr(ufull);
  for (int e = (int)rank * per + tid; e < e_end; e += SM9_NW * 32) {
    float v = 0.f;
    for (int c = 0; c < ks; ++c) v += ld_cluster(map_rank(ul + 4 * e, c));
    v *= scale;
    for (int c = 0; c < ks; ++c) st_cluster(map_rank(uf + 4 * e, c), v);
    if (n0 == 0) u_out[e] = v;
  }
  cluster_sync();

  // y: elements rank * 256 + tid + i * 256 ks of the M x 128 tile (a warp's 32 share a row)
  const uint32_t yp = smem_addr(ypart);
  for (int e = (int)rank * SM9_NW * 32 + tid; e < M * SM9_BN; e += SM9_NW * 32 * ks) {
    const int m = e / SM9_BN, col = e % SM9_BN, n = n0 + col;
    if (n >= N) continue;
    float v = 0.f;
    for (int c = 0; c < ks; ++c) v += ld_cluster(map_rank(yp + 4 * e, c));
    const float* um = ufull + m * r;
    float lora = 0.f;
    for (int j = 0; j < r; ++j) lora = fmaf(um[j], btile[j * SM9_BTP + col], lora);
    y[(int64_t)m * N + n] = from_f<T>(v + lora + bias_s[col]);
  }
  cluster_sync();  // no CTA leaves while another may still read its partials
#else
  __trap();
#endif
}

std::atomic<int> sm9_state{0};

bool sm9_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_SMALL_M_SM90");
  return on;
}

// f(kernel, T{}, TA{}) for the (T, TA, MF) of a call; cudaErrorNotSupported for fp16 x with fp32 adapters (no exact pieces).
template <typename F>
cudaError_t with_sm9_kernel(DType x_dtype, DType a_dtype, int mf, F&& f) {
  auto by_mf = [&](auto tt, auto ta) -> cudaError_t {
    using T = decltype(tt);
    using TA = decltype(ta);
    return mf == 1   ? f(&lora_small_m_sm90_kernel<T, TA, 1>, tt, ta)
           : mf == 2 ? f(&lora_small_m_sm90_kernel<T, TA, 2>, tt, ta)
                     : f(&lora_small_m_sm90_kernel<T, TA, 4>, tt, ta);
  };
  if (x_dtype == DType::kBFloat16)
    return a_dtype == DType::kFloat32 ? by_mf(__nv_bfloat16{}, float{}) : by_mf(__nv_bfloat16{}, __nv_bfloat16{});
  if (x_dtype == DType::kFloat16 && a_dtype == DType::kFloat16) return by_mf(__half{}, __half{});
  return cudaErrorNotSupported;
}

inline int sm9_frags(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

}  // namespace

const char* lora_small_m_sm90_unsupported(const void* x, const void* W, const void* A, const void* B, int64_t M,
                                          int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype, DType b_dtype) {
  if (!sm9_enabled()) return "off (LORA_KERNELS_SMALL_M_SM90=0)";
  if (M < 1 || M > 64 || r < 1 || r > 64) return "M or r is not in 1..64";
  if (x_dtype == DType::kFloat32) return "fp32 x";
  if (x_dtype == DType::kFloat16 && a_dtype != DType::kFloat16) return "fp16 x with fp32 lora_A";
  if (b_dtype != DType::kFloat32 && b_dtype != x_dtype) return "lora_B's dtype";
  if (K % 8 != 0 || K <= 0 || reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(W) % 16 ||
      reinterpret_cast<uintptr_t>(A) % 16)
    return "K % 8 != 0 or x, W or lora_A not 16-byte aligned";
  if (K > INT_MAX || N > INT_MAX || ceil_div(N, SM9_BN) * SM9_MAX_KS > INT_MAX) return "N or K too large";
  Sm9Plan pl;
  if (!sm9_plan(sm9_frags(M), N, K, r, pl)) return "the x slices do not fit shared memory (K too large for M)";
  bool ok = false;
  with_sm9_kernel(x_dtype, a_dtype, sm9_frags(M), [&](auto kernel, auto, auto) {
    ok = sm90_kernel_ok(reinterpret_cast<const void*>(kernel), sm9_state);
    return cudaSuccess;
  });
  (void)B;
  return ok ? nullptr : "not an sm_90 device with this build's sm_90a code";
}

cudaError_t launch_lora_small_m_sm90(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                     DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                     int64_t N, int64_t K, int r, float scaling, float p, uint64_t seed,
                                     const int64_t* seed_ptr, uint64_t offset, cudaStream_t stream) {
  if (lora_small_m_sm90_unsupported(x, W, A, B, M, N, K, r, x_dtype, a_dtype, b_dtype) != nullptr)
    return cudaErrorNotSupported;
  const int mf = sm9_frags(M);
  Sm9Plan pl;
  sm9_plan(mf, N, K, r, pl);
  const Sm9Dropout drop{p, seed, seed_ptr, offset};
  const float u_scale = dropout_scale(scaling, p);
  return with_sm9_kernel(x_dtype, a_dtype, mf, [&](auto kernel, auto tt, auto ta) -> cudaError_t {
    using T = decltype(tt);
    using TA = decltype(ta);
    cudaError_t e = set_smem_once(reinterpret_cast<const void*>(kernel), pl.smem);
    if (e != cudaSuccess) return e;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)pl.ks;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3((unsigned)(ceil_div(N, SM9_BN) * pl.ks));
    config.blockDim = dim3(SM9_NW * 32);
    config.dynamicSmemBytes = pl.smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, static_cast<const T*>(x), static_cast<const T*>(W),
                              static_cast<const T*>(bias), static_cast<const TA*>(A), B,
                              b_dtype == DType::kFloat32 ? 1 : 0, static_cast<T*>(y), u, (int)M, (int)N, (int)K, r,
                              u_scale, drop, pl.ks, pl.pitch, (uint32_t)pl.off_u, (uint32_t)pl.off_f,
                              (uint32_t)pl.off_bias);
  });
}

}  // namespace lora_kernels
