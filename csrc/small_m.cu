// Small-M forward in one launch: y = x W^T + bias + u B^T with u = scaling / (1 - p) * dropout_mask(x) A^T, for
// M <= 64 rows (decoding, small batches, evaluation; dropout on the register-direct kernel only). The usual forward
// (shrink with a K split, pack, GEMM) is three or four launches of kernels that each take a few microseconds of
// launch and tail time for a few microseconds of work; here W, the only large operand, is streamed once by one
// launch.
// Kernels: the register-direct tensor-core kernel (16-bit x with 16-byte aligned rows: lora_small_m_rd_kernel,
// described at its definition), the ring tensor-core kernel below (16-bit x otherwise, sm_80+), the FFMA kernel
// (fp32 x); launch_lora_small_m_forward picks one, and lora_small_m_unsupported says why a call does not come here.
// On Hopper it takes the wgmma kernel of small_m_sm90.cu first, where that one runs (p = 0, 16-bit adapters).
// The Math / Grid / Tiling / Bytes notes below are the ring kernel's.
//
// Math   : block b owns BN (16 or 32) columns of y and all M rows:
//            acc_y = x W[cols]^T                                   (tensor cores, fp32 accumulation)
//            y[:, cols] = round(acc_y + u B[cols]^T + bias[cols])  (fp32, one rounding of y)
//          u (M x r, fp32, saved for backward) is computed once for the whole grid, not per block: its elements come
//          in items of 4, each item an fp32 dot product over all of K computed by a whole block (compute_item: a
//          fixed summation order wherever it runs, so the result is deterministic). The first blocks to start claim
//          the items (about one each) and compute them while the first chunks of their W tile are landing. Every
//          block needs all of u for its epilogue, so it waits there until every item is done (normally long done).
// Grid   : why the wait cannot hang: an item is claimed only by a running block, which never waits before it has
//          finished its item; a block that reaches its epilogue with items still unclaimed (fewer tiles than
//          items, or blocks not yet resident) claims and computes them itself (x and A from global memory, same
//          order). The claim / done / exit counters live in a small per-stream buffer (small_m_sync); the last block
//          to leave resets them, so the next launch on the stream (or the next replay of a captured graph) starts
//          from zero. Launches on one stream never overlap, so one buffer per stream is enough.
// Tiling : 256 threads, 8 warps, two blocks per SM. K in SMM_KC (128)-column chunks through an S-slot cp.async ring
//          (S from 4 to 8: as many as fit in about 110 KB, the bytes of W in flight decide the read rate), a slot
//          holding the x chunk (MP = M rounded up to 16, 32 or 64 rows) and the W chunk (BN rows). Warp w takes
//          k16-step w of every chunk (an in-block K split: each fragment is read from shared memory once) for the
//          whole MP x BN tile; the 8 warps' partial tiles are summed in warp order through shared memory at the end
//          (deterministic), then u and the B tile are staged and each thread writes its column of y.
// Bytes  : W once (N*K*2), y once, x (M*K*2) from L2 once per block, A (r*K) once in all, B once.
// Limits : M <= 64; r <= 64 (fp32 x, the FFMA kernel: M * r <= 2048); dropout only on the register-direct kernel,
//          where only the u items read x through the mask (x W^T takes x unmasked). This kernel and the FFMA one
//          take no dropout: there every block would mask its own copy of x, which took 1.3-6.1x the unfused
//          forward's wall time on the H200 (M = 1, 16 and 64). lora_small_m_unsupported says why a call does not
//          come here.
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

#include <climits>
#include <utility>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kSmallMMaxM = 64;
constexpr int kSmallMMaxR = 64;

constexpr int SMM_KC = 128;             // K chunk: one k16 step per warp
constexpr int SMM_LD = SMM_KC + 8;      // shared-memory row pitch (elements): 16-byte rows, conflict-free ldmatrix
constexpr int SMM_ITEM = 4;             // u elements per item
constexpr size_t SMM_RING_BYTES = 110 * 1024;  // ring budget per block: two blocks per SM on sm_90 (227 KB)
static_assert(SMM_KC == 16 * (kTcThreads / 32), "one k16 step per warp and chunk");
static_assert(SMM_KC == 4 * 32, "four columns per lane and chunk (the u dot products)");
static_assert(SMM_ITEM <= kTcThreads / 32 * 32, "one thread per element sums the warps");

