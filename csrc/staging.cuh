// Block-wide staging of tiles into shared memory for the tensor-core kernels: the streamed operand's 8-groups by
// cp.async, side-operand tiles converted to the mma dtype T, and the pipeline that overlaps both with the mma work.
//
// The streaming kernels (shrink, dy pass, dA) walk n tiles. Tile t has a streamed part (x or dy: StreamTile) that
// arrives through a kStages-deep cp.async ring, and a small side operand (A, B or g: SideTile) that is loaded into
// registers two tiles ahead and stored into a double buffer one tile ahead. Per tile, one block barrier:
//   pipeline_start   : issue tiles 0 .. kStages-2; side tile 0 to shared memory, side tile 1 to registers.
//   pipeline_wait(t) : wait for this thread's copies of tile t, `landed()` (the dropout mask, in place, from keep
//                      bits computed before the wait), barrier
//                      (tile t and side buffer t % 2 complete, tile t-1's reads done), refill the freed ring slot.
//   (the kernel multiplies tile t)
//   pipeline_next(t) : side tile t+1 to shared memory, side tile t+2 to registers.
#pragma once
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"

namespace lora_kernels {
namespace detail {

// Pieces of a side operand of type TS staged for mma type T: the bf16x3 split of fp32 on bf16 (adapter_pieces).
template <typename T, typename TS>
constexpr int kPieces = std::is_same<TS, float>::value && std::is_same<T, __nv_bfloat16>::value ? 3 : 1;

#if LK_TC_ARCH
// Copies the 16-bit 8-group src[0..valid-1] (zero-filled) to the 16-byte aligned shared dst: cp.async when src is
// 16-byte aligned (a partial group is zero-filled by the copy), synchronous loads otherwise.
template <typename T>
__device__ __forceinline__ void copy8_async(T* dst, const T* src, int valid) {
  if (valid > 0 && (reinterpret_cast<uintptr_t>(src) % 16) == 0)
    cp_async16(smem_addr(dst), src, 2 * valid);
  else
    *reinterpret_cast<uint4*>(dst) = ld8_raw<T>(src, valid);
}

// Block-wide copy of a rows x (4 * cols4) tile of TS (row stride lds; rows >= rows_valid and columns >= cols_valid
// read as zeros) into shared memory as T (row pitch ldd). The loads of kBatch 4-groups per thread are all issued
// before their results are stored, so their latencies overlap.
// piece >= 0 stores that piece of the bf16x3 split instead (to_t4_piece).
template <typename T, typename TS>
__device__ __forceinline__ void load_tile_as_t(T* dst, int ldd, const TS* src, int64_t lds, int rows, int cols4,
                                               int64_t rows_valid, int cols_valid, int piece = -1) {
  constexpr int kBatch = 8;
  const int total = rows * cols4;
  for (int base = threadIdx.x; base < total; base += kTcThreads * kBatch) {
    Vec4<TS> v[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int gi = base + q * kTcThreads, rr = gi / cols4, c = gi % cols4 * 4;
      if (gi < total) v[q] = ld4<TS>(src + rr * lds + c, rr < rows_valid ? n_valid(cols_valid - c, 4) : 0);
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int gi = base + q * kTcThreads, rr = gi / cols4, c = gi % cols4 * 4;
      if (gi < total)
        *reinterpret_cast<uint2*>(dst + rr * ldd + c) =
            piece >= 0 ? to_t4_piece<T, TS>(v[q], piece) : to_t4<T, TS>(v[q]);
    }
  }
}

// The streamed operand: ROWS x COLS tiles of 16-bit T, shared-memory row pitch LD. Thread-owned 8-groups: group i of
// a thread is row(i), columns col(i) .. col(i)+7; the thread that copies a group also masks it.
template <typename T, int ROWS, int COLS, int LD>
struct StreamTile {
  static constexpr int kGroups = ROWS * COLS / 8 / kTcThreads;  // 8-groups per thread and tile
  static_assert(ROWS * COLS == 8 * kTcThreads * kGroups, "whole 8-groups per thread");
  static __device__ __forceinline__ int row(int i) { return ((int)threadIdx.x + i * kTcThreads) / (COLS / 8); }
  static __device__ __forceinline__ int col(int i) { return ((int)threadIdx.x + i * kTcThreads) % (COLS / 8) * 8; }

