// Small-M main loops, measured without torch: which way of streaming W reaches cuBLAS's speed at M = 1, 16, 64.
// The one-launch small-M forward (csrc/small_m.cu, with its LoRA term, fp32 adapters) runs alongside, as do
// cuBLAS's y = x W^T and main-loop variants of y = x W^T alone (bf16, fp32 accumulation):
//   cp  : a cp.async ring of S chunks of KC columns (x rows < M and BN rows of W per chunk), NW warps splitting each
//         chunk's k16 steps, an optional K split over grid.y (partials added in fp32 with atomics: timing only);
//   tma : the same tile with each row of a chunk brought by one bulk copy (cp.async.bulk, mbarrier completion),
//         issued by warp 0's lanes, S chunks in flight;
//   rd  : W straight into mma fragments, warps splitting K (the library's main loop);
//   sx  : W straight into mma fragments, warps splitting N, x's K slice shared in a cp.async ring, K split over
//         blocks (atomics: timing only).
// GPU time as the suite measures it: every launch queued behind a GPU sleep, W rotated through 3 sets (larger than
// the 50 MB L2 from N*K = 4096*4096 up), median of 30. Each variant's output is checked against an fp32 reference.
//   nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc -I<cublas include> bench/dev/small_m_bench.cu csrc/plans.cu \
//        -lcublas -o /tmp/smb && /tmp/smb
#include "small_m.cu"  // one translation unit: the rd kernel's DBG instances are timed below

#include "gpu_timing.cuh"

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>


using bf16 = __nv_bfloat16;

// The benchmark's own helpers and kernels in a namespace of their own: argument-dependent lookup from the library's
// templates (bf16 arguments) must not see them.
namespace smb {

// ------------------------------------------------------------------------------------------------ helpers
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(void* s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(s)), "l"(g));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mbar_init(uint64_t* b, int n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(n));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n LAB_WAIT:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @p bra.uni DONE;\n bra.uni LAB_WAIT;\n DONE:\n }\n" ::"r"(smem_u32(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* s, const void* g, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_u32(s)),
      "l"(g), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// ------------------------------------------------------------------------------------------------ main loops
// y (M x N) = x (M x K) W^T (N x K), M <= 16 MF, K a multiple of KC * grid.y. Block: BN columns of y, K range
// blockIdx.y of gridDim.y. With gridDim.y > 1, fp32 partials are added into y32 (atomics) instead of writing y.
template <int MF, int BN, int KC, int S, int NW, bool TMA>
struct MainLoop {
  static constexpr int MP = 16 * MF, LD = KC + 8, NT = 32 * NW;
  static constexpr int SLOT = (MP + BN) * LD;  // elements
  static constexpr size_t kSmem = (size_t)S * SLOT * 2 + 8 * S + 16;
};

