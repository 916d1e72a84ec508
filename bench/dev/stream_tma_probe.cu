// The streaming passes' loader alone (csrc/stream_sm90.cuh), cp.async against TMA: can a ring of 128 x 64 bf16 tiles
// (16 KB, 128-byte swizzle), walked by persistent blocks in the passes' order (row tiles outer, the block's column
// tiles inner), read an (M, N) matrix at the plain read's rate? stream_bench.cu showed the dy pass and dA with their
// products left out at 1.5x a plain read at 8192 x 4096 (28-30 against 19 us).
//   cp  : warpgroup 0 copies each tile with 16-byte cp.async (8 per thread) and a cp.async mbarrier arrival, as the
//         passes do today;
//   tma : one thread issues one cp.async.bulk.tensor.2d per tile (mbarrier expect_tx / complete_tx).
// Consumers (one or two warpgroups) wait for the tile, read one 16-byte chunk per thread and release the stage. Ring
// depth S and blocks per SM B vary; the grid is the passes' plan shape (row splits x column groups, B per SM).
//   nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc bench/dev/stream_tma_probe.cu -o /tmp/stp && /tmp/stp
// (the driver's cuTensorMapEncodeTiled is taken through cudaGetDriverEntryPointByVersion: no -lcuda)
#include "gpu_timing.cuh"

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>

namespace {
// mbarriers and the 128-byte swizzle as csrc/wgmma.cuh has them (there only in the sm_90a device pass)
__device__ __forceinline__ void bar_init(uint32_t b, int n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(b), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(b) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t b, int parity) {
  asm volatile("{\n.reg .pred p;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}\n" ::"r"(b),
               "r"(parity) : "memory");
}
__device__ __forceinline__ uint32_t swz(int i, int c) { return i * 128 + ((c ^ (i & 7)) << 4); }

constexpr int BM = 128, BN = 64, TILE = BM * BN * 2;

__device__ __forceinline__ uint32_t saddr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

template <bool kTma, int S, int CONSUMERS>
__global__ void __launch_bounds__(128 * (1 + CONSUMERS))
stream_probe(const __grid_constant__ CUtensorMap tmap, const __nv_bfloat16* __restrict__ a, int64_t M, int64_t N,
             int splits, int groups, float* sink) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t base = (saddr(smem) + 1023) & ~1023u;  // tiles 1024-byte aligned (128-byte swizzle)
  const uint32_t ring = base, bars = base + S * TILE;   // full[s] at bars + 8 s, empty[s] at bars + 8 (S + s)
  const int tid = threadIdx.x, wg = tid >> 7;
  const int64_t tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int bx = blockIdx.x % splits, by = blockIdx.x / splits;
  const int64_t rt0 = tiles_m * bx / splits, rt1 = tiles_m * (bx + 1) / splits;
  const int64_t ct0 = tiles_n * by / groups, ct1 = tiles_n * (by + 1) / groups;
  const int n_ct = (int)(ct1 - ct0), n_tiles = (int)(rt1 - rt0) * n_ct;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      bar_init(bars + 8 * s, kTma ? 1 : 128);
      bar_init(bars + 8 * (S + s), 4 * CONSUMERS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (wg == 0) {
    int rt = 0, ct = 0, stage = 0, round = 0;
    for (int t = 0; t < n_tiles; ++t) {
      const int64_t m0 = (rt0 + rt) * BM, n0 = (ct0 + ct) * BN;
      const uint32_t dst = ring + stage * TILE, full = bars + 8 * stage;
      if constexpr (kTma) {
        if (tid == 0) {
          bar_wait(bars + 8 * (S + stage), (round & 1) ^ 1);
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(full), "r"(TILE) : "memory");
          asm volatile(
              "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
              " [%0], [%1, {%2, %3}], [%4];\n"
              ::"r"(dst), "l"(reinterpret_cast<uint64_t>(&tmap)), "r"((int)n0), "r"((int)m0), "r"(full)
              : "memory");
        }
      } else {
        bar_wait(bars + 8 * (S + stage), (round & 1) ^ 1);
        const __nv_bfloat16* src = a + m0 * N + n0;
#pragma unroll
        for (int q = 0; q < BM * 8 / 128; ++q) {
          const int i = tid + 128 * q, row = i >> 3, c = i & 7;
          const bool ok = m0 + row < M && n0 + 8 * c < N;
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + swz(row, c)),
                       "l"(ok ? src + (int64_t)row * N + 8 * c : a), "r"(ok ? 16 : 0));
        }
        asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full) : "memory");
      }
      if (++ct == n_ct) ct = 0, ++rt;
      if (++stage == S) stage = 0, ++round;
    }
  } else {
    float acc = 0.f;
    int stage = 0, round = 0;
    for (int t = 0; t < n_tiles; ++t) {
      bar_wait(bars + 8 * stage, round & 1);
      uint4 v;
      const uint32_t src = ring + stage * TILE + 16 * ((tid - 128 * wg) + 128 * (wg - 1)) % TILE;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(src));
      acc += __uint_as_float(v.x ^ v.w);
      __syncwarp();
      if ((tid & 31) == 0) bar_arrive(bars + 8 * (S + stage));
      if (++stage == S) stage = 0, ++round;
    }
    if (acc == 1.2345f) sink[0] = acc;
  }
}