// Row fragments (16 rows each) of the M rows: 1, 2 or 4 (M in 33..48 is padded to 64).
inline int small_m_frags(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// Ring slots and bytes of the tensor-core kernel for MF row fragments and BN columns.
__host__ __device__ constexpr size_t small_m_slot_bytes(int mf, int bn) { return (size_t)(16 * mf + bn) * SMM_LD * 2; }
__host__ __device__ constexpr int small_m_stages(int mf, int bn) {
  return SMM_RING_BYTES / small_m_slot_bytes(mf, bn) > 8 ? 8 : (int)(SMM_RING_BYTES / small_m_slot_bytes(mf, bn));
}
__host__ __device__ constexpr size_t small_m_smem(int mf, int bn) {
  return small_m_stages(mf, bn) * small_m_slot_bytes(mf, bn);
}
static_assert(small_m_stages(4, 32) >= 4, "at least four ring slots in every configuration");
// After the main loop the ring holds the warps' reduction tile, u and the B tile.
static_assert(small_m_smem(4, 32) >= (64 * 33 + 64 * 64 + 32 * 65) * 4, "epilogue buffers fit in the ring");
static_assert(small_m_smem(1, 16) >= (16 * 17 + 64 * 64 + 16 * 65) * 4, "epilogue buffers fit in the ring");

// The claim / done / exit counters of the current device's `stream` (three uint32, zero between launches;
// stream_counters). nullptr when the allocation fails.
unsigned* small_m_sync(cudaStream_t stream) {
  return static_cast<unsigned*>(stream_counters(stream, StreamCounters::kSmallM, 4 * sizeof(unsigned)));
}

#if LK_TC_ARCH
__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A block's exit, in two halves. arrive_small_m_sync: thread 0 counts the block out (its ticket) once the block will
// not read the claim / done counters again; finish_small_m_sync: the block that arrived last (every other block is
// past its last read) resets the claim / done / exit counters for the next launch on this stream (or the next replay
// of a captured graph). The register-direct kernel arrives right after its wait for u, so that the atomic's round
// trip overlaps its epilogue; leave_small_m_sync does both at the end, after a barrier.
__device__ __forceinline__ unsigned arrive_small_m_sync(unsigned* sync) {
  return threadIdx.x == 0 ? atomicAdd(&sync[2], 1u) : 0u;
}
__device__ __forceinline__ void finish_small_m_sync(unsigned* sync, unsigned ticket) {
  if (threadIdx.x == 0 && ticket == gridDim.x - 1) {
    sync[0] = 0u;
    sync[1] = 0u;
    sync[2] = 0u;
    __threadfence();
  }
}
__device__ __forceinline__ void leave_small_m_sync(unsigned* sync) {
  __syncthreads();
  finish_small_m_sync(sync, arrive_small_m_sync(sync));
}

// A u item's end: every thread's u writes (each fenced by its writer) before thread 0 counts the item done.
__device__ __forceinline__ void mark_item_done(unsigned* sync) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(&sync[1], 1u);
  }
}

// One u item: elements e = item * SMM_ITEM + q (q < SMM_ITEM), at (m, j) = (e / r, e % r), each an fp32 dot
// product over all of K computed by the whole block: warp w takes the 128-column chunks w, w + 8, ..., lane l columns
// 4l..4l+3 of each (in chunk order), the lanes are summed in a fixed tree, the warps in warp order; u = scale * sum.
// The same order wherever the item runs (deterministic). x and A come from global memory (L2), all of one warp's
// loads issued together (their latencies overlap). red: SMM_ITEM * 8 floats of shared memory. Ends with the item
// marked done: a barrier, then one release by thread 0.
template <typename T, typename TA>
__device__ __forceinline__ void compute_item(int item, const T* __restrict__ x, const TA* __restrict__ A,
                                             float* __restrict__ u, unsigned* sync, float* red, int64_t K,
                                             int64_t MR, int r, float scale) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t n_chunks = (K + SMM_KC - 1) / SMM_KC;
  const T* xr[SMM_ITEM];
  const TA* ar[SMM_ITEM];
  bool ok[SMM_ITEM];
  float sum[SMM_ITEM];
#pragma unroll
  for (int q = 0; q < SMM_ITEM; ++q) {
    const int64_t e = (int64_t)item * SMM_ITEM + q;
    ok[q] = e < MR;
    const int64_t m = ok[q] ? e / r : 0, j = ok[q] ? e % r : 0;
    xr[q] = x + m * K;
    ar[q] = A + j * K;
    sum[q] = 0.f;
  }
#pragma unroll 1
  for (int64_t c = warp; c < n_chunks; c += kTcThreads / 32) {
    const int64_t k = c * SMM_KC + 4 * lane;
    const int nv = n_valid(K - k, 4);
    Vec4<T> xv[SMM_ITEM];
    Vec4<TA> av[SMM_ITEM];
#pragma unroll
    for (int q = 0; q < SMM_ITEM; ++q) {
      xv[q] = ld4<T>(xr[q] + k, ok[q] ? nv : 0);
      av[q] = ld4<TA>(ar[q] + k, ok[q] ? nv : 0);
    }
#pragma unroll
    for (int q = 0; q < SMM_ITEM; ++q) {
      float v = sum[q];
#pragma unroll
      for (int i = 0; i < 4; ++i) v = fmaf(to_f<T>(xv[q].e[i]), to_f<TA>(av[q].e[i]), v);
      sum[q] = v;
    }
  }
#pragma unroll
  for (int q = 0; q < SMM_ITEM; ++q) {
    const float v = warp_sum(sum[q]);
    if (lane == 0) red[warp * SMM_ITEM + q] = v;
  }
  __syncthreads();
  if (tid < SMM_ITEM && (int64_t)item * SMM_ITEM + tid < MR) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kTcThreads / 32; ++w) v += red[w * SMM_ITEM + tid];
    u[(int64_t)item * SMM_ITEM + tid] = v * scale;
    __threadfence();
  }
  mark_item_done(sync);
}

#endif  // LK_TC_ARCH

