// Small-M forward in one launch: y = x W^T + bias + u B^T with u = scaling * x A^T, for M <= 64 rows and no
// dropout (decoding, small batches, evaluation). The usual forward is two to four launches of kernels that each take
// a few microseconds of launch and tail time for a few microseconds of work; here W, the only large operand, is
// streamed once by one launch, as fast as a GEMV-shaped cuBLAS GEMM streams it.
// Tensor-core kernel (16-bit x, sm_80+), FFMA kernel (fp32 x), launch_lora_small_m_forward and its policy
// lora_small_m_unsupported.
//
// Math   : the K axis is cut into `splits` slices; block (c, s) owns the BN (128) columns of y tile c and K slice s:
//            Y_s = x[:, s] W[c, s]^T   and   U_s = x[:, s] A[:, s]^T          (tensor cores, fp32 accumulation)
//          U_s is the same for every tile (recomputed per tile: A's slice is read from L2, r x slice x 4 bytes).
//          The last block of tile c to finish (a counter per tile) sums the slices in slice order, Y = sum_s Y_s and
//          U = sum_s U_s (deterministic, whichever block is last), and writes
//            y[:, c] = round(Y + (scaling U) B[c]^T + bias[c])      (fp32, one rounding of y)
//          and, for tile 0, u = scaling U (fp32, saved for backward). With one slice there are no partials: each
//          block writes its tile directly.
// Why    : W streams at HBM speed only with enough bytes in flight per SM and enough blocks, and x (up to 64 rows)
//          must not be re-read for every 16 or 32 columns: 128-column tiles keep x's reads from L2 at M / 128 of W's
//          bytes, and the K split restores the block count (small_m_plan weighs the waves against the partials).
// Precision: U's products are exact: with fp32 A, A is split into three bf16 pieces (bf16x3); on fp16 x with fp32 A
//          x is also split, exactly, into two bf16 pieces; 16-bit A on x of its dtype runs as is. Each k16 step's
//          piece products go to a fresh accumulator that is then added in fp32 (round to nearest): the tensor
//          cores' own accumulation truncates. Y is accumulated as a GEMM's is.
// Tiling : 256 threads (8 warps), one block per SM. K in SMK_KC (64)-column chunks through an S-slot cp.async ring
//          (S = 5 or 6: about 90 KB of W in flight per SM), a slot holding the x chunk (MP = M rounded up to 16, 32
//          or 64 rows; rows past M zero-filled), the W chunk (BN rows) and A's chunk (8 NT rows, in A's type). Warp w
//          owns columns 16 w .. 16 w + 15 of the tile for all K steps. U's work, NT n8-tiles (ceil(r / 8) rounded up
//          to 1, 2, 4, 8) x 4 k16 steps per chunk, is dealt to the warps as units (unit = step * NT + n8-tile, warp =
//          unit % 8): every warp then holds one n8-tile of U.
// Epilogue: the warps' Y columns and (in warp order) their U parts go through shared memory (the ring, free by
//          then); partials through a workspace (splits x M x N and tiles x splits x M x r floats); the per-tile
//          counters live in a per-stream buffer (small_m_counters) and the last block resets its tile's counter, so
//          the next launch on the stream (or the next replay of a captured graph) starts from zero. Launches on one
//          stream never overlap, so one buffer per stream is enough.
// Limits : M <= 64; r <= 64 (fp32 x, the FFMA kernel: M * r <= 2048); no dropout. With dropout every block would
//          mask its own copy of x, which takes ring slots from W's stream: on the H200 an earlier version with
//          dropout took 1.3-6.1x the unfused forward's wall time at M = 1, 16 and 64, so the unfused forward runs
//          there. lora_small_m_unsupported says why a call does not come here.
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kSmallMMaxM = 64;
constexpr int kSmallMMaxR = 64;

constexpr int SMK_BN = 128;            // y columns per block: 8 warps x 16
constexpr int SMK_KC = 64;             // K chunk: 4 k16 steps
constexpr int SMK_LD = SMK_KC + 8;     // shared-memory row pitch (elements): 144-byte rows, conflict-free ldmatrix
constexpr int SMK_LDT = SMK_BN + 4;    // pitch of the fp32 Y tile in the epilogue
static_assert(SMK_BN == 16 * (kTcThreads / 32), "16 columns per warp");