  // cp.async of the tile whose element (0, 0) is src[row0 * ld + col0] into slot. full: every row and column in
  // range and every row 16-byte aligned (no per-group checks); otherwise rows from row_end and columns from col_end
  // on read as zeros.
  static __device__ __forceinline__ void issue(T* slot, const T* src, int64_t ld, int64_t row0, int64_t col0,
                                               bool full, int64_t row_end, int64_t col_end) {
    if (full) {
#pragma unroll
      for (int i = 0; i < kGroups; ++i)
        cp_async16(smem_addr(slot + row(i) * LD + col(i)), src + (row0 + row(i)) * ld + col0 + col(i), 16);
      return;
    }
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int64_t m = row0 + row(i), k = col0 + col(i);
      copy8_async<T>(slot + row(i) * LD + col(i), src + m * ld + k, m < row_end ? n_valid(col_end - k, 8) : 0);
    }
  }

  // Dropout of a landed x tile whose element (0, 0) is x[m0, k0] (k0 a multiple of 8), in two steps: keep_bits
  // (bit q of bits[i]: element q of this thread's group i is kept) then apply_keep once the tile landed. Neither
  // step branches: each of the kGroups Philox calls is one dependent chain of 10 rounds, and only with no branch
  // between them can the compiler interleave the chains (a branch per group runs them one after the other, and the
  // pass waits on their latency). Groups past the rows or columns of x hold zeros, which any mask keeps zero.
  static __device__ __forceinline__ void keep_bits(uint32_t bits[kGroups], int64_t m0, int64_t K, int64_t k0,
                                                   uint32_t thr, uint64_t seed, uint64_t offset) {
#pragma unroll
    for (int i = 0; i < kGroups; ++i)
      bits[i] = dropout_keep_bits8(seed, dropout_counter(offset, m0 + row(i), K, (k0 + col(i)) / kDropoutGroup), thr);
  }
  // keep_bits from the keep bytes of launch_dropout_keep_bits (row pitch K8 = ceil(K / 8)) instead of Philox: one
  // byte load per group. Groups past the rows or columns of x (zeros in the tile) read nothing.
  static __device__ __forceinline__ void load_keep_bits(uint32_t bits[kGroups], const uint8_t* __restrict__ keep8,
                                                        int64_t m0, int64_t M, int64_t K, int64_t k0) {
    const int64_t K8 = dropout_groups(K);
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int64_t m = m0 + row(i), k8 = (k0 + col(i)) / kDropoutGroup;
      bits[i] = m < M && k8 < K8 ? (uint32_t)__ldg(keep8 + m * K8 + k8) : 0xFFu;
    }
  }
  static __device__ __forceinline__ void apply_keep(T* slot, const uint32_t bits[kGroups]) {
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      uint4* q = reinterpret_cast<uint4*>(slot + row(i) * LD + col(i));
      *q = drop8<T>(*q, bits[i]);
    }
  }
};