// lora_small_m (tensor cores): see the top of the file. T: x's dtype; TA: A's (float or T); MF: row fragments
// (MP = 16 MF); BN: y columns per block. B is fp32 (b_f32) or T. sync: small_m_sync's counters.
template <typename T, typename TA, int MF, int BN>
__global__ void __launch_bounds__(kTcThreads, 2)
lora_small_m_tc_kernel(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ bias,
                       const TA* __restrict__ A, const void* __restrict__ B_, int b_f32, T* __restrict__ y,
                       float* __restrict__ u_out, unsigned* __restrict__ sync, int64_t M, int64_t N, int64_t K, int r,
                       float scale, int n_items, int items_per_block) {
#if LK_TC_ARCH
  constexpr int MP = 16 * MF, LD = SMM_LD, S = small_m_stages(MF, BN);
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int64_t n0 = (int64_t)blockIdx.x * BN;
  const int64_t n_chunks = (K + SMM_KC - 1) / SMM_KC;
  const int64_t MR = M * (int64_t)r;
  extern __shared__ __align__(128) unsigned char lk_smem[];
  __shared__ int claimed;
  __shared__ float red_item[SMM_ITEM * (kTcThreads / 32)];
  T* const ring = reinterpret_cast<T*>(lk_smem);
  // One ring slot: x [MP][LD] | W [BN][LD].
  constexpr int kW = MP * LD, slot_elems = (MP + BN) * LD;
  auto slot = [&](int64_t t) { return ring + (int)(t % S) * slot_elems; };

  // cp.async of chunk t: x (MF 8-groups per thread) and W (BN / 16). Rows past M or N and columns past K read as
  // zeros.
  auto issue = [&](int64_t t) {
    T* s = slot(t);
    const int64_t k0 = t * SMM_KC;
#pragma unroll
    for (int i = 0; i < MF; ++i) {
      const int g = tid + i * kTcThreads, row = g / (SMM_KC / 8), col = g % (SMM_KC / 8) * 8;
      copy8_async<T>(s + row * LD + col, x + row * K + k0 + col, row < M ? n_valid(K - k0 - col, 8) : 0);
    }
#pragma unroll
    for (int i = 0; i < BN / 16; ++i) {
      const int g = tid + i * kTcThreads, row = g / (SMM_KC / 8), col = g % (SMM_KC / 8) * 8;
      copy8_async<T>(s + kW + row * LD + col, W + (n0 + row) * K + k0 + col,
                     n0 + row < N ? n_valid(K - k0 - col, 8) : 0);
    }
  };

  float acc[MF][BN / 8][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) zero_acc(acc[mf]);

  // Pipeline (one barrier per chunk): chunks 0 .. S-2 in flight.
#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    if (t < n_chunks) issue(t);
    cp_async_commit();
  }
  // While they land: this block's share of the u items (claimed: the first blocks to run take them).
  for (int64_t i = 0; i < items_per_block; ++i) {
    if (tid == 0) claimed = (int)atomicAdd(&sync[0], 1u);
    __syncthreads();
    const int it = claimed;
    __syncthreads();
    if (it >= n_items) break;
    compute_item<T, TA>(it, x, A, u_out, sync, red_item, K, MR, r, scale);
  }
  for (int64_t t = 0; t < n_chunks; ++t) {
    cp_async_wait<S - 2>();
    __syncthreads();  // chunk t complete; chunk t-1's slot free
    if (t + S - 1 < n_chunks) issue(t + S - 1);
    cp_async_commit();
    const T* s = slot(t);
    const int kk = 16 * warp;
    uint32_t xa[MF][4];
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) ldsm4(xa[mf], s + (16 * mf + lo.r1) * LD + kk + lo.c1);
#pragma unroll
    for (int f = 0; f < BN / 16; ++f) {
      uint32_t wb[4];
      ldsm4(wb, s + kW + (16 * f + lo.r2) * LD + kk + lo.c2);
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) mma16816x2<T>(acc[mf][2 * f], acc[mf][2 * f + 1], xa[mf], wb);
    }
  }
  cp_async_wait<0>();

  // Items nobody claimed yet: claimed and computed here, x and A from global memory, in the same order.
  for (;;) {
    __syncthreads();
    if (tid == 0) claimed = (int)atomicAdd(&sync[0], 1u);
    __syncthreads();
    const int it = claimed;
    if (it >= n_items) break;
    compute_item<T, TA>(it, x, A, u_out, sync, red_item, K, MR, r, scale);
  }

  // The warps' partial tiles summed in warp order (warp 0 writes, warps 1..7 add): red_y [MP][BN+1].
  constexpr int LDY = BN + 1;
  float* red_y = reinterpret_cast<float*>(lk_smem);
  float* us = red_y + MP * LDY;  // u [M][r] (scaled), then the B tile [BN][r+1]
  float* bs = us + kSmallMMaxM * kSmallMMaxR;
  for (int w = 0; w < kTcThreads / 32; ++w) {
    if (warp == w) {
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int row = 16 * mf + lo.g + 8 * (q >> 1), col = 2 * lo.t + (q & 1);
#pragma unroll
          for (int f = 0; f < BN / 8; ++f) {
            float& d = red_y[row * LDY + 8 * f + col];
            d = w == 0 ? acc[mf][f][q] : d + acc[mf][f][q];
          }
        }
    }
    __syncthreads();
  }
  // B tile (fp32) while u is finished elsewhere.
  for (int i = tid; i < BN * r; i += kTcThreads) {
    const int c = i / r, j = i % r;
    const int64_t n = n0 + c;
    float b = 0.f;
    if (n < N) b = b_f32 ? static_cast<const float*>(B_)[n * r + j] : to_f<T>(static_cast<const T*>(B_)[n * r + j]);
    bs[c * (r + 1) + j] = b;
  }
  // Wait until every item is done (acquire), then u from L2.
  if (tid == 0) {
    while (ld_acquire_gpu(&sync[1]) < (unsigned)n_items) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
  for (int64_t i = tid; i < MR; i += kTcThreads) us[i] = __ldcg(u_out + i);
  __syncthreads();

  // Epilogue: thread (column c = tid % BN, row phase tid / BN): y = acc_y + u B^T + bias, rounded once.
  constexpr int P = kTcThreads / BN;
  const int c = tid % BN;
  const int64_t n = n0 + c;
  if (n < N) {
    const float bv = bias != nullptr ? to_f<T>(bias[n]) : 0.f;
    const float* bc = bs + c * (r + 1);
    for (int m = tid / BN; m < M; m += P) {
      float v = red_y[m * LDY + c];
      const float* um = us + m * r;
      float lora = 0.f;
      for (int j = 0; j < r; ++j) lora = fmaf(um[j], bc[j], lora);
      y[m * N + n] = from_f<T>(v + lora + bv);
    }
  }

  leave_small_m_sync(sync);
#else
  __trap();
#endif
}