template <int MF, int BN, int KC, int S, int NW, bool TMA, int MINB>
__global__ void __launch_bounds__(32 * NW, MINB)
mm_kernel(const bf16* __restrict__ x, const bf16* __restrict__ W, bf16* __restrict__ y, float* __restrict__ y32,
          int M, int N, int K) {
  using L = MainLoop<MF, BN, KC, S, NW, TMA>;
  constexpr int MP = L::MP, LD = L::LD, NT = L::NT, SLOT = L::SLOT;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ring = reinterpret_cast<bf16*>(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + (size_t)S * SLOT * 2);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * BN;
  const int kper = K / gridDim.y, kbeg = blockIdx.y * kper;
  const int nch = kper / KC;
  // Rows of x past M and of W past N are never written: they feed only rows and columns of the product that are
  // not stored (each mma output element depends on its own row and column only).
  const int nrows_w = min(BN, N - n0);
  if (TMA && tid == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&full[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  auto issue_cp = [&](int t) {
    if (t < nch) {
      bf16* s = ring + (t % S) * SLOT;
      const int k0 = kbeg + t * KC;
      constexpr int PR = KC / 8;  // 16-byte pieces per row
      const int total = (M + nrows_w) * PR;
      for (int g = tid; g < total; g += NT) {
        const int row = g / PR, col = g % PR * 8;
        if (row < M)
          cp16(s + row * LD + col, x + (int64_t)row * K + k0 + col);
        else
          cp16(s + (MP + row - M) * LD + col, W + (int64_t)(n0 + row - M) * K + k0 + col);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  auto issue_tma = [&](int t) {  // warp 0
    if (t >= nch) return;
    bf16* s = ring + (t % S) * SLOT;
    const int k0 = kbeg + t * KC;
    for (int row = lane; row < M + nrows_w; row += 32) {
      if (row < M)
        bulk_g2s(s + row * LD, x + (int64_t)row * K + k0, KC * 2, &full[t % S]);
      else
        bulk_g2s(s + (MP + row - M) * LD, W + (int64_t)(n0 + row - M) * K + k0, KC * 2, &full[t % S]);
    }
    if (lane == 0) mbar_expect_tx(&full[t % S], (uint32_t)(M + nrows_w) * KC * 2);
  };

  float acc[MF][BN / 8][4];
#pragma unroll
  for (int a = 0; a < MF; ++a)
#pragma unroll
    for (int b = 0; b < BN / 8; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  const int arow = lane & 15, acol = (lane >> 4) * 8;                      // x fragment (A operand)
  const int brow = ((lane >> 4) << 3) + (lane & 7), bcol = ((lane >> 3) & 1) * 8;  // W fragment (B operand)
  auto compute = [&](int t) {
    const bf16* s = ring + (t % S) * SLOT;
#pragma unroll
    for (int ks = warp; ks < KC / 16; ks += NW) {
      const int kk = 16 * ks;
      uint32_t xa[MF][4];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) ldsm4(xa[mf], s + (16 * mf + arow) * LD + kk + acol);
#pragma unroll
      for (int f = 0; f < BN / 16; ++f) {
        uint32_t wb[4];
        ldsm4(wb, s + (MP + 16 * f + brow) * LD + kk + bcol);
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          mma(acc[mf][2 * f], xa[mf], wb[0], wb[1]);
          mma(acc[mf][2 * f + 1], xa[mf], wb[2], wb[3]);
        }
      }
    }
  };

  if (!TMA) {
    for (int t = 0; t < S - 1; ++t) issue_cp(t);
    for (int t = 0; t < nch; ++t) {
      asm volatile("cp.async.wait_group %0;\n" ::"n"(S - 2) : "memory");
      __syncthreads();
      issue_cp(t + S - 1);
      compute(t);
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  } else {
    if (warp == 0)
      for (int t = 0; t < S; ++t) issue_tma(t);
    for (int t = 0; t < nch; ++t) {
      mbar_wait(&full[t % S], (t / S) & 1);
      compute(t);
      __syncthreads();  // every warp done with slot t % S
      if (warp == 0) issue_tma(t + S);
    }
  }
  __syncthreads();
  // warps' partial tiles summed through shared memory (the ring is free): red[w][MP][BN]
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int f = 0; f < BN / 8; ++f)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * mf + (lane >> 2) + 8 * (q >> 1), col = 8 * f + 2 * (lane & 3) + (q & 1);
        red[(warp * MP + row) * BN + col] = acc[mf][f][q];
      }
  __syncthreads();
  for (int i = tid; i < M * BN; i += NT) {
    const int row = i / BN, col = i % BN;
    if (n0 + col >= N) continue;
    float v = 0.f;
    for (int w = 0; w < NW; ++w) v += red[(w * MP + row) * BN + col];
    if (gridDim.y == 1)
      y[(int64_t)row * N + n0 + col] = __float2bfloat16(v);
    else
      atomicAdd(&y32[(int64_t)row * N + n0 + col], v);
  }
}


// Register-direct main loop (no shared memory in the loop, no barriers): warp w of a block takes K range w of NW,
// for the block's 8 NPW columns; thread (g, t) = (lane / 4, lane % 4) loads 16 bytes of each W row n0 + 8 j + g at
// columns k + 8t .. 8t + 7 of every 32-column step, and the same columns of x's rows g, g + 8 of each 16-row fragment.
// The k order inside a step is permuted the same way for x and W (mma 1 takes 8t..8t+3, mma 2 8t+4..8t+7), which a
// dot product does not see. U steps of loads are issued before their mmas. Warps' partials summed through shared
// memory in warp order.
template <int MF, int NPW, int NW, int U, int MINB>
__global__ void __launch_bounds__(32 * NW, MINB)
rd_kernel(const bf16* __restrict__ x, const bf16* __restrict__ W, bf16* __restrict__ y, int M, int N, int K) {
  constexpr int MP = 16 * MF, BN = 8 * NPW;
  __shared__ float red[NW][MP][BN];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * BN;
  const int kper = K / NW, kbeg = warp * kper;
  float acc[MF][NPW][4];
#pragma unroll
  for (int a = 0; a < MF; ++a)
#pragma unroll
    for (int b = 0; b < NPW; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const bf16* wr[NPW];
#pragma unroll
  for (int j = 0; j < NPW; ++j) wr[j] = W + (int64_t)min(n0 + 8 * j + g, N - 1) * K + kbeg + 8 * t;
  const bf16* xr[MF][2];
  bool xv[MF][2];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * mf + g + 8 * h;
      xv[mf][h] = row < M;
      xr[mf][h] = x + (int64_t)(row < M ? row : 0) * K + kbeg + 8 * t;
    }
  for (int k = 0; k < kper; k += 32 * U) {
    uint4 wv[U][NPW], xq[U][MF][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < NPW; ++j) wv[u][j] = lora_kernels::ld_stream16(wr[j] + k + 32 * u);
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          xq[u][mf][h] = xv[mf][h] ? __ldg(reinterpret_cast<const uint4*>(xr[mf][h] + k + 32 * u)) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) {
        const uint32_t a1[4] = {xq[u][mf][0].x, xq[u][mf][1].x, xq[u][mf][0].y, xq[u][mf][1].y};
        const uint32_t a2[4] = {xq[u][mf][0].z, xq[u][mf][1].z, xq[u][mf][0].w, xq[u][mf][1].w};
#pragma unroll
        for (int j = 0; j < NPW; ++j) {
          mma(acc[mf][j], a1, wv[u][j].x, wv[u][j].y);
          mma(acc[mf][j], a2, wv[u][j].z, wv[u][j].w);
        }
      }
  }
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < NPW; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) red[warp][16 * mf + g + 8 * (q >> 1)][8 * j + 2 * t + (q & 1)] = acc[mf][j][q];
  __syncthreads();
  for (int i = tid; i < M * BN; i += 32 * NW) {
    const int row = i / BN, col = i % BN;
    if (n0 + col >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) v += red[w][row][col];
    y[(int64_t)row * N + n0 + col] = __float2bfloat16(v);
  }
}

// Shared-x main loop (the M = 64 question: the rd kernel's warps each read x's rows from L2 for their own 16 columns,
// 4x W's bytes at M = 64): a block's 16 NW columns share one copy of x's K slice, brought by cp.async in chunks of 4
// steps through an SX_S-slot ring (one barrier per chunk); warp w streams W rows 16 w .. 16 w + 15 straight into mma
// fragments U steps ahead, as rd_kernel does, and reads its x fragments from the ring (the same permuted k order).
// grid (ceil(N / (16 NW)), ks): K split over grid.y, partials added with fp32 atomics (timing only). x is read from L2
// once per 16 NW columns. K % 32 == 0.
constexpr int SX_S = 4, SX_CH = 128, SX_LD = SX_CH + 32;  // slots; chunk columns; row pitch (64 B mod 128: no conflicts)
template <int MF, int NW, int U, int MINB>
__global__ void __launch_bounds__(32 * NW, MINB)
sx_kernel(const bf16* __restrict__ x, const bf16* __restrict__ W, float* __restrict__ y32, int M, int N, int K) {
  constexpr int MP = 16 * MF, BN = 16 * NW;
  static_assert(U == 4 || U == 8, "U divides the 8 steps of two chunks");
  extern __shared__ __align__(16) unsigned char sx_smem[];
  bf16* ring = reinterpret_cast<bf16*>(sx_smem);  // [SX_S][MP][SX_LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * BN, ks = gridDim.y, steps = K / 32;
  const int s0 = (int)((int64_t)steps * blockIdx.y / ks), ns = (int)((int64_t)steps * (blockIdx.y + 1) / ks) - s0;
  const int64_t k0 = (int64_t)s0 * 32;
  const int nch = (ns + 3) / 4;
  auto issue = [&](int c) {
    if (c < nch) {
      bf16* slot = ring + (c % SX_S) * MP * SX_LD;
      for (int i = tid; i < M * (SX_CH / 8); i += 32 * NW) {  // rows past M are never written: their outputs are dropped
        const int row = i / (SX_CH / 8), col = (i % (SX_CH / 8)) * 8;
        if (c * SX_CH + col < ns * 32) cp16(slot + row * SX_LD + col, x + (int64_t)row * K + k0 + c * SX_CH + col);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  const bf16* wr[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) wr[j] = W + (int64_t)min(n0 + 16 * warp + 8 * j + g, N - 1) * K + k0 + 8 * t;
  uint4 wv[U][2];
  auto load_w = [&](uint4 (&w)[2], int s) {
    if (s < ns) {
#pragma unroll
      for (int j = 0; j < 2; ++j) w[j] = lora_kernels::ld_stream16(wr[j] + (int64_t)s * 32);
    }
  };
#pragma unroll
  for (int u = 0; u < U; ++u) load_w(wv[u], u);
  float acc[MF][2][4];
#pragma unroll
  for (int a = 0; a < MF; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
  for (int c = 0; c < SX_S - 1; ++c) issue(c);
  for (int c2 = 0; c2 < nch; c2 += 2) {  // two chunks per iteration: the window index (8 steps) is static
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int c = c2 + h2;
      if (c >= nch) break;
      asm volatile("cp.async.wait_group %0;\n" ::"n"(SX_S - 2) : "memory");
      __syncthreads();
      issue(c + SX_S - 1);
      const bf16* slot = ring + (c % SX_S) * MP * SX_LD;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int s = 4 * c + q, wi = (4 * h2 + q) % U;
        if (s < ns) {
#pragma unroll
          for (int mf = 0; mf < MF; ++mf) {
            uint4 xr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h)
              xr[h] = *reinterpret_cast<const uint4*>(slot + (16 * mf + g + 8 * h) * SX_LD + 32 * q + 8 * t);
            const uint32_t a1[4] = {xr[0].x, xr[1].x, xr[0].y, xr[1].y};
            const uint32_t a2[4] = {xr[0].z, xr[1].z, xr[0].w, xr[1].w};
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              mma(acc[mf][j], a1, wv[wi][j].x, wv[wi][j].y);
              mma(acc[mf][j], a2, wv[wi][j].z, wv[wi][j].w);
            }
          }
        }
        load_w(wv[wi], s + U);
      }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * mf + g + 8 * (q >> 1), col = n0 + 16 * warp + 8 * j + 2 * t + (q & 1);
        if (row < M && col < N) atomicAdd(&y32[(int64_t)row * N + col], acc[mf][j][q]);
      }
}

// ------------------------------------------------------------------------------------------------ data, reference
__global__ void fill(bf16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    p[i] = __float2bfloat16(((h & 0xffffff) / 16777216.f - 0.5f) * scale);
  }
}
__global__ void fillf(float* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    p[i] = ((h & 0xffffff) / 16777216.f - 0.5f) * scale;
  }
}
__global__ void ref_kernel(const bf16* x, const bf16* W, float* y, int M, int N, int K) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += __bfloat162float(x[(int64_t)m * K + k]) * __bfloat162float(W[(int64_t)n * K + k]);
  y[(int64_t)m * N + n] = s;
}
// u = s x A^T (fp32), then y += u B^T: the real kernel's reference on top of ref_kernel's x W^T
__global__ void ref_u(const bf16* x, const float* A, float* u, int M, int K, int r, float s) {
  const int j = threadIdx.x, m = blockIdx.x;
  if (j >= r) return;
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += __bfloat162float(x[(int64_t)m * K + k]) * A[(int64_t)j * K + k];
  u[m * r + j] = s * acc;
}
__global__ void ref_lora(const float* u, const float* B, float* y, int M, int N, int r) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  float acc = 0.f;
  for (int j = 0; j < r; ++j) acc += u[m * r + j] * B[(int64_t)n * r + j];
  y[(int64_t)m * N + n] += acc;
}

