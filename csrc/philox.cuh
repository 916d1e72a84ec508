// Philox 4x32-10 exactly as Triton's tl.philox / tl.rand, and the dropout mask of the lora_kernels contract.
//
// Element (m, k) of an (M, K) input uses counter c = offset + m * ceil(K/4) + k/4 (c0 = low 32 bits,
// c1 = high 32 bits, c2 = c3 = 0), key (seed low 32, seed high 32), output word k % 4; uniform as tl.rand
// (bitcast to int32, negative -> ~x, times 4.6566127342e-10f); kept iff uniform >= p (float32).
// The reference is lora_kernels/philox.py. Host+device so tests/test_philox_cuda_host.py can check it on a CPU.
// No torch headers here.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lora_kernels {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;

LK_HD uint32_t lk_umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// Philox 4x32-10 on (c0, c1, c2, c3) with key (k0, k1); writes the four output words.
LK_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                         uint32_t out[4]) {
#pragma unroll
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = lk_umulhi(kPhiloxRoundB, _c2) ^ c1 ^ k0;
    c2 = lk_umulhi(kPhiloxRoundA, _c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * _c2;
    c3 = kPhiloxRoundA * _c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// tl.rand's uint32 -> float in [0, 1).
LK_HD float philox_uniform(uint32_t w) {
  int32_t x = (int32_t)w;
  if (x < 0) x = ~x;
  return (float)x * kUniformScale;
}

// Counter of the group of 4 elements holding (m, k) of an (M, K) input (k4 = k / 4).
LK_HD uint64_t dropout_counter(uint64_t offset, int64_t m, int64_t K, int64_t k4) {
  const uint64_t K4 = (uint64_t)((K + 3) / 4);
  return offset + (uint64_t)m * K4 + (uint64_t)k4;
}

// Keep flags of the 4 elements (m, 4*k4 .. 4*k4+3): one Philox call. p as float32; p == 0 keeps everything.
LK_HD void dropout_keep4(uint64_t seed, uint64_t counter, float p, bool keep[4]) {
  uint32_t w[4];
  philox4x32_10((uint32_t)(counter & 0xFFFFFFFFull), (uint32_t)(counter >> 32), 0u, 0u,
                (uint32_t)(seed & 0xFFFFFFFFull), (uint32_t)(seed >> 32), w);
#pragma unroll
  for (int q = 0; q < 4; ++q) keep[q] = philox_uniform(w[q]) >= p;
}

}  // namespace lora_kernels
