// The keep-bits pass (csrc/dropout_bits.cu) with two forms of Philox 4x32-10's round multiplies, timed interleaved in
// one process: "hi+lo" (philox.cuh's: __umulhi and a 32-bit multiply, IMAD.HI.U32 + IMAD in SASS) and "wide" (one
// 64-bit product, IMAD.WIDE.U32). Both must give the same bits. Sizes: the bits of 8192 x 4096 and of 8192 x 14336
// inputs. On the H200 (2026-12-01) wide ran at 0.96-0.98x hi+lo's speed (IMAD.WIDE issues as two multiplies), so
// philox.cuh keeps hi+lo. No torch:  nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc bench/dev/philox_bits.cu -o /tmp/philox_bits && /tmp/philox_bits
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#include "philox.cuh"
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("err %s line %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)

using namespace lora_kernels;

// Philox 4x32-10 with each round's two products as one 64-bit multiply
__device__ __forceinline__ void philox_wide(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1, uint32_t out[4]) {
#pragma unroll
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint64_t pb = (uint64_t)kPhiloxRoundB * c2, pa = (uint64_t)kPhiloxRoundA * c0;
    c0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    c2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// dropout_bits.cu's kernel (the vector path: K8 % 4 == 0), parametrised by the Philox form
template <bool kWide>
__global__ void __launch_bounds__(256) bits_kernel(uint8_t* bits, int64_t M, int64_t K, uint32_t thr, uint64_t seed,
                                                   uint64_t offset) {
  const int64_t K8 = dropout_groups(K), total = M * K8;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * 4;
  for (int64_t e0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; e0 < total; e0 += stride) {
    const int64_t m = e0 / K8, k8 = e0 % K8;
    uint32_t w = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint64_t c = dropout_counter(offset, m, K, k8 + q);
      uint32_t r[4];
      if (kWide) philox_wide((uint32_t)c, (uint32_t)(c >> 32), 0u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32), r);
      else philox4x32_10((uint32_t)c, (uint32_t)(c >> 32), 0u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32), r);
      uint32_t b = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) b |= (uint32_t)dropout_kept(r, e, thr) << e;
      w |= b << (8 * q);
    }
    *reinterpret_cast<uint32_t*>(bits + e0) = w;
  }
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, sms);
  const int64_t Ks[2] = {4096, 14336};
  const int64_t M = 8192;
  for (int64_t K : Ks) {
    const int64_t bytes = M * dropout_groups(K);
    uint8_t *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMemset(a, 0xAB, bytes));
    CK(cudaMemset(b, 0xCD, bytes));
    const int blocks = (int)std::min<int64_t>((bytes / 4 + 255) / 256, (int64_t)sms * 8);
    const uint32_t thr = dropout_threshold(0.1f);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    // one launch of either form into out with rep it's seed, its time added to *total after 5 warm-up reps
    auto timed = [&](bool wide, uint8_t* out, int it, float* total) -> int {
      float ms;
      const uint64_t seed = 0x123456789abcdefull + it;
      CK(cudaEventRecord(e0));
      if (wide) bits_kernel<true><<<blocks, 256>>>(out, M, K, thr, seed, 1000);
      else bits_kernel<false><<<blocks, 256>>>(out, M, K, thr, seed, 1000);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (it >= 5) *total += ms;
      return 0;
    };
    float t_hilo = 0, t_wide = 0;
    const int reps = 50;
    for (int it = 0; it < reps + 5; ++it)  // interleaved
      if (timed(false, a, it, &t_hilo) || timed(true, b, it, &t_wide)) return 1;
    CK(cudaGetLastError());
    // the last rep of each used the same seed: the bits must be equal byte for byte
    uint8_t *ha = new uint8_t[bytes], *hb = new uint8_t[bytes];
    CK(cudaMemcpy(ha, a, bytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hb, b, bytes, cudaMemcpyDeviceToHost));
    int64_t diff = 0;
    for (int64_t i = 0; i < bytes; ++i) diff += ha[i] != hb[i];
    printf("M=%lld K=%lld  hi+lo %.1f us  wide %.1f us  (x%.2f)  differing bytes %lld\n", (long long)M,
           (long long)K, t_hilo / reps * 1e3, t_wide / reps * 1e3, t_hilo / t_wide, (long long)diff);
    delete[] ha;
    delete[] hb;
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  return 0;
}