// ------------------------------------------------------------------------------------------------ timing
struct Problem {
  int M, N, K;
  static constexpr int kSets = 3;
  bf16 *x, *W[kSets], *y;
  float *y32, *yref, *A, *B, *u;
};


float max_err(const Problem& p, bool from32) {
  std::vector<float> ref((size_t)p.M * p.N), got((size_t)p.M * p.N);
  CK(cudaMemcpy(ref.data(), p.yref, ref.size() * 4, cudaMemcpyDeviceToHost));
  if (from32) {
    CK(cudaMemcpy(got.data(), p.y32, got.size() * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<bf16> g(got.size());
    CK(cudaMemcpy(g.data(), p.y, g.size() * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < g.size(); ++i) got[i] = __bfloat162float(g[i]);
  }
  float e = 0.f, mag = 0.f;
  for (size_t i = 0; i < got.size(); ++i) {
    e = std::max(e, std::fabs(got[i] - ref[i]));
    mag = std::max(mag, std::fabs(ref[i]));
  }
  return e / (mag > 0 ? mag : 1.f);
}

// GPU time of a launch that zeroes p.y32 first (the K-split variants add into it with atomics): the memset is timed
// alone and subtracted.
float time_minus_zeroing(const std::function<void(int)>& launch, const Problem& p, cudaStream_t st) {
  const float ms_only = time_it([&](int) { CK(cudaMemsetAsync(p.y32, 0, (size_t)p.M * p.N * 4, st)); }, st);
  return time_it(launch, st) - ms_only;
}

template <int MF, int BN, int KC, int S, int NW, bool TMA, int MINB>
void run_variant(Problem& p, cudaStream_t st, float floor_us, int ksplit) {
  using L = MainLoop<MF, BN, KC, S, NW, TMA>;
  auto kern = mm_kernel<MF, BN, KC, S, NW, TMA, MINB>;
  if (p.M > L::MP || p.K % (KC * ksplit) != 0) return;
  const size_t red_bytes = (size_t)NW * L::MP * BN * 4;
  const size_t smem = std::max(L::kSmem, red_bytes);
  if (smem > 227 * 1024) return;
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 32 * NW, smem));
  dim3 grid((p.N + BN - 1) / BN, ksplit);
  auto launch = [&](int i) {
    if (ksplit > 1) CK(cudaMemsetAsync(p.y32, 0, (size_t)p.M * p.N * 4, st));
    kern<<<grid, 32 * NW, smem, st>>>(p.x, p.W[i % Problem::kSets], p.y, p.y32, p.M, p.N, p.K);
  };
  // correctness on set 0 (the reference's W)
  CK(cudaMemsetAsync(p.y, 0xff, (size_t)p.M * p.N * 2, st));
  launch(0);
  CK(cudaStreamSynchronize(st));
  CK(cudaGetLastError());
  const float err = max_err(p, ksplit > 1);
  const float us = ksplit > 1 ? time_minus_zeroing(launch, p, st) : time_it(launch, st);
  const double gbs = (double)p.N * p.K * 2 / (us * 1e3);
  printf("  %-4s MF=%d BN=%-3d KC=%-3d S=%d NW=%d minB=%d ks=%d  blocks=%-5d per_sm=%d  %7.2f us  %5.3fx  W %6.0f GB/s  "
         "err %.1e%s\n",
         TMA ? "tma" : "cp", MF, BN, KC, S, NW, MINB, ksplit, grid.x * grid.y, per_sm, us, us / floor_us, gbs, err,
         err > 2e-2 ? "  WRONG" : "");
}

template <int MF, int NPW, int NW, int U, int MINB>
void run_rd(Problem& p, cudaStream_t st, float floor_us) {
  auto kern = rd_kernel<MF, NPW, NW, U, MINB>;
  if (p.M > 16 * MF || p.K % (NW * 32 * U) != 0) return;
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 32 * NW, 0));
  dim3 grid((p.N + 8 * NPW - 1) / (8 * NPW));
  auto launch = [&](int i) { kern<<<grid, 32 * NW, 0, st>>>(p.x, p.W[i % Problem::kSets], p.y, p.M, p.N, p.K); };
  CK(cudaMemsetAsync(p.y, 0xff, (size_t)p.M * p.N * 2, st));
  launch(0);
  CK(cudaStreamSynchronize(st));
  CK(cudaGetLastError());
  const float err = max_err(p, false);
  const float us = time_it(launch, st);
  printf("  rd   MF=%d NPW=%d NW=%-2d U=%-2d minB=%d  blocks=%-5d per_sm=%d  %7.2f us  %5.3fx  W %6.0f GB/s  err %.1e%s\n",
         MF, NPW, NW, U, MINB, grid.x, per_sm, us, us / floor_us, (double)p.N * p.K * 2 / (us * 1e3), err,
         err > 2e-2 ? "  WRONG" : "");
}