// ---------------------------------------------------------------------------------------------------------------
// lora_small_m_rd (tensor cores, W straight into registers): the kernel for 16-bit x whose x, W and A rows are
// 16-byte aligned (K % 8 == 0); the ring kernel above takes the rest. Same math, same u; another schedule:
// Grid   : item blocks first, then one block per y tile. u comes in items of RD_ITEM_ROWS rows of x by RD_ITEM_COLS
//          rows of A (fp32 FFMA over all of K: rd_u_item), claimed through sync[0] by the item blocks (one per item
//          up to half the SM count, fewer where that keeps the grid in one wave: rd_item_blocks; the lowest block
//          indices, so they start first; no tile of their own). A block
//          that computed an item before its own tile would put the item's time (7-9 us on the H200, round trips to
//          HBM under load) on the kernel's critical path: its tile then ended last (bench/dev/small_m_bench.cu). A
//          tile block that reaches its epilogue while an item is unclaimed (item blocks not yet resident) claims
//          and computes it; a claimed item is held by a running block that never waits, so the tiles' wait for u
//          (sync[1] == n_items) cannot hang, whatever order the blocks start in. A persistent grid (blocks taking
//          tiles in turn) was slower: a block restarted its loads after each tile's epilogue.
// Tile   : BN = 8 NPW columns of y, all M rows. Warp w takes 32-column K steps [w S / NW, (w+1) S / NW) of the
//          S = ceil(K / 32); thread (g, t) = (lane / 4, lane % 4) loads 16 bytes of W row n0 + 8 j + g (j < NPW) at
//          columns k + 8t .. k + 8t + 7 of each step, and the same columns of x's rows g and g + 8 of each 16-row
//          fragment, straight into mma fragments: the k order inside a step is permuted alike for x and W (mma 1
//          takes columns 8t .. 8t+3, mma 2 8t+4 .. 8t+7), which the dot product does not see. U steps of loads are
//          issued before their mmas; no shared memory and no barrier in the loop. On the H200 this streamed W at
//          0.86-0.97x cuBLAS's GEMM time at M = 1 (bench/dev/small_m_bench.cu), where the ring kernel took 1.7x.
// Epilog : the warps' partial tiles are summed in warp order through shared memory; then u (from the items, L2,
//          once per block), the B tile (loaded into registers before the main loop) and bias:
//          y = round(acc + u B^T + bias).
// Dropout: only u reads x through the mask (the LoRA path's dropout; x W^T takes x as it is), so the item blocks
//          apply the contract's Philox mask to their x vectors (one Philox call per 8-group, K % 8 == 0 here) and
//          the scale is s / (1 - p); the tiles do not change.
constexpr int RD_NW = 8;           // warps per block
constexpr int RD_ITEM_ROWS = 4;    // x rows per u item
constexpr int RD_ITEM_COLS = 4;    // A rows (u columns) per u item: short items (a quarter of A at r = 16)

template <int MF>
struct RdTile {
  static constexpr int NPW = 2;                            // n8 column groups per warp
  static constexpr int U = MF == 1 ? 8 : MF == 2 ? 4 : 2;  // K steps of loads in flight per warp
  static constexpr int BN = 8 * NPW, MP = 16 * MF;
  // dynamic shared memory: warps' partial tiles [NW][MP][BN], u [M][r], B tile [BN][r + 1], bias [BN]
  static constexpr size_t smem(int r) {
    return (size_t)(RD_NW * MP * BN + kSmallMMaxM * r + BN * (r + 1) + BN) * sizeof(float);
  }
};

