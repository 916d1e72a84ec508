// Philox 4x32-10 exactly as Triton's tl.philox, and the dropout mask of the lora_kernels contract.
//
// Element (m, k) of an (M, K) input uses counter c = offset + m * ceil(K/8) + k/8 (c0 = low 32 bits,
// c1 = high 32 bits, c2 = c3 = 0), key (seed low 32, seed high 32), output word (k % 8) / 2, and of it the low
// 16 bits for even k, the high 16 bits for odd k; kept iff those bits h satisfy h >= ceil(p * 65536) (p float32).
// One Philox call serves 8 elements. The reference is lora_kernels/philox.py. Host+device so
// tests/test_philox_cuda_host.py can check it on a CPU. No torch headers here.
#pragma once
#include <math.h>
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

constexpr int kDropoutGroup = 8;  // elements per Philox call: 4 words x 2 halves

// ceil(p * 65536): an element is kept iff its 16 random bits are >= this (p * 65536 and its ceil are exact).
LK_HD uint32_t dropout_threshold(float p) { return (uint32_t)ceilf(p * 65536.0f); }

// 8-groups per row of an (M, K) input: ceil(K / 8), the counter stride of a row and the row pitch of the keep bytes.
LK_HD int64_t dropout_groups(int64_t K) { return (K + kDropoutGroup - 1) / kDropoutGroup; }

// Counter of the 8-group holding (m, k) of an (M, K) input (k8 = k / 8).
LK_HD uint64_t dropout_counter(uint64_t offset, int64_t m, int64_t K, int64_t k8) {
  return offset + (uint64_t)m * (uint64_t)dropout_groups(K) + (uint64_t)k8;
}

LK_HD void dropout_words(uint64_t seed, uint64_t counter, uint32_t w[4]) {
  philox4x32_10((uint32_t)(counter & 0xFFFFFFFFull), (uint32_t)(counter >> 32), 0u, 0u,
                (uint32_t)(seed & 0xFFFFFFFFull), (uint32_t)(seed >> 32), w);
}

// Keep flag of element e (0..7) of an 8-group from its Philox words: the low (even e) or high (odd e) 16 bits of
// word e / 2 against thr = dropout_threshold(p).
LK_HD bool dropout_kept(const uint32_t w[4], int e, uint32_t thr) {
  return ((w[e / 2] >> (16 * (e % 2))) & 0xFFFFu) >= thr;
}

// Keep flags of the 8 elements (m, 8*k8 .. 8*k8+7): one Philox call. thr = dropout_threshold(p).
LK_HD void dropout_keep8(uint64_t seed, uint64_t counter, uint32_t thr, bool keep[8]) {
  uint32_t w[4];
  dropout_words(seed, counter, w);
#pragma unroll
  for (int q = 0; q < 8; ++q) keep[q] = dropout_kept(w, q, thr);
}

// Keep bits of the 8-group of `counter`: bit q set iff element q is kept (dropout_keep8 as one word, for kernels
// that compute a tile's bits before they apply them).
LK_HD uint32_t dropout_keep_bits8(uint64_t seed, uint64_t counter, uint32_t thr) {
  uint32_t w[4], bits = 0;
  dropout_words(seed, counter, w);
#pragma unroll
  for (int q = 0; q < 8; ++q) bits |= (uint32_t)dropout_kept(w, q, thr) << q;
  return bits;
}

// Keep flags of the 4 elements (m, k .. k+3), k a multiple of 4: one half of an 8-group (one Philox call).
LK_HD void dropout_keep4(uint64_t seed, uint64_t offset, int64_t m, int64_t K, int64_t k, float p, bool keep[4]) {
  uint32_t w[4];
  dropout_words(seed, dropout_counter(offset, m, K, k / kDropoutGroup), w);
  const uint32_t thr = dropout_threshold(p);
  const int e0 = (int)(k % kDropoutGroup);  // 0 or 4
#pragma unroll
  for (int q = 0; q < 4; ++q) keep[q] = dropout_kept(w, e0 + q, thr);
}

}  // namespace lora_kernels
