// Expand pass of the forward: y = u B^T + bias (M, N), written once before cuBLAS accumulates x W^T into it
// (beta = 1). FFMA kernel (fp32 y), tensor-core kernel (16-bit y, sm_80+), launch_lora_expand.
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "staging.cuh"

namespace lora_kernels {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------------------------
// lora_expand: y (M, N) = u (M, r) B^T + bias, written once (never read): cuBLAS then accumulates x W^T into
// it with beta = 1. Tile EX_BM x EX_BN, r in chunks of EX_RC through shared memory. Each thread owns 2 neighbouring
// columns of EX_BM / 8 rows: thread (mrow = tid / 32, c = tid % 32) covers columns n0 + 2c, n0 + 2c + 1 and rows
// mrow + 8 i.
constexpr int EX_BM = 32, EX_BN = 64, EX_RC = 32;

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
lora_expand_kernel(T* __restrict__ y, const float* __restrict__ u, const TB* __restrict__ B,
                           const T* __restrict__ bias, int64_t M, int64_t N, int r) {
  __shared__ float us[EX_BM][EX_RC + 1];
  __shared__ float bs[EX_BN][EX_RC + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * EX_BM;
  const int64_t n0 = (int64_t)blockIdx.y * EX_BN;
  const int c = tid % 32, mrow = tid / 32;  // 8 row phases
  float acc[EX_BM / 8][2];
#pragma unroll
  for (int i = 0; i < EX_BM / 8; ++i) acc[i][0] = acc[i][1] = 0.f;

  for (int r0 = 0; r0 < r; r0 += EX_RC) {
    load_rchunk<EX_BM, EX_RC>(us, u, m0, M, r, r0);
    for (int i = tid; i < EX_BN * EX_RC; i += kThreads) {
      const int nn = i / EX_RC, jj = i % EX_RC;
      const int64_t n = n0 + nn;
      bs[nn][jj] = (n < N && r0 + jj < r) ? to_f<TB>(B[n * r + r0 + jj]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < EX_RC; ++jj) {
      const float b0 = bs[2 * c][jj], b1 = bs[2 * c + 1][jj];
#pragma unroll
      for (int i = 0; i < EX_BM / 8; ++i) {
        const float uv = us[mrow + 8 * i][jj];
        acc[i][0] = fmaf(uv, b0, acc[i][0]);
        acc[i][1] = fmaf(uv, b1, acc[i][1]);
      }
    }
    __syncthreads();
  }
  const int64_t n = n0 + 2 * c;
  float bias0 = 0.f, bias1 = 0.f;
  if (bias) {
    if (n < N) bias0 = to_f<T>(bias[n]);
    if (n + 1 < N) bias1 = to_f<T>(bias[n + 1]);
  }
#pragma unroll
  for (int i = 0; i < EX_BM / 8; ++i) {
    const int64_t m = m0 + mrow + 8 * i;
    if (m >= M) continue;
    T* yp = y + m * N + n;
    if (n + 1 < N) {
      yp[0] = from_f<T>(acc[i][0] + bias0);
      yp[1] = from_f<T>(acc[i][1] + bias1);
    } else if (n < N) {
      yp[0] = from_f<T>(acc[i][0] + bias0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The output-writing tensor-core kernels (expand here, dx in dx.cu) share this shape: block = 128 rows x a group of 64-column chunks
// (grid.y); the 128 x r left operand (u or g, fp32 -> T) stays in shared memory; each chunk's right operand (B^T or
// A, -> T) is register-prefetched two chunks ahead into a double buffer (the first kPrefetch 4-groups per thread,
// i.e. all of it for r <= 64; the rest is loaded when staged). Warp w computes rows 16w..16w+15 x 64 columns
// (8 m16n8 fp32 accumulators) over r in 16-steps, rounds them to T into its 16 rows of an output staging tile, and
// writes those rows out with 16-byte stores (each lane 4 x 16 B; a warp covers 4 full 128-byte row segments per
// store). One block barrier per chunk.

// lora_expand (tensor cores).
// Math   : y (M, N) = u (M, r) B^T + bias; u and B cast to T, fp32 accumulation, bias added in fp32, y rounded
//          once and written once (never read).
// Tiling : see above; B chunk stored [n][j] (B^T as a col-major operand).
// Bytes  : one write of y (M*N*2); u read once per column group, B once per 128 rows (L2).
// Smem   : 256 * (RP + 8) * 2 + 18 KB (RP = r padded to 16) = 30.7 KB at r = 16, 55.3 KB at r = 64.
template <typename T, typename TB>
__global__ void __launch_bounds__(kTcThreads, kOutputMinBlocks)
lora_expand_tc_kernel(T* __restrict__ y, const float* __restrict__ u, const TB* __restrict__ B,
                              const T* __restrict__ bias, int64_t M, int64_t N, int r, int64_t chunks_per_group) {
#if LK_TC_ARCH
  const int RP = round16(r), LDK = RP + 8, g4 = RP / 4, nb4 = TO_BN * g4;
  const int npre = min(nb4, kPrefetch * kTcThreads / g4 * g4);  // register-prefetched 4-groups: whole rows
  // left: u rows (A operand, row-major); right: B rows n (B operand stored [n][k]), TO_BN x LDK each.
  const OutputBlock<T> blk(u, M, r, LDK, TO_BN * LDK, N, chunks_per_group);
  const int tid = threadIdx.x, warp = tid >> 5;
  const LaneOffsets lo;
  int pre_row[kPrefetch], pre_col[kPrefetch];  // this thread's prefetched 4-groups: chunk row, column
#pragma unroll
  for (int i = 0; i < kPrefetch; ++i) {
    pre_row[i] = (tid + i * kTcThreads) / g4;
    pre_col[i] = (tid + i * kTcThreads) % g4 * 4;
  }
  // Full, aligned chunks take the fast paths (no per-group bounds / alignment checks).
  const bool b_vec = reinterpret_cast<uintptr_t>(B) % sizeof(Vec4<TB>) == 0 && r == RP;  // no padding columns
  const bool y_vec = reinterpret_cast<uintptr_t>(y) % 16 == 0 && N % 8 == 0 && blk.m0 + TO_BM <= M;
  const bool bias_vec = bias != nullptr && reinterpret_cast<uintptr_t>(bias) % 4 == 0;
  Vec4<TB> br[kPrefetch];
  auto fetch_b = [&](int64_t ch) {  // chunk ch's B rows into registers (the prefetched part)
    const int64_t n0 = ch * TO_BN;
    const bool full = b_vec && n0 + TO_BN <= N;
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (tid + i * kTcThreads >= npre) break;
      const TB* src = B + (n0 + pre_row[i]) * r + pre_col[i];
      br[i] = full ? *reinterpret_cast<const Vec4<TB>*>(src)
                   : ld4<TB>(src, n0 + pre_row[i] < N ? n_valid(r - pre_col[i], 4) : 0);
    }
  };
  auto stash_b = [&](int64_t ch) {  // chunk ch's B -> its buffer (prefetched part from registers)
    T* bb = blk.right_buf(ch);
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (tid + i * kTcThreads >= npre) break;
      *reinterpret_cast<uint2*>(bb + pre_row[i] * LDK + pre_col[i]) = to_t4<T, TB>(br[i]);
    }
    if (nb4 > npre) {  // r > 64: the rest of the chunk
      const int row1 = npre / g4;
      load_tile_as_t<T, TB>(bb + row1 * LDK, LDK, B + (ch * TO_BN + row1) * r, r, TO_BN - row1, g4,
                            N - (ch * TO_BN + row1), r);
    }
  };
  // Per chunk (OutputBlock::run): the bias added in fp32, the warp's 16 rows staged and written out (warp-local).
  blk.template run<true>(LDK, RP, lo, warp, fetch_b, stash_b, [&](float(&acc)[TO_BN / 8][4], int64_t n0) {
    const bool chunk_full = n0 + TO_BN <= N;
#pragma unroll
    for (int n = 0; n < TO_BN / 8; ++n) {
      const int col = 8 * n + 2 * lo.t;
      float b0 = 0.f, b1 = 0.f;
      if (bias_vec && chunk_full) {
        union { uint32_t u; T e[2]; } bb;
        bb.u = *reinterpret_cast<const uint32_t*>(bias + n0 + col);
        b0 = to_f<T>(bb.e[0]);
        b1 = to_f<T>(bb.e[1]);
      } else if (bias) {
        if (n0 + col < N) b0 = to_f<T>(bias[n0 + col]);
        if (n0 + col + 1 < N) b1 = to_f<T>(bias[n0 + col + 1]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(blk.os + (16 * warp + lo.g + 8 * h) * TO_LDO + col) =
            pack2<T>(acc[n][2 * h] + b0, acc[n][2 * h + 1] + b1);
    }
    store_staged_rows<TO_BN>(y, N, blk.os, TO_LDO, blk.m0, n0, M, N, y_vec && chunk_full,
                             [](uint4 v, int64_t, int64_t) { return v; });
  });
#else
  __trap();
#endif
}

}  // namespace

cudaError_t launch_lora_expand(void* y, DType y_dtype, const float* u, const void* B, DType b_dtype,
                                       const void* bias, int64_t M, int64_t N, int r, cudaStream_t stream) {
  if (r < 1 || r > kMaxRank) return cudaErrorInvalidValue;
  if (M <= 0 || N <= 0) return cudaSuccess;
  return launch_output_pass<EX_BM, EX_BN>(y_dtype, b_dtype, M, N, expand_tc_smem(round16(r)),
                                          [&](auto yt, auto bt, auto grid) {
    using T = decltype(yt);
    using TB = decltype(bt);
    if constexpr (std::is_same<decltype(grid), OutputGrid>::value)
      return launch_kernel(lora_expand_tc_kernel<T, TB>, grid.grid, kTcThreads, expand_tc_smem(round16(r)),
                           stream, static_cast<T*>(y), u, static_cast<const TB*>(B), static_cast<const T*>(bias), M, N,
                           r, grid.chunks_per_group);
    else
      return launch_kernel(lora_expand_kernel<T, TB>, grid, kThreads, 0, stream, static_cast<T*>(y), u,
                           static_cast<const TB*>(B), static_cast<const T*>(bias), M, N, r);
  });
}

}  // namespace lora_kernels
