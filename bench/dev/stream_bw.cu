// Read bandwidth of a streamed (M x K) bf16 matrix (64 MiB) in tiles of TR rows x TC bytes (cp.async ring of S slots,
// 256 threads) on grids like the shrink's (row tiles x K splits), and by a plain grid-stride ld.global.cs loop: the
// streaming ceiling the shrink, dA and dy passes are compared with, and whether the tile's row length matters.
// No torch:  nvcc -arch=sm_90a -O3 -std=c++17 bench/dev/stream_bw.cu -o /tmp/stream_bw && /tmp/stream_bw
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("err %s line %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)

__device__ __forceinline__ void cp16(void* s, const void* g) {
  unsigned a = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(a), "l"(g));
}
template <int TR, int TC, int S>
__global__ void __launch_bounds__(256) stream_tiles(const uint8_t* x, int64_t M, int64_t Kb, int64_t kb_per_split,
                                                   float* out) {
  extern __shared__ __align__(16) uint8_t sm[];
  constexpr int TILE = TR * TC, CH = TILE / 16 / 256;  // 16-byte chunks per thread
  const int64_t m0 = (int64_t)blockIdx.x * TR, kb0 = (int64_t)blockIdx.y * kb_per_split;
  int64_t kb1 = kb0 + kb_per_split; if (kb1 > Kb) kb1 = Kb;
  const int nt = (int)((kb1 - kb0 + TC - 1) / TC);
  auto issue = [&](int t) {
    if (t < nt) {
      uint8_t* slot = sm + (t % S) * TILE;
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        int c = threadIdx.x + i * 256, row = c / (TC / 16), col = c % (TC / 16) * 16;
        cp16(slot + row * TC + col, x + (m0 + row) * Kb + kb0 + (int64_t)t * TC + col);
      }
    }
    asm volatile("cp.async.commit_group;\n");
  };
  for (int t = 0; t < S - 1; ++t) issue(t);
  float acc = 0.f;
  for (int t = 0; t < nt; ++t) {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(S - 2));
    __syncthreads();
    issue(t + S - 1);
    const uint4* slot = reinterpret_cast<const uint4*>(sm + (t % S) * TILE);
#pragma unroll
    for (int i = 0; i < CH; ++i) { uint4 v = slot[threadIdx.x + i * 256]; acc += __uint_as_float(v.x ^ v.w); }
  }
  if (acc == 1.2345f) out[blockIdx.x] = acc;
}
__global__ void __launch_bounds__(256) plain_ld(const uint4* x, int64_t n, float* out) {
  float acc = 0.f;
  for (int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x; i < n; i += (int64_t)gridDim.x * 256) {
    uint4 v = __ldcs(x + i); acc += __uint_as_float(v.x ^ v.w);
  }
  if (acc == 1.2345f) out[blockIdx.x] = acc;
}
template <int TR, int TC, int S>
int run(const uint8_t* x, int64_t M, int64_t Kb, int splits, float* out, cudaEvent_t a, cudaEvent_t b) {
  const size_t smem = (size_t)S * TR * TC;
  CK(cudaFuncSetAttribute(stream_tiles<TR, TC, S>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stream_tiles<TR, TC, S>, 256, smem));
  int64_t kps = (Kb + splits - 1) / splits; kps = (kps + TC - 1) / TC * TC;
  dim3 grid((unsigned)(M / TR), (unsigned)((Kb + kps - 1) / kps));
  float best = 1e9f;
  for (int it = 0; it < 30; ++it) {
    CK(cudaEventRecord(a));
    stream_tiles<TR, TC, S><<<grid, 256, smem>>>(x, M, Kb, kps, out);
    CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (it > 2 && ms < best) best = ms;
  }
  printf("tile %3d rows x %4d B, %d slots, grid %4u x %2u (%d/SM): %7.2f us  %5.2f TB/s\n", TR, TC, S, grid.x, grid.y,
         per_sm, best * 1e3, M * Kb / (best * 1e-3) / 1e12);
  return 0;
}
int main() {
  const int64_t M = 8192, K = 4096, Kb = K * 2;
  uint8_t* x; float* out; CK(cudaMalloc(&x, M * Kb)); CK(cudaMalloc(&out, 1 << 20)); CK(cudaMemset(x, 1, M * Kb));
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (int g : {sms * 4, sms * 8}) {
    float best = 1e9f;
    for (int it = 0; it < 30; ++it) {
      CK(cudaEventRecord(a)); plain_ld<<<g, 256>>>((const uint4*)x, M * Kb / 16, out); CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b)); float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (it > 2 && ms < best) best = ms;
    }
    printf("plain ld.cs grid %d: %7.2f us  %5.2f TB/s\n", g, best * 1e3, M * Kb / (best * 1e-3) / 1e12);
  }
  for (int splits : {6, 3, 12}) {
    printf("-- K splits %d\n", splits);
    run<128, 128, 3>(x, M, Kb, splits, out, a, b);
    run<128, 128, 4>(x, M, Kb, splits, out, a, b);
    run<64, 256, 3>(x, M, Kb, splits, out, a, b);
    run<64, 256, 4>(x, M, Kb, splits, out, a, b);
    run<32, 512, 3>(x, M, Kb, splits, out, a, b);
    run<32, 512, 4>(x, M, Kb, splits, out, a, b);
    run<16, 1024, 3>(x, M, Kb, splits, out, a, b);
  }
  return 0;
}