// Dropout of the u items (x masked by the contract's Philox mask; p = 0: none).
struct RdDropout {
  float p;
  uint64_t seed;
  const int64_t* seed_ptr;  // the graph-safe device seed when not null (dropout_seed)
  uint64_t offset;
};

inline int rd_items(int64_t M, int r) {
  return (int)(ceil_div(M, RD_ITEM_ROWS) * ceil_div(r, RD_ITEM_COLS));
}

// Item blocks: one per item, at most half as many as SMs (each claims items until none is left). Where the tiles fit
// one wave of resident blocks but the item blocks would push some past it, the item blocks take only the slots the
// tiles leave free, as long as that is at most two items each: a block past the wave starts only when one of the
// wave ends, which adds a tile's time to the kernel. (H200, M = 16, 4096 -> 4096, r = 16: 256 tiles and 16 item
// blocks on 264 slots took 22.6 us, without the items 15.0 us, standalone; in the layer the cap took the forward from
// 21.6 to 19.1 us at p = 0, 22.3 to 20.7 at p = 0.1: bench/results/h200_2026-12-04/session32.)
inline int rd_item_blocks(int n_items, int64_t tiles, int64_t slots) {
  int blocks = std::min(n_items, std::max(1, num_sms() / 2));
  const int64_t left = slots - tiles;
  if (tiles + blocks > slots && left >= 1 && ceil_div(n_items, left) <= 2) blocks = (int)left;
  return blocks;
}

#if LK_TC_ARCH
// 8 consecutive elements at p (16-byte aligned) -> fp32.
template <typename T>
__device__ __forceinline__ void load8f(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    union { uint4 u; T e[8]; } t;
    t.u = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f<T>(t.e[i]);
  }
}

// u item `item`: u[m][j] = scale * sum_k x[m][k] A[j][k] for rows m of the item's RD_ITEM_ROWS and columns j of its
// RD_ITEM_COLS, fp32 FFMA. Thread tid takes the 8-column vectors tid, tid + 256, ... of K; the threads' sums are
// added in a fixed tree (lanes by shuffles, then warps in order): deterministic. Ends with the item counted done.
template <typename T, typename TA>
__device__ void rd_u_item(int item, const T* __restrict__ x, const TA* __restrict__ A, float* __restrict__ u,
                          unsigned* sync, float* red, int64_t M, int64_t K, int r, float scale, RdDropout drop) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool masked = drop.p > 0.f;
  const uint64_t seed = masked ? dropout_seed(drop.seed, drop.seed_ptr) : 0;
  const uint32_t thr = dropout_threshold(drop.p);
  const int col_groups = (r + RD_ITEM_COLS - 1) / RD_ITEM_COLS;
  const int64_t m0 = (int64_t)(item / col_groups) * RD_ITEM_ROWS;
  const int j0 = (item % col_groups) * RD_ITEM_COLS;
  float acc[RD_ITEM_ROWS][RD_ITEM_COLS];
#pragma unroll
  for (int i = 0; i < RD_ITEM_ROWS; ++i)
#pragma unroll
    for (int j = 0; j < RD_ITEM_COLS; ++j) acc[i][j] = 0.f;
#pragma unroll 2  // two K steps' loads in flight (K = 4096 is two steps): one round trip to memory, not two
  for (int64_t k = 8 * (int64_t)tid; k < K; k += 8 * RD_NW * 32) {
    float xv[RD_ITEM_ROWS][8];
#pragma unroll
    for (int i = 0; i < RD_ITEM_ROWS; ++i) {
      if (m0 + i < M) {
        load8f<T>(x + (m0 + i) * K + k, xv[i]);
        if (masked) {  // k is a multiple of 8: one Philox call for the 8-group (a dropped element times 0, as x * keep)
          const uint32_t bits = dropout_keep_bits8(seed, dropout_counter(drop.offset, m0 + i, K, k / 8), thr);
#pragma unroll
          for (int q = 0; q < 8; ++q) xv[i][q] = (bits >> q) & 1u ? xv[i][q] : xv[i][q] * 0.f;
        }
      } else {
#pragma unroll
        for (int q = 0; q < 8; ++q) xv[i][q] = 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < RD_ITEM_COLS; ++j) {
      if (j0 + j >= r) break;
      float av[8];
      load8f<TA>(A + (int64_t)(j0 + j) * K + k, av);
#pragma unroll
      for (int i = 0; i < RD_ITEM_ROWS; ++i) {
        float v = acc[i][j];
#pragma unroll
        for (int q = 0; q < 8; ++q) v = fmaf(xv[i][q], av[q], v);
        acc[i][j] = v;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RD_ITEM_ROWS; ++i)
#pragma unroll
    for (int j = 0; j < RD_ITEM_COLS; ++j) {
      const float v = warp_sum(acc[i][j]);
      if (lane == 0) red[warp * RD_ITEM_ROWS * RD_ITEM_COLS + i * RD_ITEM_COLS + j] = v;
    }
  __syncthreads();
  if (tid < RD_ITEM_ROWS * RD_ITEM_COLS) {
    const int i = tid / RD_ITEM_COLS, j = tid % RD_ITEM_COLS;
    if (m0 + i < M && j0 + j < r) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < RD_NW; ++w) v += red[w * RD_ITEM_ROWS * RD_ITEM_COLS + tid];
      u[(m0 + i) * r + j0 + j] = v * scale;
      __threadfence();
    }
  }
  mark_item_done(sync);
}

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
#endif  // LK_TC_ARCH

