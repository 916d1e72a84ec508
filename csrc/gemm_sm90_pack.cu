// The rank-r operands of the sm_90 LoRA GEMM (gemm_sm90.h), packed into its K-extension layout.
//
// Math:   out (rows_out, cols_out) in the GEMM's 16-bit dtype, out[i, j] = scale · in[i, j] inside in's
//         (rows_in, cols_in) and 0 outside: the forward's s·u (M, r) -> (M, Kx) and lora_B (N, r) -> (N, Kx), the
//         backward's s·g (M, r) -> (M, Kx) and lora_A (r, K) -> (Kx, K). The zeros make the padded K columns add
//         nothing to the accumulator. Rounding to 16 bits here is the same policy as the other tensor-core
//         passes: every operand of a 16-bit product is cast to x's dtype, the sum is fp32.
//         An fp32 input may come as split-K partials, summed here in a fixed order (the forward's u: this launch
//         is also the shrink's reduction and writes the fp32 u kept for backward). With fp32 adapters on bf16 the
//         backward's job also writes the bf16x3 pieces of s·g, the dA GEMM's operand (dA_gemm_sm90.cu).
// Tiling: one thread per 8 output elements (one 16-byte store); rows are independent. Two jobs share one launch
//         (blocks [0, blocks_a) do job a, the next job b), so the forward packs u and B in one launch. The blocks
//         after those run the ReduceJob (the backward's dB partials), one thread per 4 outputs (or per output where
//         the 16-byte loads do not fit): a launch fewer.
#include "gemm_sm90_pack.h"

#include "common.cuh"  // bf16x3_split
#include "pdl.cuh"
#include "reduce.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>
#include <type_traits>

namespace lora_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // 16-bit elements per 16-byte store

template <typename T> __device__ __forceinline__ float load_f(const void* p, int64_t i);
template <> __device__ __forceinline__ float load_f<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}
template <> __device__ __forceinline__ float load_f<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

template <typename TO> __device__ __forceinline__ TO store_cast(float v);
template <> __device__ __forceinline__ __half store_cast<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The 8 input values of out[row, c0 .. c0+8) (row < rows_in), summed over the partials for fp32 input; zeros past
// cols_in. Whole 8-groups inside cols_in take 16-byte loads.
__device__ __forceinline__ void load8(const PackJob& j, int64_t row, int64_t c0, float (&f)[kVec]) {
  const int64_t base = row * j.cols_in + c0;
  const bool whole = c0 + kVec <= j.cols_in && j.cols_in % kVec == 0;
  if (j.in_dtype == DType::kFloat32) {
    const float* in = static_cast<const float*>(j.in);
    if (whole) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] = 0.f;
      for (int64_t t = 0; t < j.partials; ++t) {
        const float4 a = *reinterpret_cast<const float4*>(in + t * j.partial_stride + base);
        const float4 b = *reinterpret_cast<const float4*>(in + t * j.partial_stride + base + 4);
        f[0] += a.x; f[1] += a.y; f[2] += a.z; f[3] += a.w;
        f[4] += b.x; f[5] += b.y; f[6] += b.z; f[7] += b.w;
      }
      return;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      f[e] = 0.f;
      if (c0 + e < j.cols_in)
        for (int64_t t = 0; t < j.partials; ++t) f[e] += in[t * j.partial_stride + base + e];
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    f[e] = 0.f;
    if (c0 + e < j.cols_in)
      f[e] = j.in_dtype == DType::kFloat16 ? load_f<__half>(j.in, base + e) : load_f<__nv_bfloat16>(j.in, base + e);
  }
}

template <typename TO>
__device__ __forceinline__ void pack_job(const PackJob& j, int64_t t) {
  const int64_t groups_per_row = j.cols_out / kVec;
  const int64_t row = t / groups_per_row;
  if (row >= j.rows_out) return;
  const int64_t c0 = (t % groups_per_row) * kVec;
  float f[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) f[e] = 0.f;
  if (row < j.rows_in && c0 < j.cols_in) {
    load8(j, row, c0, f);
    if (j.sum_out != nullptr) {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (c0 + e < j.cols_in) j.sum_out[row * j.cols_in + c0 + e] = f[e];
    }
  }
  alignas(16) TO v[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) v[e] = store_cast<TO>(f[e] * j.scale);
  *reinterpret_cast<uint4*>(static_cast<TO*>(j.out) + row * j.cols_out + c0) = *reinterpret_cast<const uint4*>(v);
  if constexpr (std::is_same_v<TO, __nv_bfloat16>) {
    if (j.pieces_out != nullptr && row < j.rows_in && c0 < j.cols_in) {  // a whole 8-group: cols_in % 8 == 0
      alignas(16) __nv_bfloat16 pc[3][kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        __nv_bfloat16 q[3];
        detail::bf16x3_split(f[e] * j.scale, q);
        pc[0][e] = q[0]; pc[1][e] = q[1]; pc[2][e] = q[2];
      }
      __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(j.pieces_out) + row * j.pieces_ld + c0;
#pragma unroll
      for (int q = 0; q < 3; ++q)
        *reinterpret_cast<uint4*>(dst + q * j.cols_in) = *reinterpret_cast<const uint4*>(pc[q]);
    }
  }
}