// Row fragments (16 rows each) of the M rows: 1, 2 or 4 (M in 33..48 is padded to 64).
inline int small_m_frags(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// U's n8-tiles: ceil(r / 8) rounded up to a power of two (1, 2, 4, 8), so that the units deal evenly to 8 warps.
__host__ __device__ inline int small_m_u_tiles(int r) {
  const int t = (r + 7) / 8;
  return t <= 1 ? 1 : t <= 2 ? 2 : t <= 4 ? 4 : 8;
}

// Ring slots of the tensor-core kernel for MF row fragments: x [MP][SMK_LD] and W [BN][SMK_LD] in x's 16-bit type,
// then A's chunk [8 NT][lda] in A's type (a_bytes per element; lda = SMK_KC + 16 bytes of padding). A travels with
// x and W because its loads, issued from registers, waited behind the whole stream's queue every chunk: about 2.5 us
// each under full load (fifteenth session, 3.3x the floor at M = 1).
__host__ __device__ constexpr int small_m_stages(int mf) { return mf == 4 ? 5 : 6; }
__host__ __device__ constexpr int small_m_lda(int a_bytes) { return SMK_KC + 16 / a_bytes; }
__host__ __device__ inline size_t small_m_slot_bytes(int mf, int r, int a_bytes) {
  return (size_t)(16 * mf + SMK_BN) * SMK_LD * 2 + (size_t)8 * small_m_u_tiles(r) * small_m_lda(a_bytes) * a_bytes;
}
__host__ __device__ inline size_t small_m_smem(int mf, int r, int a_bytes) {
  return small_m_stages(mf) * small_m_slot_bytes(mf, r, a_bytes);
}
// After the main loop the ring holds Y [MP][SMK_LDT], the U part [MP][65], u [64][64] and the B tile [BN][65].
__host__ __device__ constexpr size_t small_m_epilogue_bytes(int mf) {
  return (size_t)(16 * mf * SMK_LDT + 16 * mf * 65 + kSmallMMaxM * kSmallMMaxR + SMK_BN * 65) * 4;
}
static_assert(5 * (size_t)(64 + SMK_BN) * SMK_LD * 2 >= small_m_epilogue_bytes(4) &&
                  6 * (size_t)(32 + SMK_BN) * SMK_LD * 2 >= small_m_epilogue_bytes(2) &&
                  6 * (size_t)(16 + SMK_BN) * SMK_LD * 2 >= small_m_epilogue_bytes(1),
              "epilogue buffers fit in the ring");

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

// The K split: tiles of SMK_BN columns x `splits` slices of `slice` columns (a multiple of SMK_KC). One block per SM:
// the plan takes the split count (1 to 8) with the least estimated time per SM, the streamed bytes of each wave of
// blocks (W's slice and x's) plus the partials written and read back (2 x 4 bytes per Y element per slice).
struct SmallMPlan {
  int64_t tiles = 1, slice = SMK_KC;
  int splits = 1;
};
SmallMPlan small_m_plan(int64_t M, int64_t N, int64_t K) {
  SmallMPlan best;
  best.tiles = ceil_div(N, SMK_BN);
  const int64_t chunks = ceil_div(K, SMK_KC), sms = std::max(num_sms(), 1);
  best.slice = std::max<int64_t>(chunks, 1) * SMK_KC;
  double best_cost = -1.0;
  for (int s = 1; s <= 8 && s <= std::max<int64_t>(chunks, 1); ++s) {
    const int64_t per = ceil_div(chunks, s), used = chunks > 0 ? ceil_div(chunks, per) : 1;
    const int64_t blocks = best.tiles * used, waves = ceil_div(blocks, sms);
    double cost = (double)waves * per * SMK_KC * (SMK_BN + M) * 2.0;
    if (used > 1) cost += (double)blocks * M * SMK_BN * 8.0 / sms;
    if (best_cost < 0.0 || cost < best_cost * 0.98) {
      best_cost = cost;
      best.splits = (int)used;
      best.slice = std::max<int64_t>(per, 1) * SMK_KC;
    }
  }
  return best;
}

// The per-tile counters of the current device's `stream` (zero between launches), at least `count` of them: made
// with cudaMalloc and zeroed outside any graph capture's rules (relaxed mode for this thread, zeroed on a private
// non-blocking stream), so a first use under capture works too; a larger request replaces the buffer (the old one is
// kept: a launch queued before may still use it). nullptr when the allocation fails.
unsigned* small_m_counters(cudaStream_t stream, int64_t count) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return nullptr;
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, std::pair<unsigned*, int64_t>> bufs;
  static std::vector<unsigned*> retired;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(dev, stream);
  const auto it = bufs.find(key);
  if (it != bufs.end() && it->second.second >= count) return it->second.first;
  const int64_t cap = std::max<int64_t>(count, 4096);
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  unsigned* p = nullptr;
  cudaStream_t side = nullptr;
  bool ok = cudaMalloc(&p, cap * sizeof(unsigned)) == cudaSuccess &&
            cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking) == cudaSuccess &&
            cudaMemsetAsync(p, 0, cap * sizeof(unsigned), side) == cudaSuccess &&
            cudaStreamSynchronize(side) == cudaSuccess;
  if (side != nullptr) cudaStreamDestroy(side);
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (!ok) {
    cudaGetLastError();
    if (p != nullptr) cudaFree(p);
    return nullptr;
  }
  if (it != bufs.end()) retired.push_back(it->second.first);
  bufs[key] = std::make_pair(p, cap);
  return p;
}

