// Device helpers shared by every kernel file: dtype conversion, vector loads and stores, the dropout mask applied
// to loaded or stored groups, and the block shapes common to all kernels. No torch headers.
//
// Design of the kernels around the frozen GEMMs (binding.cpp calls them): the expand pass writes y = u B^T + bias
// once, then cuBLAS runs y += x W^T with beta = 1 (it reads y in its epilogue, overlapped with its compute-bound
// main loop); the same for dx (the dx pass, then dx += dy W). Extra traffic per layer: one write of y (M*N) and one
// read of x (shrink). On sm_90 with 16-bit x the forward and the dropout-free dx instead run as one CUTLASS GEMM
// with the rank-r term in its K axis (gemm_sm90.*, fed by the shrink and gemm_sm90_pack.cu); these passes then
// serve the other GPUs, dtypes and shapes, and the dx with dropout.
//
// Two implementations of every rank-r kernel, side by side in each pass's file:
//  * 16-bit inputs (x dtype T = fp16 / bf16) on sm_80+: tensor cores, ldmatrix + mma.sync.m16n8k16 with fp32
//    accumulators (inline PTX, ptx.cuh; WMMA's fragment loads compiled to generic 32-bit loads here). Precision
//    policy (the Triton backend's): every mma operand is cast to T in shared memory first (fp32 adapters A / B, the
//    fp32 buffers u and g), accumulation is fp32, outputs as documented. The kernels are memory-bound: each streams
//    one big operand (x or dy) or writes one big output (y or dx) once, with 16-byte accesses. The streamed input
//    goes through a 3-deep cp.async ring (two tiles in flight while the tensor cores work on the third); the small
//    side operands (A, B, u, g tiles) are register-prefetched a tile ahead into double-buffered shared memory, so
//    each streamed tile costs one block barrier (staging.cuh). r is zero-padded to a multiple of 16 in shared
//    memory; the kernels whose accumulators grow with r (shrink, dy pass, dA) take r in chunks of at most 64 columns
//    (grid.z), so r up to 256 costs extra passes over x / dy rather than registers.
//  * fp32 inputs (and 16-bit inputs on GPUs below sm_80): the FFMA kernels with fp32 shared memory (lora_*_kernel).
// The dropout mask is regenerated from philox.cuh identically in every kernel, so forward and backward see the same
// mask: one Philox call per 8-group x[m, k..k+7] (k a multiple of 8) in the tensor-core kernels, one per 4-group
// (half of an 8-group's words) in the FFMA kernels.
// Every reduction has a fixed order and each output element (or partial-buffer element) has one owner: no atomics.
#pragma once
#include "lora_kernels.cuh"
#include "philox.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

// bf16 mma.sync and cp.async need sm_80: a build for an older architecture compiles the tensor-core kernels to a
// trap, and the launchers never pick them there (tc_supported()).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LK_TC_ARCH 1
#else
#define LK_TC_ARCH 0
#endif