// DBG: development only, 0 in the library. bench/dev/small_m_bench.cu times the kernel with parts left out (wrong
// results): bit 1 no u items and no wait for u, bit 2 no LoRA term in the epilogue (no B tile, no u load).
template <typename T, typename TA, int MF, int DBG = 0>
__global__ void __launch_bounds__(RD_NW * 32, 2)
lora_small_m_rd_kernel(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ bias,
                       const TA* __restrict__ A, const void* __restrict__ B_, int b_f32, T* __restrict__ y,
                       float* __restrict__ u_out, unsigned* __restrict__ sync, int64_t M, int64_t N, int64_t K, int r,
                       float scale, RdDropout drop, int n_items, int item_blocks) {
#if LK_TC_ARCH
  using Tile = RdTile<MF>;
  constexpr int NPW = Tile::NPW, U = Tile::U, BN = Tile::BN, MP = Tile::MP, NT = RD_NW * 32;
  constexpr int BPT = (BN * kSmallMMaxR + NT - 1) / NT;  // B tile elements per thread
  extern __shared__ __align__(16) float rd_smem[];
  enum { kUDone, kUUnclaimed, kUPending };
  __shared__ int claimed, wait_state;
  __shared__ float red_item[RD_NW * RD_ITEM_ROWS * RD_ITEM_COLS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // Claims u items until none is left: the first item_blocks blocks at their start, and any block that reaches its
  // epilogue while an item is still unclaimed (a claimed item is computed by a running block, so the wait ends).
  auto claim_items = [&]() {
    for (;;) {
      if (tid == 0) claimed = (int)atomicAdd(&sync[0], 1u);
      __syncthreads();
      const int it = claimed;
      __syncthreads();
      if (it >= n_items) return;
      rd_u_item<T, TA>(it, x, A, u_out, sync, red_item, M, K, r, scale, drop);
    }
  };
  constexpr bool kItems = !(DBG & 1), kLora = !(DBG & 2);
  if ((int)blockIdx.x < item_blocks) {  // an item block: u items only, no tile
    if (kItems) claim_items();
    finish_small_m_sync(sync, arrive_small_m_sync(sync));
    return;
  }

  float* red = rd_smem;                    // [NW][MP][BN]
  float* us = red + RD_NW * MP * BN;       // [M][r]
  float* bs = us + kSmallMMaxM * r;        // [BN][r + 1]
  float* bias_s = bs + BN * (r + 1);       // [BN]
  const int64_t n0 = (int64_t)(blockIdx.x - item_blocks) * BN;
  // the B tile and bias into registers now, into shared memory after the main loop: no wait before it
  float bv[BPT], biasv = 0.f;
#pragma unroll
  for (int q = 0; q < BPT; ++q) {
    const int i = tid + q * NT, c = i / kSmallMMaxR, j = i % kSmallMMaxR;
    const int64_t n = n0 + c;
    bv[q] = 0.f;
    if (kLora && c < BN && j < r && n < N)
      bv[q] = b_f32 ? static_cast<const float*>(B_)[n * r + j] : to_f<T>(static_cast<const T*>(B_)[n * r + j]);
  }
  if (tid < BN && bias != nullptr && n0 + tid < N) biasv = to_f<T>(bias[n0 + tid]);

  float acc[MF][NPW][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < NPW; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mf][j][q] = 0.f;
  const T* wr[NPW];
  bool wok[NPW];
#pragma unroll
  for (int j = 0; j < NPW; ++j) {
    const int64_t n = n0 + 8 * j + g;
    wok[j] = n < N;
    wr[j] = W + (wok[j] ? n : 0) * K + 8 * t;
  }
  const T* xr[MF][2];
  bool xok[MF][2];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = 16 * mf + g + 8 * h;
      xok[mf][h] = m < M;
      xr[mf][h] = x + (xok[mf][h] ? m : 0) * K + 8 * t;
    }
  const int64_t steps = (K + 31) / 32;
  const int64_t s_beg = steps * warp / RD_NW, s_end = steps * (warp + 1) / RD_NW;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t s = s_beg; s < s_end; s += U) {
    uint4 wv[U][NPW], xq[U][MF][2];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int64_t k = (s + q) * 32;
      const bool ok = s + q < s_end && k + 8 * t < K;
#pragma unroll
      for (int j = 0; j < NPW; ++j) wv[q][j] = ok && wok[j] ? ld_stream16(wr[j] + k) : zero;
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          xq[q][mf][h] = ok && xok[mf][h] ? __ldg(reinterpret_cast<const uint4*>(xr[mf][h] + k)) : zero;
    }