template <int MF, int NW, int U, int MINB>
void run_sx(Problem& p, cudaStream_t st, float floor_us, int ks) {
  auto kern = sx_kernel<MF, NW, U, MINB>;
  if ((p.M <= 16 ? 1 : p.M <= 32 ? 2 : 4) != MF || p.K % 32 != 0 || ks > p.K / 32) return;  // the MF of M
  const size_t smem = (size_t)SX_S * 16 * MF * SX_LD * 2;
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 32 * NW, smem));
  const dim3 grid((p.N + 16 * NW - 1) / (16 * NW), ks);
  auto launch = [&](int i) {
    CK(cudaMemsetAsync(p.y32, 0, (size_t)p.M * p.N * 4, st));
    kern<<<grid, 32 * NW, smem, st>>>(p.x, p.W[i % Problem::kSets], p.y32, p.M, p.N, p.K);
  };
  CK(cudaMemsetAsync(p.y32, 0xff, (size_t)p.M * p.N * 4, st));
  launch(0);
  CK(cudaStreamSynchronize(st));
  CK(cudaGetLastError());
  const float err = max_err(p, true);
  const float us = time_minus_zeroing(launch, p, st);
  printf("  sx   MF=%d NW=%d U=%d minB=%d ks=%d  blocks=%-5d per_sm=%d  %7.2f us  %5.3fx  W %6.0f GB/s  err %.1e%s\n", MF,
         NW, U, MINB, ks, grid.x * grid.y, per_sm, us, us / floor_us, (double)p.N * p.K * 2 / (us * 1e3), err,
         err > 2e-2 ? "  WRONG" : "");
}

}  // namespace smb
using namespace smb;