// Dropout applied to a warp's A fragments (warp_rows_mma's a_op) from launch_dropout_keep_bits' keep bytes,
// instead of to the tile in shared memory: no read-modify-write of the tile and no work between the copy's wait and
// the barrier. A lane's fragment of k16 step ks holds rows g and g+8 of the warp's 16 x columns 16ks+2t, +1 (af[0],
// af[1]) and 16ks+8+2t, +1 (af[2], af[3]): bits 2t and 2t+1 of the keep bytes of groups 2ks and 2ks+1 of its two
// rows. Those 8 bytes per row (a 64-column tile) are loaded before the wait. A pair is multiplied by 1 or 0 (one
// fma.rn with -0 added: x * keep exactly, as the reference: a dropped inf or NaN gives NaN, a dropped -x gives -0).
template <typename T, int KC>
struct FragKeep {
  static_assert(KC == 64, "8 keep bytes per row and tile");
  uint64_t rows[2];  // the rows' 8 keep bytes, shifted right by 2t: the lane's two bits of group c at bit 8c
  // Rows m (row g of the warp's 16) and m + 8 of x (M, K), columns k0.. (k0 a multiple of 64).
  __device__ __forceinline__ void load(const uint8_t* __restrict__ keep8, int64_t m, int64_t M, int64_t K,
                                       int64_t k0, int lane_t) {
    const int64_t K8 = dropout_groups(K), k8 = k0 / kDropoutGroup;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t mm = m + 8 * h;
      const uint8_t* src = keep8 + mm * K8 + k8;
      if (mm < M && k8 + 8 <= K8 && reinterpret_cast<uintptr_t>(src) % 8 == 0) {
        rows[h] = __ldg(reinterpret_cast<const unsigned long long*>(src));
      } else {
        uint64_t v = ~0ull;  // rows and groups past x's end hold zeros: any mask keeps them
        if (mm < M)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (k8 + j < K8) v = (v & ~(0xFFull << (8 * j))) | ((uint64_t)__ldg(src + j) << (8 * j));
        rows[h] = v;
      }
      rows[h] >>= 2 * lane_t;
    }
  }
  // The same 8 bytes per row from a staged copy of the tile's keep bits (8 bytes per tile row, 8-byte aligned):
  // rows `row` and row + 8 of the tile.
  __device__ __forceinline__ void load_staged(const uint8_t* bits, int row, int lane_t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[h] = *reinterpret_cast<const uint64_t*>(bits + 8 * (row + 8 * h)) >> (2 * lane_t);
  }
  __device__ __forceinline__ void operator()(int ks, uint32_t (&af)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // af[i]: row h = i % 2, group 2ks + i / 2
      const uint32_t two = (uint32_t)(rows[i % 2] >> (8 * (2 * ks + i / 2))) & 3u;
      af[i] = mul_keep2<T>(af[i], two);
    }
  }
};

// Dropout applied to the dA pass's x fragments (the B operand, read transposed: ldsm4_t) from the keep bytes. Warp w
// reads columns 16w..16w+15 of a 64-row tile, the keep bytes of groups 2w and 2w+1: lane L loads them for rows 2L and
// 2L+1 (one word), and the lanes take the words they need by shuffles. In k16 step mb a lane's fragment b[i] holds
// rows 16mb+2t and +1 (i = 0, 2) or 16mb+8+2t and +1 (i = 1, 3) of column g (i < 2) or 8+g (i >= 2): bit g of the
// group's byte of each of its two rows. A pair is multiplied by 1 or 0 as in FragKeep.
template <typename T, int BM>
struct FragKeepT {
  static_assert(BM == 64, "two rows per lane");
  uint32_t word;  // bytes: (row 2L, group 2w), (2L, 2w+1), (2L+1, 2w), (2L+1, 2w+1)
  int g, t;
  // Tile rows m0.. of x (M, K), columns k0.. (k0 a multiple of 128), warp w's 16 columns.
  __device__ __forceinline__ void load(const uint8_t* __restrict__ keep8, int64_t m0, int64_t M, int64_t K,
                                       int64_t k0, int warp, int lane) {
    g = lane >> 2;
    t = lane & 3;
    const int64_t K8 = dropout_groups(K), k8 = k0 / kDropoutGroup + 2 * warp;
    uint32_t w = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + 2 * lane + h;
      uint32_t two = 0xFFFFu;  // rows and groups past x's end hold zeros: any mask keeps them
      if (m < M) {
        const uint8_t* src = keep8 + m * K8 + k8;
        if (k8 + 2 <= K8 && reinterpret_cast<uintptr_t>(src) % 2 == 0)
          two = __ldg(reinterpret_cast<const unsigned short*>(src));
        else
          two = (uint32_t)(k8 < K8 ? __ldg(src) : 0xFF) | (uint32_t)(k8 + 1 < K8 ? __ldg(src + 1) : 0xFF) << 8;
      }
      w |= two << (16 * h);
    }
    word = w;
  }
  // k16 step mb's fragment b (warp-wide: every lane calls it).
  __device__ __forceinline__ void apply(int mb, uint32_t (&b)[4]) const {
    const uint32_t lo = __shfl_sync(0xffffffffu, word, 8 * mb + t), hi = __shfl_sync(0xffffffffu, word, 8 * mb + 4 + t);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t src = i % 2 == 0 ? lo : hi, sh = 8 * (i / 2) + g;  // byte of group 2w + i / 2, bit g
      const uint32_t two = ((src >> sh) & 1u) | ((src >> (sh + 16)) & 1u) << 1;
      b[i] = mul_keep2<T>(b[i], two);
    }
  }
};