#pragma unroll
    for (int q = 0; q < U; ++q)
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) {
        const uint32_t a1[4] = {xq[q][mf][0].x, xq[q][mf][1].x, xq[q][mf][0].y, xq[q][mf][1].y};
        const uint32_t a2[4] = {xq[q][mf][0].z, xq[q][mf][1].z, xq[q][mf][0].w, xq[q][mf][1].w};
#pragma unroll
        for (int j = 0; j < NPW; ++j) {
          mma16816<T>(acc[mf][j], a1, wv[q][j].x, wv[q][j].y);
          mma16816<T>(acc[mf][j], a2, wv[q][j].z, wv[q][j].w);
        }
      }
  }
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < NPW; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        red[(warp * MP + 16 * mf + g + 8 * (q >> 1)) * BN + 8 * j + 2 * t + (q & 1)] = acc[mf][j][q];
#pragma unroll
  for (int q = 0; q < BPT; ++q) {
    const int i = tid + q * NT, c = i / kSmallMMaxR, j = i % kSmallMMaxR;
    if (c < BN && j < r) bs[c * (r + 1) + j] = bv[q];
  }
  if (tid < BN) bias_s[tid] = biasv;
  // Wait until every u item is done (acquire), claiming any that is still unclaimed; then u from L2.
  for (; kItems;) {
    __syncthreads();
    if (tid == 0)
      wait_state = ld_acquire_gpu(&sync[1]) >= (unsigned)n_items ? kUDone
                   : ld_acquire_gpu(&sync[0]) < (unsigned)n_items ? kUUnclaimed : kUPending;
    __syncthreads();
    const int state = wait_state;
    if (state == kUDone) break;
    if (state == kUUnclaimed) {
      claim_items();
    } else if (tid == 0) {
      __nanosleep(128);
    }
  }
  const unsigned ticket = arrive_small_m_sync(sync);
  __threadfence();
  for (int64_t i = tid; kLora && i < M * (int64_t)r; i += NT) us[i] = __ldcg(u_out + i);
  __syncthreads();
  for (int64_t i = tid; i < M * BN; i += NT) {
    const int m = (int)(i / BN), c = (int)(i % BN);
    const int64_t n = n0 + c;
    if (n >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < RD_NW; ++w) v += red[(w * MP + m) * BN + c];
    const float* um = us + m * r;
    const float* bc = bs + c * (r + 1);
    float lora = 0.f;
    for (int j = 0; kLora && j < r; ++j) lora = fmaf(um[j], bc[j], lora);
    y[m * N + n] = from_f<T>(v + lora + bias_s[c]);
  }
  finish_small_m_sync(sync, ticket);
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
constexpr int SMF_BN = 32;  // y columns per block
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
  float* as = ws + SMF_BN * SMF_LD;           // [r][SMF_LD]
  const int tid = threadIdx.x, lane = tid & 31, phase = tid >> 5;
  const int64_t n0 = (int64_t)blockIdx.x * SMF_BN;
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
    for (int i = tid; i < SMF_BN * SMF_KC; i += kThreads) {
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

// f(std::integral_constant<int, MF>{}, std::integral_constant<int, BN>{}) for the row fragments and tile widths.
template <typename F>
cudaError_t with_small_m_tile(int mf, int bn, F&& f) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  using I16 = std::integral_constant<int, 16>;
  using I32 = std::integral_constant<int, 32>;
  switch (mf * 64 + bn) {
    case 64 + 16: return f(I1{}, I16{});
    case 64 + 32: return f(I1{}, I32{});
    case 128 + 16: return f(I2{}, I16{});
    case 128 + 32: return f(I2{}, I32{});
    case 256 + 16: return f(I4{}, I16{});
    case 256 + 32: return f(I4{}, I32{});
    default: return cudaErrorInvalidValue;
  }
}

// Whether the register-direct kernel takes the call: 16-byte aligned rows of x and W (K % 8 == 0, aligned base
// pointers) and a 16-byte aligned A (its 8-element vectors are read as 16-byte loads).
inline bool small_m_rd_fits(const void* x, const void* W, const void* A, int64_t K) {
  return K % 8 == 0 && K > 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(A) % 16 == 0;
}

// Tile width: 32 columns where that still gives every SM two blocks, else 16 (more blocks, each streaming less of
// W: the bytes in flight per SM, not per block, decide the read rate).
inline int small_m_bn(int64_t N) { return ceil_div(N, 32) >= 2 * (int64_t)num_sms() ? 32 : 16; }

}  // namespace

const char* lora_small_m_unsupported(const void* x, const void* W, const void* A, int64_t M, int64_t N, int64_t K,
                                     int r, DType x_dtype, DType a_dtype, float p) {
  if (M < 1 || M > kSmallMMaxM) return "M is not in 1..64";
  if (N < 1) return "N is 0";
  if (K < 0) return "K is negative";
  if (r < 1 || r > kSmallMMaxR) return "r is above 64";
  if (p > 0.f && (x_dtype == DType::kFloat32 || !small_m_rd_fits(x, W, A, K)))
    return "dropout needs the register-direct kernel (16-bit x, K % 8 == 0, 16-byte aligned x, W and lora_A)";
  if (x_dtype == DType::kFloat32 && M * r > kSmallMMaxM * 32) return "M * r is above 2048 with fp32 x";
  if (ceil_div(N, 16) > INT_MAX - 1024) return "N is too large for the grid";
  if (x_dtype != DType::kFloat32) {
    if (!tc_supported()) return "16-bit x below sm_80";
    if (small_m_smem(small_m_frags(M), small_m_bn(N)) > smem_per_block())
      return "its shared memory does not fit this GPU";
  }
  (void)a_dtype;
  return nullptr;
}