// Item t of the reduction: outputs [4 t, 4 t + 4) (vec4) or output t.
template <typename TR>
__device__ __forceinline__ void reduce_item(const ReduceJob& c, bool vec4, int64_t t) {
  TR* out = static_cast<TR*>(c.out);
  if (vec4) {
    if (t < c.count / 4) detail::reduce_partials_four(c.in, c.parts, c.count, out, t);
  } else if (t < c.count) {
    detail::reduce_partials_one(c.in, c.parts, c.count, out, t);
  }
}

template <typename TO>
__global__ void __launch_bounds__(kThreads)
pack_kernel(PackJob a, PackJob b, ReduceJob c, int64_t blocks_a, int64_t blocks_ab, bool vec4) {
  pdl_launch_dependents();  // the GEMM launched next may set up under this launch (it waits for it to finish)
  // One call per branch rather than one on a selected job: selecting between two kernel parameters at run time
  // would copy the struct to local memory.
  if (blockIdx.x < blocks_a) {
    pack_job<TO>(a, (int64_t)blockIdx.x * kThreads + threadIdx.x);
  } else if (blockIdx.x < blocks_ab) {
    pack_job<TO>(b, ((int64_t)blockIdx.x - blocks_a) * kThreads + threadIdx.x);
  } else {
    const int64_t t = ((int64_t)blockIdx.x - blocks_ab) * kThreads + threadIdx.x;
    if (c.out_dtype == DType::kFloat32) {
      reduce_item<float>(c, vec4, t);
    } else if (c.out_dtype == DType::kBFloat16) {
      reduce_item<__nv_bfloat16>(c, vec4, t);
    } else {
      reduce_item<__half>(c, vec4, t);
    }
  }
}

int64_t job_blocks(const PackJob& j) {
  if (j.out == nullptr || j.rows_out == 0) return 0;
  return (j.rows_out * (j.cols_out / kVec) + kThreads - 1) / kThreads;
}

int64_t reduce_blocks(const ReduceJob& c, bool vec4) {
  if (c.out == nullptr || c.count <= 0) return 0;
  return ((vec4 ? c.count / 4 : c.count) + kThreads - 1) / kThreads;
}

}  // namespace

cudaError_t launch_pack_rank_operands(const PackJob& a, const PackJob& b, DType out_dtype, cudaStream_t stream,
                                      const ReduceJob& c) {
  if (a.cols_out % kVec || b.cols_out % kVec) return cudaErrorInvalidValue;
  for (const PackJob* j : {&a, &b})
    if (j->pieces_out != nullptr && (out_dtype != DType::kBFloat16 || j->cols_in % kVec || j->pieces_ld % kVec ||
                                     j->pieces_ld < 3 * j->cols_in || j->cols_in > j->cols_out))
      return cudaErrorInvalidValue;
  if (c.out != nullptr && (c.in == nullptr || c.parts < 1)) return cudaErrorInvalidValue;
  // 4-output items where launch_reduce_partials takes them
  const bool vec4 = c.out != nullptr && detail::reduce_partials_vec4(c.in, c.count, c.out,
                                                                    c.out_dtype == DType::kFloat32 ? 4 : 2);
  const int64_t ba = job_blocks(a), bb = job_blocks(b), bc = reduce_blocks(c, vec4);
  if (ba + bb + bc == 0) return cudaSuccess;
  const unsigned grid = (unsigned)(ba + bb + bc);
  if (out_dtype == DType::kBFloat16) {
    pack_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a, b, c, ba, ba + bb, vec4);
  } else if (out_dtype == DType::kFloat16) {
    pack_kernel<__half><<<grid, kThreads, 0, stream>>>(a, b, c, ba, ba + bb, vec4);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lora_kernels