// A side operand's ROWS x COLS tile of TS (fp32 or 16-bit) in registers, 4-groups spread over the block, between
// its global loads (fetch) and its store to shared memory as T (stash).
template <typename TS, int ROWS, int COLS>
struct SideTile {
  static constexpr int kGroups = ROWS * COLS / 4 / kTcThreads;  // 4-groups per thread and tile
  static_assert(ROWS * COLS == 4 * kTcThreads * kGroups, "whole 4-groups per thread");
  // (Unsigned index arithmetic here, signed in StreamTile: the combination that needs the fewest registers.)
  static __device__ __forceinline__ int row(int i) { return (threadIdx.x + i * kTcThreads) / (COLS / 4); }
  static __device__ __forceinline__ int col(int i) { return (threadIdx.x + i * kTcThreads) % (COLS / 4) * 4; }
  Vec4<TS> v[kGroups];

  // The tile whose element (0, 0) is src[row0 * ld + col0]. full: every row and column in range and every 4-group
  // aligned (no per-group checks); otherwise rows from row_end and columns from col_end on read as zeros. The index
  // types are the caller's (int for rank-sized values: 32-bit arithmetic where it cannot overflow).
  template <typename R0, typename LD, typename C0, typename RE, typename CE>
  __device__ __forceinline__ void fetch(const TS* src, LD ld, R0 row0, C0 col0, bool full, RE row_end, CE col_end) {
    if (full) {
#pragma unroll
      for (int i = 0; i < kGroups; ++i)
        v[i] = *reinterpret_cast<const Vec4<TS>*>(src + (row0 + row(i)) * ld + col0 + col(i));
      return;
    }
#pragma unroll
    for (int i = 0; i < kGroups; ++i)
      v[i] = ld4<TS>(src + (row0 + row(i)) * ld + col0 + col(i),
                     row0 + row(i) < row_end ? n_valid(col_end - (col0 + col(i)), 4) : 0);
  }

  // Into shared memory as T, row pitch ldd. P > 1 (fp32 side operand, bf16 T): the P pieces of the bf16x3 split,
  // piece i at dst + i * piece_stride.
  template <typename T, int P = 1>
  __device__ __forceinline__ void stash(T* dst, int ldd, int piece_stride = 0) const {
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      T* d = dst + row(i) * ldd + col(i);
      if constexpr (P == 1) {
        *reinterpret_cast<uint2*>(d) = to_t4<T, TS>(v[i]);
      } else {
#pragma unroll
        for (int pc = 0; pc < P; ++pc) *reinterpret_cast<uint2*>(d + pc * piece_stride) = to_t4_piece<T, TS>(v[i], pc);
      }
    }
  }
};

// The pipeline steps (see the top of this file). issue(t): cp.async of streamed tile t into ring slot t % kStages;
// fetch(t): side tile t into registers; stash(t): registers into side buffer t % 2.
// first(): more staging for tile 0, right after its side tile (the dy pass's u tile).
template <typename Issue, typename Fetch, typename Stash, typename First>
__device__ __forceinline__ void pipeline_start(int64_t n_tiles, Issue&& issue, Fetch&& fetch, Stash&& stash,
                                               First&& first) {
  static_assert(kStages == 3, "two tiles in flight");
  if (n_tiles > 0) issue(0);
  cp_async_commit();
  if (n_tiles > 1) issue(1);
  cp_async_commit();
  if (n_tiles > 0) {
    fetch(0);
    stash(0);
    first();
  }
  if (n_tiles > 1) fetch(1);
}

