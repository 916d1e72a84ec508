// The keep-bits pass (csrc/dropout_bits.cu) in several forms, timed interleaved in one process, each checked byte for
// byte against the production form. The pass is integer-issue bound: about 100 instructions per Philox call
// (8 elements), 4.2 M calls for an 8192 x 4096 input. Forms:
//   prod   csrc/dropout_bits.cu's kernel as it is (grid-stride over 4-byte words; 64-bit division per word for (m, k8))
//   wide   prod with each round's two products as one 64-bit multiply (IMAD.WIDE.U32; 2026-12-01: 0.96-0.98x prod)
//   rows   no division: a 2-D grid (x: words of a row, y: rows, grid-stride), 32-bit indices within a row
//   cmp    rows, with each 16-bit half compared as a 32-bit word: hi >= thr  <=>  w >= thr << 16, and
//          lo >= thr  <=>  (w << 16) >= thr << 16 (one shift and one compare per element, no mask)
//   keys   cmp, with the ten round keys computed once per thread (they depend on the seed only)
//   g8     keys with 8 groups per thread (8 independent chains, one 8-byte store)
// No torch:  nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc bench/dev/keep_bits_bench.cu -o /tmp/kb && /tmp/kb
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cuda_runtime.h>

#include "philox.cuh"
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("err %s line %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)

using namespace lora_kernels;

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

// Philox with precomputed round keys (ka[i], kb[i] = the key of round i)
__device__ __forceinline__ void philox_keys(uint32_t c0, uint32_t c1, const uint32_t ka[10], const uint32_t kb[10],
                                            uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = __umulhi(kPhiloxRoundB, _c2) ^ c1 ^ ka[i];
    c2 = __umulhi(kPhiloxRoundA, _c0) ^ c3 ^ kb[i];
    c1 = kPhiloxRoundB * _c2;
    c3 = kPhiloxRoundA * _c0;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// keep bits of one 8-group from its words: thr16 = thr << 16
__device__ __forceinline__ uint32_t bits_cmp(const uint32_t w[4], uint32_t thr16) {
  uint32_t b = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    b |= (uint32_t)((w[q] << 16) >= thr16) << (2 * q);
    b |= (uint32_t)(w[q] >= thr16) << (2 * q + 1);
  }
  return b;
}

template <bool kWide>
__global__ void __launch_bounds__(256) k_prod(uint8_t* bits, int64_t M, int64_t K, uint32_t thr, uint64_t seed,
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

// kForm: 0 rows, 1 cmp, 2 keys; G groups per thread (4 or 8). K8 % G == 0.
template <int kForm, int G>
__global__ void __launch_bounds__(256) k_rows(uint8_t* bits, int64_t M, int64_t K, uint32_t thr, uint64_t seed,
                                              uint64_t offset) {
  const int K8 = (int)dropout_groups(K);
  const int words = K8 / G;  // G-group words per row
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= words) return;
  uint32_t ka[10], kb[10];
  {
    uint32_t a = (uint32_t)seed, b = (uint32_t)(seed >> 32);
#pragma unroll
    for (int i = 0; i < 10; ++i) { ka[i] = a; kb[i] = b; a += kPhiloxKeyA; b += kPhiloxKeyB; }
  }
  const uint32_t thr16 = thr << 16;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const uint64_t c_row = offset + (uint64_t)m * (uint64_t)K8 + (uint64_t)(j * G);
    uint32_t out[G / 4];
#pragma unroll
    for (int h = 0; h < G / 4; ++h) out[h] = 0;
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const uint64_t c = c_row + q;
      uint32_t r[4], b;
      if (kForm == 2) {
        philox_keys((uint32_t)c, (uint32_t)(c >> 32), ka, kb, r);
      } else {
        philox4x32_10((uint32_t)c, (uint32_t)(c >> 32), 0u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32), r);
      }
      if (kForm >= 1) {
        b = bits_cmp(r, thr16);
      } else {
        b = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) b |= (uint32_t)dropout_kept(r, e, thr) << e;
      }
      out[q / 4] |= b << (8 * (q % 4));
    }
    uint8_t* dst = bits + m * K8 + (int64_t)j * G;
    if (G == 4) *reinterpret_cast<uint32_t*>(dst) = out[0];
    else *reinterpret_cast<uint2*>(dst) = make_uint2(out[0], out[G / 4 - 1]);
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
  const char* names[] = {"prod", "wide", "rows", "cmp", "keys", "g8"};
  constexpr int NF = 6;
  for (int64_t K : Ks) {
    const int64_t bytes = M * dropout_groups(K);
    uint8_t* out[NF];
    for (int f = 0; f < NF; ++f) {
      CK(cudaMalloc(&out[f], bytes));
      CK(cudaMemset(out[f], 0xA0 + f, bytes));
    }
    const uint32_t thr = dropout_threshold(0.1f);
    const int K8 = (int)dropout_groups(K);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int blocks1 = (int)std::min<int64_t>((bytes / 4 + 255) / 256, (int64_t)sms * 8);
    auto launch = [&](int f, uint64_t seed) {
      const uint64_t off = 1000;
      if (f == 0) k_prod<false><<<blocks1, 256>>>(out[f], M, K, thr, seed, off);
      else if (f == 1) k_prod<true><<<blocks1, 256>>>(out[f], M, K, thr, seed, off);
      else {
        const int G = f == 5 ? 8 : 4;
        const int words = K8 / G;
        dim3 grid((words + 255) / 256, 1);
        // rows per block column: enough blocks for 8 blocks of 256 threads per SM
        const int64_t want = (int64_t)sms * 8 / grid.x;
        grid.y = (unsigned)std::max<int64_t>(1, std::min<int64_t>(M, want));
        if (f == 2) k_rows<0, 4><<<grid, 256>>>(out[f], M, K, thr, seed, off);
        else if (f == 3) k_rows<1, 4><<<grid, 256>>>(out[f], M, K, thr, seed, off);
        else if (f == 4) k_rows<2, 4><<<grid, 256>>>(out[f], M, K, thr, seed, off);
        else k_rows<2, 8><<<grid, 256>>>(out[f], M, K, thr, seed, off);
      }
    };
    float total[NF] = {};
    const int reps = 50;
    for (int it = 0; it < reps + 5; ++it)
      for (int f = 0; f < NF; ++f) {
        const uint64_t seed = 0x123456789abcdefull + it;
        CK(cudaEventRecord(e0));
        launch(f, seed);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 5) total[f] += ms;
      }
    CK(cudaGetLastError());
    uint8_t* ref = new uint8_t[bytes];
    uint8_t* h = new uint8_t[bytes];
    CK(cudaMemcpy(ref, out[0], bytes, cudaMemcpyDeviceToHost));
    printf("M=%lld K=%lld:", (long long)M, (long long)K);
    for (int f = 0; f < NF; ++f) {
      CK(cudaMemcpy(h, out[f], bytes, cudaMemcpyDeviceToHost));
      int64_t diff = 0;
      for (int64_t i = 0; i < bytes; ++i) diff += ref[i] != h[i];
      printf("  %s %.1f us%s", names[f], total[f] / reps * 1e3, diff ? " (BITS DIFFER)" : "");
    }
    printf("\n");
    delete[] ref;
    delete[] h;
    for (int f = 0; f < NF; ++f) CK(cudaFree(out[f]));
  }
  return 0;
}