template <typename T, typename TA>
struct SmallMArgs {
  const T* x;
  const T* W;
  const T* bias;
  const TA* A;
  const void* B;
  int b_f32;  // B is fp32 (else T)
  T* y;
  float* u_out;
  float* part_y;  // [splits][M][N] (splits > 1)
  float* part_u;  // [tiles][splits][M][r] (splits > 1)
  unsigned* counters;
  int64_t M, N, K, slice;
  int r, splits;
  float scale;
};

#if LK_TC_ARCH
// The U product's operand types: UT the mma type (T for 16-bit A of x's dtype, else bf16), XP pieces of x (2 for
// fp16 x with fp32 A: x = hi + lo in bf16, exactly), AP pieces of A (3 for fp32 A: bf16x3).
template <typename T, typename TA>
struct UOperands {
  static constexpr bool kNative = !std::is_same<TA, float>::value;
  using UT = typename std::conditional<kNative, T, __nv_bfloat16>::type;
  static constexpr int XP = !kNative && std::is_same<T, __half>::value ? 2 : 1;
  static constexpr int AP = kNative ? 1 : 3;
};

// Piece p (0: hi, 1: lo) of two fp16 values as bf16, packed: hi rounds toward zero, lo = v - hi is exact in bf16
// (fp16 has 11 significant bits, hi keeps 8).
__device__ __forceinline__ uint32_t half2_bf16_piece(uint32_t v, int p) {
  union { uint32_t u; __half2 h; } c;
  c.u = v;
  const float2 f = __half22float2(c.h);
  const float h0 = __bfloat162float(__float2bfloat16_rz(f.x)), h1 = __bfloat162float(__float2bfloat16_rz(f.y));
  return p == 0 ? pack2<__nv_bfloat16>(h0, h1) : pack2<__nv_bfloat16>(f.x - h0, f.y - h1);
}

// The four A values of one unit as the mma's B fragments, piece by piece: b[p][0] = (v0, v1), b[p][1] = (v2, v3).
template <typename UT, int AP>
__device__ __forceinline__ void a_fragments(const float (&v)[4], uint32_t (&b)[AP][2]) {
  if constexpr (AP == 3) {
    __nv_bfloat16 p[4][3];
#pragma unroll
    for (int i = 0; i < 4; ++i) bf16x3_split(v[i], p[i]);
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      b[q][0] = pack2<__nv_bfloat16>(__bfloat162float(p[0][q]), __bfloat162float(p[1][q]));
      b[q][1] = pack2<__nv_bfloat16>(__bfloat162float(p[2][q]), __bfloat162float(p[3][q]));
    }
  } else {  // 16-bit A: exact in UT (its own type)
    b[0][0] = pack2<UT>(v[0], v[1]);
    b[0][1] = pack2<UT>(v[2], v[3]);
  }
}
#endif  // LK_TC_ARCH