template <typename Issue, typename Landed>
__device__ __forceinline__ void pipeline_wait(int64_t t, int64_t n_tiles, Issue&& issue, Landed&& landed) {
  cp_async_wait<kStages - 2>();
  landed();
  __syncthreads();
  if (t + kStages - 1 < n_tiles) issue(t + kStages - 1);
  cp_async_commit();
}

// After tile t of the tiles .. end-1: side tile t+1 to shared memory, t+2 to registers (the streaming kernels'
// tiles, the output-writing kernels' chunks).
template <typename Fetch, typename Stash>
__device__ __forceinline__ void pipeline_next(int64_t t, int64_t end, Fetch&& fetch, Stash&& stash) {
  if (t + 1 < end) {
    stash(t + 1);
    if (t + 2 < end) fetch(t + 2);
  }
}

// acc += this warp's 16 rows (16 * warp..) of the left tile a (row-major, pitch lda) times the right tile b (COLS
// columns; stored [n][k] with pitch ldb when kBT, else [k][n]) over k < kp (a multiple of 16), fp32 accumulators in
// the mma.m16n8 layout; the k loop unrolled UNROLL times. The shrink and the output-writing kernels (expand, dx).
// P > 1: b holds the P pieces of a bf16x3-split operand (piece i at b + i * b_piece); piece 0's products go to acc,
// the smaller pieces' to acc_lo (a separate chain, so that the tensor cores' truncating accumulation of acc takes
// as many steps as with one piece; the caller adds acc_lo in fp32).
// a_op(ks, af), where given, transforms each k16 step's A fragment before its products (the shrink's dropout).
struct NoFragOp {
  __device__ __forceinline__ void operator()(int, uint32_t (&)[4]) const {}
};
template <typename T, int COLS, bool kBT, int UNROLL, int P = 1, typename AOp = NoFragOp>
__device__ __forceinline__ void warp_rows_mma(float (&acc)[COLS / 8][4], const T* a, int lda, const T* b, int ldb,
                                              int kp, const LaneOffsets& lo, int warp, int b_piece = 0,
                                              float (*acc_lo)[4] = nullptr, const AOp& a_op = AOp{}) {
#pragma unroll UNROLL
  for (int ks = 0; ks < kp / 16; ++ks) {
    uint32_t af[4];
    ldsm4(af, a + (16 * warp + lo.r1) * lda + 16 * ks + lo.c1);
    a_op(ks, af);
#pragma unroll
    for (int f = 0; f < COLS / 16; ++f) {
#pragma unroll
      for (int pc = 0; pc < P; ++pc) {
        uint32_t bf[4];
        if constexpr (kBT)
          ldsm4(bf, b + pc * b_piece + (16 * f + lo.r2) * ldb + 16 * ks + lo.c2);
        else
          ldsm4_t(bf, b + pc * b_piece + (16 * ks + lo.r1) * ldb + 16 * f + lo.c1);
        if (pc == 0)
          mma16816x2<T>(acc[2 * f], acc[2 * f + 1], af, bf);
        else
          mma16816x2<T>(acc_lo[2 * f], acc_lo[2 * f + 1], af, bf);
      }
    }
  }
}

// Output-writing kernels (expand, dx): warp-wide, this warp's 16 rows of the staging tile os (row pitch ldo, cols
// columns) go to out (row stride ld) at rows m0 + 16 * warp.., columns n0..; rows from M and columns from N on are
// left out. Each lane stores 16-byte groups (a warp covers whole 128-byte row segments). xf(v, m, n) transforms each
// 8-group before its store (the dx pass's mask). full: every row and column in range and 16-byte aligned.
template <int COLS, typename T, typename F>
__device__ __forceinline__ void store_staged_rows(T* out, int64_t ld, const T* os, int ldo, int64_t m0, int64_t n0,
                                                  int64_t M, int64_t N, bool full, F&& xf) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __syncwarp();  // the warp's staged rows are complete
  if (full) {
#pragma unroll
    for (int i = 0; i < 16 * COLS / 8 / 32; ++i) {
      const int gi = lane + 32 * i, mm = 16 * warp + gi / (COLS / 8), c = gi % (COLS / 8) * 8;
      const uint4 v = xf(*reinterpret_cast<const uint4*>(os + mm * ldo + c), m0 + mm, n0 + c);
      *reinterpret_cast<uint4*>(out + (m0 + mm) * ld + n0 + c) = v;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 16 * COLS / 8 / 32; ++i) {
    const int gi = lane + 32 * i, mm = 16 * warp + gi / (COLS / 8), c = gi % (COLS / 8) * 8;
    const int64_t m = m0 + mm, n = n0 + c;
    if (m < M && n < N)
      st8_raw<T>(out + m * ld + n, n_valid(N - n, 8), xf(*reinterpret_cast<const uint4*>(os + mm * ldo + c), m, n));
  }
}