// The library's register-direct kernel (MF = 1, 2 or 4 by M) with DBG parts left out (DBG = 0: the whole kernel),
// bf16 x, fp32 adapters.
template <int DBG>
void run_rd_dbg(Problem& p, cudaStream_t st, float floor_us, int r, const char* what) {
  using namespace lora_kernels;
  unsigned* sync = small_m_sync(st);
  const int n_items = rd_items(p.M, r);
  auto go = [&](auto mfc) {
    constexpr int MF = decltype(mfc)::value;
    auto kern = lora_small_m_rd_kernel<bf16, float, MF, DBG>;
    const size_t smem = RdTile<MF>::smem(r);
    const int64_t tiles = (p.N + RdTile<MF>::BN - 1) / RdTile<MF>::BN;
    const int item_blocks = rd_item_blocks(
        n_items, tiles, (int64_t)detail::resident_blocks(reinterpret_cast<const void*>(kern), RD_NW * 32, smem) * num_sms());
    const dim3 grid((unsigned)(item_blocks + tiles));
    auto launch = [&](int i) {
      kern<<<grid, RD_NW * 32, smem, st>>>(p.x, p.W[i % Problem::kSets], nullptr, p.A, p.B, 1, p.y, p.u, sync, p.M,
                                            p.N, p.K, r, 2.f, RdDropout{0.f, 0, nullptr, 0}, n_items, item_blocks);
    };
    launch(0);
    CK(cudaStreamSynchronize(st));
    CK(cudaGetLastError());
    const float us = time_it(launch, st);
    printf("  small_m.cu rd kernel DBG=%d (%-20s)                %7.2f us  %5.3fx\n", DBG, what, us, us / floor_us);
  };
  if (p.M <= 16)
    go(std::integral_constant<int, 1>{});
  else if (p.M <= 32)
    go(std::integral_constant<int, 2>{});
  else
    go(std::integral_constant<int, 4>{});
}