using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

CUtensorMap make_map(EncodeTiled encode, void* a, int64_t M, int64_t N) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {(cuuint64_t)N, (cuuint64_t)M}, strides[1] = {(cuuint64_t)N * 2};
  const cuuint32_t box[2] = {BN, BM}, estr[2] = {1, 1};
  const CUresult r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, a, dims, strides, box, estr,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    printf("cuTensorMapEncodeTiled failed: %d\n", (int)r);
    exit(1);
  }
  return m;
}

// one variant: the plan's grid (B blocks per SM as row splits x column groups, column groups of >= S - 1 tiles)
template <bool kTma, int S, int CONSUMERS>
void run(const char* name, EncodeTiled encode, __nv_bfloat16* const (&a)[3], int64_t M, int64_t N, int per_sm,
         float plain, float* sink, cudaStream_t st) {
  auto kernel = stream_probe<kTma, S, CONSUMERS>;
  const int smem = S * TILE + 16 * S + 1024;
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t tiles_n = (N + BN - 1) / BN;
  int groups = 1;
  while (groups * 2 <= tiles_n / (S - 1) && (sms * per_sm) % (groups * 2) == 0 && groups * 2 <= 12) groups *= 2;
  const int splits = sms * per_sm / groups;
  CUtensorMap maps[3];
  for (int i = 0; i < 3; ++i) maps[i] = make_map(encode, a[i], M, N);
  const float us = time_it([&](int i) {
    kernel<<<splits * groups, 128 * (1 + CONSUMERS), smem, st>>>(maps[i % 3], a[i % 3], M, N, splits, groups, sink);
    CK(cudaGetLastError());
  }, st);
  printf("  %-4s S=%d consumers=%d blocks/SM=%d grid %3d x %2d: %7.1f us  %.2f TB/s  %.2fx the plain read\n", name, S,
         CONSUMERS, per_sm, splits, groups, us, M * N * 2 / us / 1e6, us / plain);
}
}  // namespace

int main() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  if (fn == nullptr || q != cudaDriverEntryPointSuccess) {
    printf("no cuTensorMapEncodeTiled\n");
    return 1;
  }
  const EncodeTiled encode = reinterpret_cast<EncodeTiled>(fn);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  float* sink;
  CK(cudaMalloc(&sink, 4));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  for (int64_t N : {4096, 14336}) {
    const int64_t M = 8192;
    __nv_bfloat16* a[3];
    for (auto& p : a) {
      CK(cudaMalloc(&p, M * N * 2));
      CK(cudaMemset(p, 1, M * N * 2));
    }
    const float plain = time_it([&](int i) { plain_read<<<prop.multiProcessorCount * 8, 512, 0, st>>>(
                                                   reinterpret_cast<const uint4*>(a[i % 3]), M * N / 8, sink); }, st);
    printf("\n=== %lld x %lld bf16 (%.1f MB): plain read %.1f us, %.2f TB/s\n", (long long)M, (long long)N,
           M * N * 2 / 1e6, plain, M * N * 2 / plain / 1e6);
    run<false, 4, 2>("cp", encode, a, M, N, 1, plain, sink, st);
    run<false, 8, 2>("cp", encode, a, M, N, 1, plain, sink, st);
    run<false, 4, 1>("cp", encode, a, M, N, 2, plain, sink, st);
    run<true, 4, 2>("tma", encode, a, M, N, 1, plain, sink, st);
    run<true, 8, 2>("tma", encode, a, M, N, 1, plain, sink, st);
    run<true, 4, 1>("tma", encode, a, M, N, 2, plain, sink, st);
    run<true, 6, 1>("tma", encode, a, M, N, 2, plain, sink, st);
    for (auto& p : a) CK(cudaFree(p));
  }
  printf("\nstream probe done\n");
  return 0;
}