// One block of an output-writing kernel (expand, dx; the shape is described in expand.cu): output rows m0 .. m0 +
// TO_BM - 1 of an (M, cols) output, chunks c_begin .. c_end - 1 of TO_BN columns (grid.y picks the group of
// chunks_per_group). Dynamic shared memory: left, the left operand's TO_BM x r fp32 rows as T (row pitch ldl, r padded
// to 16 with zeros; loaded by the constructor); right, the right operand's double buffer (two buffers of
// right_stride T); os, the TO_BM x TO_LDO output staging tile.
template <typename T>
struct OutputBlock {
  static_assert(TO_BM == 16 * (kTcThreads / 32), "one 16-row strip per warp");
  T* left;
  T* right;
  T* os;
  int ldl, right_stride;
  int64_t m0, c_begin, c_end;

  __device__ __forceinline__ OutputBlock(const float* src, int64_t M, int r, int ldl_, int right_stride_,
                                         int64_t cols, int64_t chunks_per_group)
      : ldl(ldl_), right_stride(right_stride_) {
    extern __shared__ __align__(128) unsigned char lk_smem[];
    left = reinterpret_cast<T*>(lk_smem);
    right = left + TO_BM * ldl;
    os = right + 2 * right_stride;
    m0 = (int64_t)blockIdx.x * TO_BM;
    const int64_t n_chunks = (cols + TO_BN - 1) / TO_BN;
    c_begin = (int64_t)blockIdx.y * chunks_per_group;
    c_end = min64(n_chunks, c_begin + chunks_per_group);
    load_tile_as_t<T, float>(left, ldl, src + m0 * r, r, TO_BM, round16(r) / 4, M - m0, r);
  }

  // The right operand's buffer for chunk ch.
  __device__ __forceinline__ T* right_buf(int64_t ch) const { return right + (int)((ch - c_begin) % 2) * right_stride; }

  // The block's chunks: fetch(ch) loads the right operand's chunk ch into registers, stash(ch) stores them into
  // right_buf(ch) (chunk c_begin staged and chunk c_begin + 1 fetched before the loop, then pipeline_next). Per chunk,
  // one barrier (right chunk and left tile complete; every warp done with the previous chunk), acc = this warp's 16
  // rows of left times the right chunk (warp_rows_mma over k < kp; kBT: stored [n][k], else [k][n]; pitch ldr), then
  // epilogue(acc, c0) stages and writes the warp's rows (c0: the chunk's first output column).
  template <bool kBT, typename Fetch, typename Stash, typename Epilogue>
  __device__ __forceinline__ void run(int ldr, int kp, const LaneOffsets& lo, int warp, Fetch&& fetch, Stash&& stash,
                                      Epilogue&& epilogue) const {
    if (c_begin < c_end) {
      fetch(c_begin);
      stash(c_begin);
      if (c_begin + 1 < c_end) fetch(c_begin + 1);
    }
    for (int64_t ch = c_begin; ch < c_end; ++ch) {
      const T* rb = right_buf(ch);
      __syncthreads();
      float acc[TO_BN / 8][4];
      zero_acc(acc);
      warp_rows_mma<T, TO_BN, kBT, 2>(acc, left, ldl, rb, ldr, kp, lo, warp);
      epilogue(acc, ch * TO_BN);
      pipeline_next(ch, c_end, fetch, stash);
    }
  }
};
#endif  // LK_TC_ARCH

}  // namespace detail
}  // namespace lora_kernels
