// Host cost of what CUTLASS's TMA descriptors do per GEMM call (cutlass/cuda_host_adapter.hpp without
// CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL): look up cuTensorMapEncodeTiled with cudaGetDriverEntryPointByVersion, then
// call it. Times, per call: the lookup alone, the encode alone (pointer looked up once), and both, as a GEMM call
// pays them (our fused forward builds about 7 descriptors a call, the K-extended GEMM 4-5).
// No torch:  nvcc -O2 -std=c++17 bench/dev/driver_entry_probe.cu -o /tmp/dep && /tmp/dep
#include <chrono>
#include <cstdio>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

int main() {
  void* dev = nullptr;
  if (cudaMalloc(&dev, 64 << 20) != cudaSuccess) { printf("cudaMalloc failed\n"); return 1; }
  cudaDriverEntryPointQueryResult q;
  void* pfn = nullptr;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &pfn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess) { printf("lookup failed\n"); return 1; }
  auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(pfn);
  CUtensorMap map;
  const cuuint64_t dims[2] = {4096, 8192};
  const cuuint64_t strides[1] = {4096 * 2};
  const cuuint32_t box[2] = {64, 128};
  const cuuint32_t estr[2] = {1, 1};
  auto run_encode = [&](PFN_cuTensorMapEncodeTiled_v12000 f) {
    return f(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, dev, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  };
  const int n = 20000;
  using clk = std::chrono::steady_clock;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clk::now();
    for (int i = 0; i < n; ++i) {
      void* p = nullptr;
      cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
      if (!p) return 1;
    }
    auto t1 = clk::now();
    for (int i = 0; i < n; ++i)
      if (run_encode(encode) != CUDA_SUCCESS) { printf("encode failed\n"); return 1; }
    auto t2 = clk::now();
    for (int i = 0; i < n; ++i) {
      void* p = nullptr;
      cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
      if (run_encode(reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p)) != CUDA_SUCCESS) return 1;
    }
    auto t3 = clk::now();
    auto us = [&](clk::time_point a, clk::time_point b) {
      return std::chrono::duration<double, std::micro>(b - a).count() / n;
    };
    printf("per call: entry-point lookup %.3f us, encode %.3f us, both %.3f us\n", us(t0, t1), us(t1, t2), us(t2, t3));
  }
  return 0;
}
