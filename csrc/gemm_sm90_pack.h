// Packing of the rank-r operands into the sm_90 GEMM's K-extension layout (gemm_sm90_pack.cu).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "lora_kernels.cuh"  // DType

namespace lora_kernels {

// out (rows_out, cols_out), 16-bit, row-major = scale · in (rows_in, cols_in), row-major, zero outside it.
// cols_out must be a multiple of 8 and out 16-byte aligned. A job with out == nullptr does nothing.
// With partials > 1 the fp32 input is `partials` such blocks, partial_stride floats apart, summed in order (a
// split-K pass's partial results), and sum_out (if set) receives the fp32 sum (rows_in, cols_in), unscaled.
struct PackJob {
  const void* in = nullptr;
  DType in_dtype = DType::kFloat32;
  int64_t rows_in = 0, cols_in = 0;
  void* out = nullptr;
  int64_t rows_out = 0, cols_out = 0;
  float scale = 1.f;
  int64_t partials = 1;
  int64_t partial_stride = 0;
  float* sum_out = nullptr;
  // With a bf16 out: also the bf16x3 pieces of scale · in (common.cuh bf16x3_split, exact), piece p of in[i, j] at
  // pieces_out[i * pieces_ld + p * cols_in + j] (rows_in rows; cols_in and pieces_ld multiples of 8, 16-byte aligned):
  // the dA GEMM's operand with fp32 adapters. null: none.
  void* pieces_out = nullptr;
  int64_t pieces_ld = 0;
};

// A reduction that the same launch runs in blocks of its own: out (count elements of out_dtype) = the sum of `parts`
// fp32 blocks of `count` floats at `in`, launch_reduce_partials's sums bit for bit (reduce.cuh). The backward's dB
// partials, summed here instead of in a launch of their own. out == nullptr: none. `in` must not overlap the jobs'
// outputs.
struct ReduceJob {
  const float* in = nullptr;
  int64_t parts = 1, count = 0;
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
};

// Runs both jobs (and the reduction) in one launch; out_dtype is kFloat16 or kBFloat16.
cudaError_t launch_pack_rank_operands(const PackJob& a, const PackJob& b, DType out_dtype, cudaStream_t stream,
                                      const ReduceJob& c = ReduceJob{});

}  // namespace lora_kernels