// lora_small_m (tensor cores): see the top of the file. T: x's dtype; TA: A's (float or T); MF: row fragments
// (MP = 16 MF). Grid (tiles, splits).
template <typename T, typename TA, int MF>
__global__ void __launch_bounds__(kTcThreads, 1) lora_small_m_tc_kernel(const SmallMArgs<T, TA> a) {
#if LK_TC_ARCH
  using U = UOperands<T, TA>;
  using UT = typename U::UT;
  constexpr int MP = 16 * MF, LD = SMK_LD, S = small_m_stages(MF), BN = SMK_BN;
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int64_t M = a.M, N = a.N, K = a.K, n0 = (int64_t)tile * BN;
  const int64_t k_begin = split * a.slice, k_end = min64(K, k_begin + a.slice);
  const int64_t n_chunks = k_end > k_begin ? (k_end - k_begin + SMK_KC - 1) / SMK_KC : 0;
  const int r = a.r, NT = small_m_u_tiles(r), nt = warp % NT, j_row = 8 * nt + lo.g;
  extern __shared__ __align__(128) unsigned char lk_smem[];
  __shared__ int is_last;
  // One slot: x [MP][LD] | W [BN][LD] | A [RP][LDA] (RP = 8 NT rows, zero past r).
  constexpr int kX = MP * LD, LDA = small_m_lda(sizeof(TA)), kAPer = 16 / sizeof(TA);
  const int RP = 8 * NT;
  const size_t slot_bytes = small_m_slot_bytes(MF, r, sizeof(TA));
  auto slot = [&](int64_t t) { return reinterpret_cast<T*>(lk_smem + (size_t)(t % S) * slot_bytes); };
  auto slot_a = [&](int64_t t) { return reinterpret_cast<TA*>(slot(t) + (MP + BN) * LD); };

  // cp.async of chunk t: x, W and A rows in 16-byte groups; rows past M, N or r and columns past the slice read as
  // zeros.
  auto issue = [&](int64_t t) {
    T* s = slot(t);
    TA* sa = slot_a(t);
    const int64_t k0 = k_begin + t * SMK_KC;
    for (int g = tid; g < RP * (SMK_KC / kAPer); g += kTcThreads) {
      const int row = g / (SMK_KC / kAPer), col = g % (SMK_KC / kAPer) * kAPer;
      const TA* src = a.A + (int64_t)row * K + k0 + col;
      const int valid = row < r ? n_valid(k_end - k0 - col, kAPer) : 0;
      TA* dst = sa + row * LDA + col;
      if (valid > 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
        cp_async16(smem_addr(dst), src, valid * (int)sizeof(TA));
      } else {
#pragma unroll
        for (int q = 0; q < kAPer; ++q) dst[q] = q < valid ? src[q] : from_f<TA>(0.f);
      }
    }
    for (int g = tid; g < MP * (SMK_KC / 8); g += kTcThreads) {
      const int row = g / (SMK_KC / 8), col = g % (SMK_KC / 8) * 8;
      copy8_async<T>(s + row * LD + col, a.x + row * K + k0 + col, row < M ? n_valid(k_end - k0 - col, 8) : 0);
    }
#pragma unroll
    for (int i = 0; i < BN * (SMK_KC / 8) / kTcThreads; ++i) {
      const int g = tid + i * kTcThreads, row = g / (SMK_KC / 8), col = g % (SMK_KC / 8) * 8;
      copy8_async<T>(s + kX + row * LD + col, a.W + (n0 + row) * K + k0 + col,
                     n0 + row < N ? n_valid(k_end - k0 - col, 8) : 0);
    }
  };
  // This warp's U units: k16 step s of a chunk is one when (s * NT + nt) % 8 == warp.
  auto mine = [&](int s) { return ((s * NT + nt) & 7) == warp; };

  float acc[MF][2][4], uacc[MF][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
    zero_acc(acc[mf]);
#pragma unroll
    for (int q = 0; q < 4; ++q) uacc[mf][q] = 0.f;
  }

#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    if (t < n_chunks) issue(t);
    cp_async_commit();
  }
  for (int64_t t = 0; t < n_chunks; ++t) {
    cp_async_wait<S - 2>();
    __syncthreads();  // chunk t complete; chunk t-1's slot free
    if (t + S - 1 < n_chunks) issue(t + S - 1);
    cp_async_commit();
    const T* sx = slot(t);
    const TA* arow = slot_a(t) + j_row * LDA + 2 * lo.t;  // A[j_row][2t ...] of the chunk
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int kk = 16 * s;
      uint32_t xa[MF][4], wb[4];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) ldsm4(xa[mf], sx + (16 * mf + lo.r1) * LD + kk + lo.c1);
      ldsm4(wb, sx + kX + (16 * warp + lo.r2) * LD + kk + lo.c2);
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) mma16816x2<T>(acc[mf][0], acc[mf][1], xa[mf], wb);
      if (mine(s)) {  // one U unit: its piece products in a fresh accumulator, then added (round to nearest)
        // this lane's A values: columns 2t, 2t + 1, 2t + 8, 2t + 9 of the step
        const float av[4] = {to_f<TA>(arow[kk]), to_f<TA>(arow[kk + 1]), to_f<TA>(arow[kk + 8]),
                             to_f<TA>(arow[kk + 9])};
        uint32_t b[U::AP][2];
        a_fragments<UT, U::AP>(av, b);
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int xp = 0; xp < U::XP; ++xp) {
            uint32_t xf[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if constexpr (U::XP == 2)
                xf[q] = half2_bf16_piece(xa[mf][q], xp);
              else
                xf[q] = xa[mf][q];
            }
#pragma unroll
            for (int ap = 0; ap < U::AP; ++ap) mma16816<UT>(part, xf, b[ap][0], b[ap][1]);
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) uacc[mf][q] += part[q];
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free

  // Epilogue buffers in the ring: Y [MP][LDT], the U part [MP][65], u [M][r] (scaled), the B tile [BN][r + 1].
  constexpr int LDT = SMK_LDT, LDU = 65;
  float* const ty = reinterpret_cast<float*>(lk_smem);
  float* const tu = ty + MP * LDT;
  float* const us = tu + MP * LDU;
  float* const bs = us + kSmallMMaxM * kSmallMMaxR;
  // This warp's Y columns; the U part zeroed, then the warps' units added in warp order (deterministic).
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        ty[(16 * mf + lo.g + 8 * (q >> 1)) * LDT + 16 * warp + 8 * f + 2 * lo.t + (q & 1)] = acc[mf][f][q];
  for (int i = tid; i < MP * LDU; i += kTcThreads) tu[i] = 0.f;
  __syncthreads();
  for (int w = 0; w < kTcThreads / 32; ++w) {
    if (warp == w && (mine(0) || mine(1) || mine(2) || mine(3))) {
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int q = 0; q < 4; ++q) tu[(16 * mf + lo.g + 8 * (q >> 1)) * LDU + 8 * nt + 2 * lo.t + (q & 1)] += uacc[mf][q];
    }
    __syncthreads();
  }

  if (a.splits > 1) {  // this slice's partials out; the tile's last block goes on
    float* const py = a.part_y + (int64_t)split * M * N;
    for (int64_t i = tid; i < M * BN; i += kTcThreads) {
      const int m = (int)(i / BN), c = (int)(i % BN);
      if (n0 + c < N) py[m * N + n0 + c] = ty[m * LDT + c];
    }
    float* const pu = a.part_u + ((int64_t)tile * a.splits + split) * M * r;
    for (int64_t i = tid; i < M * r; i += kTcThreads) pu[i] = tu[(i / r) * LDU + i % r];
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&a.counters[tile], 1u) == (unsigned)(a.splits - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // The slices' sums in slice order.
    for (int64_t i = tid; i < M * BN; i += kTcThreads) {
      const int m = (int)(i / BN), c = (int)(i % BN);
      float v = 0.f;
      if (n0 + c < N)
        for (int s = 0; s < a.splits; ++s) v += __ldcg(a.part_y + ((int64_t)s * M + m) * N + n0 + c);
      ty[m * LDT + c] = v;
    }
    const float* const pu0 = a.part_u + (int64_t)tile * a.splits * M * r;
    for (int64_t i = tid; i < M * r; i += kTcThreads) {
      float v = 0.f;
      for (int s = 0; s < a.splits; ++s) v += __ldcg(pu0 + (int64_t)s * M * r + i);
      tu[(i / r) * LDU + i % r] = v;
    }
    if (tid == 0) a.counters[tile] = 0u;  // every block of the tile has counted itself: reset for the next launch
  }
  // u = scaling U (written by tile 0) and the B tile (fp32).
  for (int64_t i = tid; i < M * r; i += kTcThreads) {
    const float v = tu[(i / r) * LDU + i % r] * a.scale;
    us[i] = v;
    if (tile == 0) a.u_out[i] = v;
  }
  for (int i = tid; i < BN * r; i += kTcThreads) {
    const int c = i / r, j = i % r;
    const int64_t n = n0 + c;
    float b = 0.f;
    if (n < N)
      b = a.b_f32 ? static_cast<const float*>(a.B)[n * r + j] : to_f<T>(static_cast<const T*>(a.B)[n * r + j]);
    bs[c * (r + 1) + j] = b;
  }
  __syncthreads();
  // y = Y + u B^T + bias, rounded once: thread (column c = tid % BN, row phase tid / BN).
  constexpr int PH = kTcThreads / BN;
  const int c = tid % BN;
  const int64_t n = n0 + c;
  if (n < N) {
    const float bv = a.bias != nullptr ? to_f<T>(a.bias[n]) : 0.f;
    const float* bc = bs + c * (r + 1);
    for (int m = tid / BN; m < M; m += PH) {
      const float* um = us + m * r;
      float lora = 0.f;
      for (int j = 0; j < r; ++j) lora = fmaf(um[j], bc[j], lora);
      a.y[m * N + n] = from_f<T>(ty[m * LDT + c] + lora + bv);
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// lora_small_m (FFMA, fp32 x and adapters): block b owns 32 columns of y and all of K, all in fp32. K in SMF_KC (32)-column chunks through
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


// f(std::integral_constant<int, MF>{}) for the row fragments.
template <typename F>
cudaError_t with_small_m_frags(int mf, F&& f) {
  switch (mf) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
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
  if (p > 0.f) return "dropout (the unfused forward is faster: see Limits above)";
  if (x_dtype == DType::kFloat32 && M * r > kSmallMMaxM * 32) return "M * r is above 2048 with fp32 x";
  if (ceil_div(N, SMK_BN) > INT_MAX) return "N is too large for the grid";
  if (x_dtype != DType::kFloat32) {
    if (!tc_supported()) return "16-bit x below sm_80";
    if (small_m_smem(small_m_frags(M), r, a_dtype == DType::kFloat32 ? 4 : 2) > smem_optin_bytes())
      return "its shared memory does not fit this GPU";
  }
  return nullptr;
}

size_t lora_small_m_workspace_bytes(int64_t M, int64_t N, int64_t K, int r, DType x_dtype) {
  if (x_dtype == DType::kFloat32 || M < 1 || N < 1) return 0;
  const SmallMPlan plan = small_m_plan(M, N, K);
  if (plan.splits <= 1) return 0;
  const size_t y_bytes = (size_t)plan.splits * M * N * sizeof(float);
  return (y_bytes + 255) / 256 * 256 + (size_t)plan.tiles * plan.splits * M * r * sizeof(float);
}

cudaError_t launch_lora_small_m_forward(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                        DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                        int64_t N, int64_t K, int r, float scaling, void* workspace,
                                        cudaStream_t stream) {
  if (lora_small_m_unsupported(M, N, K, r, x_dtype, a_dtype, 0.f) != nullptr) return cudaErrorInvalidValue;
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
  const SmallMPlan plan = small_m_plan(M, N, K);
  unsigned* counters = nullptr;
  float *part_y = nullptr, *part_u = nullptr;
  if (plan.splits > 1) {
    if (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 15)) return cudaErrorInvalidValue;
    counters = small_m_counters(stream, plan.tiles);
    if (counters == nullptr) return cudaErrorMemoryAllocation;
    part_y = static_cast<float*>(workspace);
    part_u = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                      ((size_t)plan.splits * M * N * sizeof(float) + 255) / 256 * 256);
  }
  const int mf = small_m_frags(M);
  const dim3 grid((unsigned)plan.tiles, (unsigned)plan.splits);
  return with_dtype16(x_dtype, [&](auto xt) {
    using T = decltype(xt);
    return with_small_m_frags(mf, [&](auto mfc) {
      constexpr int MF = decltype(mfc)::value;
      auto run = [&](auto at) {
        using TA = decltype(at);
        SmallMArgs<T, TA> args{static_cast<const T*>(x), static_cast<const T*>(W), static_cast<const T*>(bias),
                               static_cast<const TA*>(A), B, b_dtype == DType::kFloat32 ? 1 : 0,
                               static_cast<T*>(y), u, part_y, part_u, counters, M, N, K, plan.slice, r,
                               plan.splits, scaling};
        return launch_kernel(lora_small_m_tc_kernel<T, TA, MF>, grid, kTcThreads, small_m_smem(MF, r, sizeof(TA)),
                             stream, args);
      };
      return a_dtype == DType::kFloat32 ? run(float{}) : run(T{});
    });
  });
}

}  // namespace lora_kernels