namespace lora_kernels {
namespace detail {

constexpr int kThreads = 256;  // threads per block of the FFMA kernels

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// The items [begin, end) of 0 .. n that block `idx` owns when each block owns `per` of them (a row split or a
// column group of the split plans).
struct Span {
  int64_t begin, end;
};
__device__ __forceinline__ Span block_span(int64_t idx, int64_t per, int64_t n) {
  const int64_t begin = idx * per;
  return {begin, min64(n, begin + per)};
}

// DoRA at p = 0 takes z = (y − b)/g from the output y. y is rounded at the scale of max(|g z|, |b|), so z's error
// grows as |b|/|g| where |g| is small; PEFT's base_result − bias is not divided by g. And y's LoRA part went through
// the GEMM's 16-bit operands (s·u and B rounded to x's dtype), where PEFT keeps it in the adapters' float32: where
// the adapter's row s·(B A)_n is large against W_n (z dominated by its LoRA part, or the two cancelling), z from y
// carries that rounding at the LoRA part's scale. So these columns recompute z instead (launch_dora_dmag): g = 0; a
// bias and |g| < 1/2 (z's error past 2× PEFT's there); big_adapter, set by the norm's combine where
// ‖s·(B A)_n‖ > ‖W_n‖ / 2 (s²·B_n (A Aᵀ) B_nᵀ > ‖W_n‖² / 4). The same rule as lora_kernels/dora_kernels.py's
// z_lost_from_y. DoRA starts at g = 1 and B = 0, and training keeps g near 1 and the adapter small against W: the
// recompute is for unusual inputs.
constexpr float kDoraZFromYMinG = 0.5f;
constexpr float kDoraZFromYMaxAdapter = 0.5f;
__host__ __device__ __forceinline__ bool dora_recompute_z(float g, float b, bool big_adapter) {
  return g == 0.f || (b != 0.f && fabsf(g) < kDoraZFromYMinG) || big_adapter;
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One element of a buffer whose dtype is known only at run time (small passes over adapters and per-column
// vectors, where a template per dtype pair is not worth its instances) as fp32, and back (rounded to nearest).
__device__ __forceinline__ float load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// The sum of v over the 32 lanes of a warp, in every lane (butterfly: the same order in every lane).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Four consecutive elements p[0..valid-1] (valid <= 4) -> fp32, zero-filled. One vector load (16 B for fp32,
// 8 B for 16-bit types) when all four are in range and the address is aligned; scalar loads otherwise.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int valid, float v[4]) {
  if (valid >= 4 && (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0) {
    if constexpr (sizeof(T) == 4) {
      const float4 t = *reinterpret_cast<const float4*>(p);
      v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
      union { uint2 u; T e[4]; } t;
      t.u = *reinterpret_cast<const uint2*>(p);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = to_f<T>(t.e[q]);
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = q < valid ? to_f<T>(p[q]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int valid, const float v[4]) {
  if (valid >= 4 && (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      union { uint2 u; T e[4]; } t;
#pragma unroll
      for (int q = 0; q < 4; ++q) t.e[q] = from_f<T>(v[q]);
      *reinterpret_cast<uint2*>(p) = t.u;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (q < valid) p[q] = from_f<T>(v[q]);
  }
}

// The Philox key of a kernel with dropout: the seed passed by value, or, when seed_ptr is not null, the int64 at
// seed_ptr (a 0-d device tensor: the graph-safe seed that a CUDA graph's replays refill, read when the kernel runs,
// never baked into the captured arguments). The same 64 bits give the same mask either way. Kernels without dropout
// never touch the pointer. Each kernel calls it either once at its start or where it generates the mask (an
// L1-cached broadcast load), whichever ptxas gave fewer registers and no spills for, on sm_80 and sm_90.
__device__ __forceinline__ uint64_t dropout_seed(uint64_t seed, const int64_t* seed_ptr) {
  return seed_ptr != nullptr ? (uint64_t)*seed_ptr : seed;
}

// Loads the 4-group (m, k..k+3) of x (M, K) as fp32, applies the dropout mask (one Philox call), zero outside.
// A dropped element is multiplied by 0, as in the reference (x * keep): NaN and inf become NaN, not 0.
template <typename T>
__device__ __forceinline__ void load_x4_dropout(const T* __restrict__ x, int64_t M, int64_t K, int64_t m, int64_t k,
                                                float p, uint64_t seed, uint64_t offset, float v[4]) {
  if (m < M && k < K) {
    const int valid = (K - k < 4 ? (int)(K - k) : 4);
    load4<T>(x + m * K + k, valid, v);
    if (p > 0.f) {
      bool keep[4];
      dropout_keep4(seed, offset, m, K, k, p, keep);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = keep[q] ? v[q] : v[q] * 0.f;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = 0.f;
  }
}

// FFMA kernels' row sub-blocks: rows m0 .. m0 + BM - 1 of an fp32 (M, r) buffer (u or g) into shared memory
// dst [BM][r], rows from row_end on as zeros. Block-wide.
template <int BM>
__device__ __forceinline__ void load_rows(float* dst, const float* src, int64_t m0, int64_t row_end, int r) {
  for (int i = threadIdx.x; i < BM * r; i += kThreads) {
    const int64_t m = m0 + i / r;
    dst[i] = m < row_end ? src[m * r + (i % r)] : 0.f;
  }
}

// FFMA kernels' r-chunks: columns r0 .. r0 + RC - 1 of rows m0 .. m0 + BM - 1 of an fp32 (M, r) buffer (u or g)
// into shared memory dst [BM][RC + 1], zeros outside. Block-wide.
template <int BM, int RC>
__device__ __forceinline__ void load_rchunk(float (*dst)[RC + 1], const float* src, int64_t m0, int64_t M, int r,
                                            int r0) {
  for (int i = threadIdx.x; i < BM * RC; i += kThreads) {
    const int mm = i / RC, jj = i % RC;
    const int64_t m = m0 + mm;
    dst[mm][jj] = (m < M && r0 + jj < r) ? src[m * r + r0 + jj] : 0.f;
  }
}

// s + sum over i < N of a[i * lda + a0] * b[i * ldb + b0], accumulated in order i = 0, 1, ... (fp32 FFMA; int
// element offsets from the shared-memory bases keep the address arithmetic 32-bit).
template <int N>
__device__ __forceinline__ float fma_dot(float s, const float* a, int a0, int lda, const float* b, int b0, int ldb) {
#pragma unroll 8
  for (int i = 0; i < N; ++i) s = fmaf(a[i * lda + a0], b[i * ldb + b0], s);
  return s;
}

// f(i, o) for this thread's outputs o = threadIdx.x + i * kThreads < nout of the block's nout (i < MAXO, unrolled, so
// per-output accumulators indexed by i stay in registers).
template <int MAXO, typename F>
__device__ __forceinline__ void for_outputs(int nout, F&& f) {
#pragma unroll
  for (int i = 0; i < MAXO; ++i) {
    const int o = (int)threadIdx.x + i * kThreads;
    if (o < nout) f(i, o);
  }
}

// A partial-buffer element owned by this thread gets s: written by the first row sub-block, added to by the next.
// Callers compute s before the call, not in its arguments (fewer registers).
__device__ __forceinline__ void add_partial(float* dst, float s, bool first) { *dst = first ? s : *dst + s; }

// Tensor-core kernels (x dtype T = __half or __nv_bfloat16), sm_80+: ldmatrix + mma.sync.m16n8k16 (fp32
// accumulators) from shared-memory tiles of T, through inline PTX (the fragment layouts are then known, so the
// epilogues write straight from the accumulators). 256 threads = 8 warps per block.
// Shared-memory tiles of T have row pitches of (a multiple of 16) + 8 elements: rows stay 16-byte aligned and the
// 8 rows of every ldmatrix 8x8 matrix fall in distinct 16-byte bank groups (no conflicts).
// The streamed operand (x in shrink / dA, dy in dy_pass) goes through a kStages-deep cp.async ring: two tiles are
// in flight while the third is multiplied. The dropout mask is applied in place by the thread that copied the
// 8-group, after its copy landed (so the Philox work overlaps the loads of the next tiles).
constexpr int kTcThreads = 256;
constexpr int kStages = 3;
// Blocks per SM asked of the compiler (__launch_bounds__): the output-writing kernels (expand, dx) and the r-chunk
// 32/64 kernels need up to 128 registers per thread (2 blocks); the 16-column r-chunk streaming kernels fit 3 blocks
// without spills.
constexpr int kOutputMinBlocks = 2;
constexpr int kStreamMinBlocks = 3;

__host__ __device__ constexpr int round16(int r) { return (r + 15) / 16 * 16; }

#if LK_TC_ARCH  // device helpers of the tensor-core kernels (their bodies are a trap below sm_80)
// Number of valid elements of a group of n whose first element is `left` elements before the end: clamp(left, 0, n).
__device__ __forceinline__ int n_valid(int64_t left, int n) { return left <= 0 ? 0 : (left >= n ? n : (int)left); }

template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T e[4]; };

// p[0..valid-1] raw (no conversion), zero-filled: one 8/16-byte load when all 4 are in range and p is aligned.
template <typename T>
__device__ __forceinline__ Vec4<T> ld4(const T* p, int valid) {
  if (valid >= 4 && (reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<T>)) == 0)
    return *reinterpret_cast<const Vec4<T>*>(p);
  Vec4<T> v;
#pragma unroll
  for (int q = 0; q < 4; ++q) v.e[q] = q < valid ? p[q] : from_f<T>(0.f);
  return v;
}

// 8 consecutive 16-bit elements as raw bits, zero-filled: one 16-byte load when in range and aligned, else two
// 8-byte halves (each vector or scalar).
template <typename T>
__device__ __forceinline__ uint4 ld8_raw(const T* p, int valid) {
  static_assert(sizeof(T) == 2, "16-bit element type");
  if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) % 16) == 0) return *reinterpret_cast<const uint4*>(p);
  union { Vec4<T> v; uint2 u; } lo, hi;
  lo.v = ld4<T>(p, valid);
  hi.v = ld4<T>(p + 4, valid - 4);
  return make_uint4(lo.u.x, lo.u.y, hi.u.x, hi.u.y);
}

// 4 values of TA cast to T (round to nearest), packed for one 8-byte shared-memory store.
template <typename T, typename TA>
__device__ __forceinline__ uint2 to_t4(const Vec4<TA>& v) {
  union { uint2 u; T e[4]; } t;
#pragma unroll
  for (int q = 0; q < 4; ++q) t.e[q] = from_f<T>(to_f<TA>(v.e[q]));
  return t.u;
}

// The bf16x3 split of an fp32 value v into three bf16 pieces, v = p0 + p1 + p2 exactly: each piece is the residual
// so far truncated to bf16 (8 significant bits, so three hold fp32's 24), its subtraction exact. Truncation (round
// toward zero) gives every piece v's sign, and a zero piece of a nonzero v becomes v's sign times bf16's smallest
// normal (a change below 2^-125): then an infinite operand times the three pieces sums to the same infinity as times
// v, where a piece of the other sign or a zero (inf * 0) would make a NaN. Infinite v: (v, tiny, tiny); NaN stays.
// A bf16 value times the pieces, summed in fp32 on the tensor cores, is the fp32 product.
__device__ __forceinline__ float bf16x3_piece(float v, int piece) {
  float rest = v, pc = __bfloat162float(__float2bfloat16_rz(v));
  for (int i = 0; i < piece; ++i) {
    rest -= pc;
    pc = __bfloat162float(__float2bfloat16_rz(rest));
  }
  constexpr float kTiny = 1.17549435e-38f;  // 2^-126
  if (isinf(v)) return piece == 0 ? v : copysignf(kTiny, v);
  return pc == 0.f && v != 0.f ? copysignf(kTiny, v) : pc;
}

// All three pieces of v's bf16x3 split at once: p[i] == bf16x3_piece(v, i).
__device__ __forceinline__ void bf16x3_split(float v, __nv_bfloat16 (&p)[3]) {
  constexpr float kTiny = 1.17549435e-38f;  // 2^-126
  float rest = v;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const float pc = __bfloat162float(__float2bfloat16_rz(rest));
    rest -= pc;
    const float out = isinf(v) ? (i == 0 ? v : copysignf(kTiny, v)) : (pc == 0.f && v != 0.f ? copysignf(kTiny, v) : pc);
    p[i] = __float2bfloat16_rz(out);
  }
}

// 4 values of TA as piece `piece` of their bf16x3 split, packed for one 8-byte shared-memory store (T = bf16; for
// another T, which never takes pieces, the plain rounding to_t4).
template <typename T, typename TA>
__device__ __forceinline__ uint2 to_t4_piece(const Vec4<TA>& v, int piece) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    union { uint2 u; T e[4]; } t;
#pragma unroll
    for (int q = 0; q < 4; ++q) t.e[q] = __float2bfloat16_rz(bf16x3_piece(to_f<TA>(v.e[q]), piece));
    return t.u;
  } else {
    return to_t4<T, TA>(v);
  }
}

// A dropped 16-bit element (raw bits of T) times 0, as the reference computes x * keep: +0 for a finite value,
// NaN for inf or NaN. (Used on x, and on dx's LoRA term already rounded to T: a finite term that overflowed T at a
// dropped element also becomes NaN; that term overflows at the kept elements too.)
template <typename T>
__device__ __forceinline__ unsigned short dropped16(unsigned short h) {
  constexpr unsigned short kExp = std::is_same<T, __half>::value ? 0x7C00 : 0x7F80;  // all-ones exponent: inf/NaN
  constexpr unsigned short kNaN = std::is_same<T, __half>::value ? 0x7E00 : 0x7FC0;
  return (h & kExp) == kExp ? kNaN : 0;
}

// The 8 elements of T (raw 16-bit bits) with the dropped ones (bit q clear in keep) made dropped16().
template <typename T>
__device__ __forceinline__ uint4 drop8(uint4 raw, uint32_t keep) {
  union { uint4 u; unsigned short h[8]; } t;
  t.u = raw;
#pragma unroll
  for (int q = 0; q < 8; ++q)
    if (!((keep >> q) & 1u)) t.h[q] = dropped16<T>(t.h[q]);
  return t.u;
}

// Raw 16-bit bits of the 8-group p[0..valid-1] (zero-filled) stored at p (8 elements, 2-byte aligned): one 16-byte
// store when all 8 are in range and p is aligned.
template <typename T>
__device__ __forceinline__ void st8_raw(T* p, int valid, uint4 v) {
  if (valid >= 8 && (reinterpret_cast<uintptr_t>(p) % 16) == 0) {
    *reinterpret_cast<uint4*>(p) = v;
    return;
  }
  union { uint4 u; unsigned short h[8]; } t;
  t.u = v;
  unsigned short* q = reinterpret_cast<unsigned short*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < valid) q[i] = t.h[i];
}

// Two fp32 values to p[0..valid-1] (valid may be <= 0): one 8-byte store when both are in range and p is aligned.
__device__ __forceinline__ void st2f(float* p, int64_t left, float v0, float v1) {
  if (left >= 2 && (reinterpret_cast<uintptr_t>(p) % 8) == 0) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else if (left >= 1) {
    p[0] = v0;
    if (left >= 2) p[1] = v1;
  }
}

// Two fp32 values rounded to T, packed (lower address first) for one 4-byte store.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float v0, float v1) {
  union { uint32_t u; T e[2]; } t;
  t.e[0] = from_f<T>(v0);
  t.e[1] = from_f<T>(v1);
  return t.u;
}

#endif  // LK_TC_ARCH

}  // namespace detail
}  // namespace lora_kernels