cudaError_t launch_lora_small_m_forward(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                        DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                        int64_t N, int64_t K, int r, float scaling, float p, uint64_t seed,
                                        const int64_t* seed_ptr, uint64_t offset, cudaStream_t stream) {
  if (lora_small_m_unsupported(x, W, A, M, N, K, r, x_dtype, a_dtype, p) != nullptr) return cudaErrorInvalidValue;
  if (lora_small_m_sm90_unsupported(x, W, A, B, M, N, K, r, x_dtype, a_dtype, b_dtype, p) == nullptr)
    return launch_lora_small_m_sm90(x, x_dtype, W, bias, A, a_dtype, B, b_dtype, y, u, M, N, K, r, scaling, stream);
  if (x_dtype == DType::kFloat32) {
    if (a_dtype != DType::kFloat32 || b_dtype != DType::kFloat32) return cudaErrorInvalidValue;
    const size_t smem = (size_t)((kSmallMMaxM + SMF_BN + r) * SMF_LD) * sizeof(float);
    return launch_kernel(lora_small_m_ffma_kernel, dim3((unsigned)ceil_div(N, SMF_BN)), kThreads, smem, stream,
                         static_cast<const float*>(x), static_cast<const float*>(W), static_cast<const float*>(bias),
                         static_cast<const float*>(A), static_cast<const float*>(B), static_cast<float*>(y), u, M, N,
                         K, r, scaling);
  }
  if ((a_dtype != DType::kFloat32 && a_dtype != x_dtype) || (b_dtype != DType::kFloat32 && b_dtype != x_dtype))
    return cudaErrorInvalidValue;
  unsigned* sync = small_m_sync(stream);
  if (sync == nullptr) return cudaErrorMemoryAllocation;
  const int mf = small_m_frags(M);
  if (small_m_rd_fits(x, W, A, K)) {
    const int n_items = rd_items(M, r);
    return with_dtype16(x_dtype, [&](auto xt) {
      using T = decltype(xt);
      auto go = [&](auto mfc) {
        constexpr int MF = decltype(mfc)::value;
        const int64_t tiles = ceil_div(N, RdTile<MF>::BN);
        const size_t smem = RdTile<MF>::smem(r);
        const RdDropout drop{p, seed, seed_ptr, offset};
        const float u_scale = dropout_scale(scaling, p);  // u = s / (1 - p) (keep * x) A^T, as the shrink's
        auto launch = [&](auto kernel, auto a) {
          // the item blocks first, then one block per tile (Grid, at the kernel)
          const int64_t slots = (int64_t)resident_blocks(reinterpret_cast<const void*>(kernel), RD_NW * 32, smem) *
                                num_sms();
          const int item_blocks = rd_item_blocks(n_items, tiles, slots);
          return launch_kernel(kernel, dim3((unsigned)(item_blocks + tiles)), RD_NW * 32, smem, stream,
                               static_cast<const T*>(x), static_cast<const T*>(W), static_cast<const T*>(bias), a, B,
                               b_dtype == DType::kFloat32 ? 1 : 0, static_cast<T*>(y), u, sync, M, N, K, r, u_scale,
                               drop, n_items, item_blocks);
        };
        if (a_dtype == DType::kFloat32)
          return launch(lora_small_m_rd_kernel<T, float, MF>, static_cast<const float*>(A));
        return launch(lora_small_m_rd_kernel<T, T, MF>, static_cast<const T*>(A));
      };
      return mf == 1 ? go(std::integral_constant<int, 1>{})
                     : mf == 2 ? go(std::integral_constant<int, 2>{}) : go(std::integral_constant<int, 4>{});
    });
  }
  const int bn = small_m_bn(N);
  const int n_items = (int)ceil_div(M * r, SMM_ITEM);
  const size_t smem = small_m_smem(mf, bn);
  return with_dtype16(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return with_small_m_tile(mf, bn, [&](auto mfc, auto bnc) {
      constexpr int MF = decltype(mfc)::value, BN = decltype(bnc)::value;
      const dim3 grid((unsigned)ceil_div(N, BN));
      const int per_block = (int)ceil_div(n_items, (int64_t)grid.x);
      if (a_dtype == DType::kFloat32)
        return launch_kernel(lora_small_m_tc_kernel<T, float, MF, BN>, grid, kTcThreads, smem, stream,
                             static_cast<const T*>(x), static_cast<const T*>(W), static_cast<const T*>(bias),
                             static_cast<const float*>(A), B, b_dtype == DType::kFloat32 ? 1 : 0,
                             static_cast<T*>(y), u, sync, M, N, K, r, scaling, n_items, per_block);
      return launch_kernel(lora_small_m_tc_kernel<T, T, MF, BN>, grid, kTcThreads, smem, stream,
                           static_cast<const T*>(x), static_cast<const T*>(W), static_cast<const T*>(bias),
                           static_cast<const T*>(A), B, b_dtype == DType::kFloat32 ? 1 : 0, static_cast<T*>(y), u,
                           sync, M, N, K, r, scaling, n_items, per_block);
    });
  });
}

}  // namespace lora_kernels
