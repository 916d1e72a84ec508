// GPU time of a launch sequence as the suite measures it, for the torch-free microbenchmarks (small_m_bench.cu,
// stream_bench.cu, stream_tma_probe.cu): each repetition queued behind a GPU sleep (so the host's enqueue is hidden),
// timed by CUDA events, median of `reps`; f(i) gets the repetition's index (to rotate through buffer sets larger
// than L2).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CK(x)                                                                 \
  do {                                                                        \
    cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                  \
      printf("CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__); \
      exit(1);                                                                \
    }                                                                         \
  } while (0)

__global__ void sleep_kernel(int64_t cycles) {
  const int64_t t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// A plain streaming read of n 16-byte chunks (ld.global.cs, grid-stride): the rate the streaming passes are held to.
__global__ void plain_read(const uint4* p, int64_t n, float* sink) {
  float acc = 0.f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc += __uint_as_float(v.x ^ v.w);
  }
  if (acc == 1.2345f) sink[0] = acc;
}

// microseconds: median over reps, after 3 untimed calls
inline float time_it(const std::function<void(int)>& f, cudaStream_t st, int reps = 30,
                     int64_t sleep_cycles = 100000) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f(i);
  std::vector<float> ts;
  for (int i = 0; i < reps; ++i) {
    sleep_kernel<<<1, 1, 0, st>>>(sleep_cycles);
    CK(cudaEventRecord(a, st));
    f(i);
    CK(cudaEventRecord(b, st));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1e3f);
  }
  std::sort(ts.begin(), ts.end());
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return ts[ts.size() / 2];
}