int main() {
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    printf("cublasCreate failed\n");
    return 1;
  }
  cublasSetStream(h, st);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  const int shapes[][2] = {{4096, 4096}, {4096, 14336}};  // K, N
  const int Ms[] = {1, 16, 64};
  const int r = 16;
  for (auto& sh : shapes)
    for (int M : Ms) {
      Problem p;
      p.M = M;
      p.K = sh[0];
      p.N = sh[1];
      const int64_t nw = (int64_t)p.N * p.K;
      CK(cudaMalloc(&p.x, (size_t)M * p.K * 2));
      for (auto& w : p.W) CK(cudaMalloc(&w, nw * 2));
      CK(cudaMalloc(&p.y, (size_t)M * p.N * 2));
      CK(cudaMalloc(&p.y32, (size_t)M * p.N * 4));
      CK(cudaMalloc(&p.yref, (size_t)M * p.N * 4));
      CK(cudaMalloc(&p.A, (size_t)r * p.K * 4));
      CK(cudaMalloc(&p.B, (size_t)p.N * r * 4));
      CK(cudaMalloc(&p.u, (size_t)M * r * 4));
      fill<<<1024, 256, 0, st>>>(p.x, (int64_t)M * p.K, 1u, 2.f);
      for (int i = 0; i < Problem::kSets; ++i) fill<<<1024, 256, 0, st>>>(p.W[i], nw, 7u + i, 0.1f);
      fillf<<<64, 256, 0, st>>>(p.A, (int64_t)r * p.K, 3u, 0.05f);
      fillf<<<64, 256, 0, st>>>(p.B, (int64_t)p.N * r, 5u, 0.05f);
      ref_kernel<<<dim3((p.N + 127) / 128, M), 128, 0, st>>>(p.x, p.W[0], p.yref, M, p.N, p.K);
      CK(cudaStreamSynchronize(st));
      printf("\nM=%d K=%d N=%d (W %.1f MB)\n", M, p.K, p.N, nw * 2 / 1e6);
      const float one = 1.f, zero = 0.f;
      auto cublas = [&](int i) {
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, p.N, M, p.K, &one, p.W[i % Problem::kSets], CUDA_R_16BF, p.K, p.x,
                     CUDA_R_16BF, p.K, &zero, p.y, CUDA_R_16BF, p.N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      };
      cublas(0);
      CK(cudaStreamSynchronize(st));
      const float cerr = max_err(p, false);
      const float floor_us = time_it(cublas, st);
      printf("  cublas                                                          %7.2f us  1.000x  W %6.0f GB/s  err %.1e\n",
             floor_us, (double)nw * 2 / (floor_us * 1e3), cerr);
      // the one-launch kernel with its LoRA term: checked against ref_u / ref_lora, then timed
      float* uref;
      CK(cudaMalloc(&uref, (size_t)M * r * 4));
      ref_u<<<M, 32, 0, st>>>(p.x, p.A, uref, M, p.K, r, 2.f);
      ref_lora<<<dim3((p.N + 127) / 128, M), 128, 0, st>>>(uref, p.B, p.yref, M, p.N, r);
      auto real_launch = [&](int i) {
        CK(lora_kernels::launch_lora_small_m_forward(p.x, lora_kernels::DType::kBFloat16, p.W[i % Problem::kSets],
                                                     nullptr, p.A, lora_kernels::DType::kFloat32, p.B,
                                                     lora_kernels::DType::kFloat32, p.y, p.u, M, p.N, p.K, r, 2.f,
                                                     0.f, 0, nullptr, 0, st));
      };
      CK(cudaMemsetAsync(p.y, 0xff, (size_t)M * p.N * 2, st));
      CK(cudaMemsetAsync(p.u, 0xff, (size_t)M * r * 4, st));
      real_launch(0);
      CK(cudaStreamSynchronize(st));
      const float yerr = max_err(p, false);
      std::vector<float> ug((size_t)M * r), ur((size_t)M * r);
      CK(cudaMemcpy(ug.data(), p.u, ug.size() * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(ur.data(), uref, ur.size() * 4, cudaMemcpyDeviceToHost));
      float uerr = 0.f, umag = 0.f;
      for (size_t i = 0; i < ug.size(); ++i) {
        uerr = std::max(uerr, std::fabs(ug[i] - ur[i]));  // NaN (unwritten) fails the check below
        if (!(ug[i] == ug[i])) uerr = 1e30f;
        umag = std::max(umag, std::fabs(ur[i]));
      }
      const float real = time_it(real_launch, st);
      printf("  small_m.cu (with the LoRA term, r=16, fp32 adapters)            %7.2f us  %5.3fx  y err %.1e  u err %.1e%s\n",
             real, real / floor_us, yerr, uerr / umag, (yerr > 2e-2 || uerr / umag > 1e-4) ? "  WRONG" : "");
      cudaFree(uref);
      // the same kernel with parts left out (DBG bits; wrong results, timing only): where its LoRA term's time goes
      run_rd_dbg<0>(p, st, floor_us, r, "the whole kernel");
      if (M <= 32) {
        run_rd_dbg<1>(p, st, floor_us, r, "no u items, no wait");
        run_rd_dbg<2>(p, st, floor_us, r, "no LoRA epilogue");
        run_rd_dbg<3>(p, st, floor_us, r, "neither");
      }
      ref_kernel<<<dim3((p.N + 127) / 128, M), 128, 0, st>>>(p.x, p.W[0], p.yref, M, p.N, p.K);
      // register-direct main loop alone (no LoRA term), the kernel's M = 1, 16 tile and its M = 64 one
      run_rd<1, 1, 8, 8, 2>(p, st, floor_us);
      run_rd<1, 2, 8, 8, 2>(p, st, floor_us);
      run_rd<2, 2, 8, 4, 2>(p, st, floor_us);
      run_rd<4, 2, 8, 2, 2>(p, st, floor_us);
      // shared-x main loop (no LoRA term): x once per 128 (NW = 8) or 64 (NW = 4) columns, K split over ks blocks
      for (int ks : {1, 2, 4, 8}) {
        run_sx<1, 8, 8, 2>(p, st, floor_us, ks);
        run_sx<2, 8, 8, 2>(p, st, floor_us, ks);
        run_sx<4, 8, 4, 2>(p, st, floor_us, ks);
        run_sx<4, 4, 8, 2>(p, st, floor_us, ks);
      }
      cudaFree(p.x);
      for (auto& w : p.W) cudaFree(w);
      cudaFree(p.y);
      cudaFree(p.y32);
      cudaFree(p.yref);
      cudaFree(p.A);
      cudaFree(p.B);
      cudaFree(p.u);
    }
  return 0;
}
