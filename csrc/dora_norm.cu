// DoRA's row norm at p = 0 (the C++ entry of dora_autograd.h; the math of lora_kernels/dora.py):
//
//   ‖W_n + s(BA)_n‖² = ‖W_n‖² + 2s·B_n·(W Aᵀ)_n + s²·B_n (A Aᵀ) B_nᵀ,   g = magnitude / norm,   Bg = g ⊙ B
//
// big_adapter_n = ‖s(BA)_n‖ > ‖W_n‖ / 2 (the columns whose z the saved-y backward recomputes: common.cuh's
// dora_recompute_z), from the expansion's last term s²·B_n (A Aᵀ) B_nᵀ = ‖s(BA)_n‖².
// All from ‖W_n‖² (cached per frozen W), W Aᵀ (N×r fp32, the LoRA shrink pass over W, whose K-split partials are
// summed here, in the order of reduce.cu's sum: no launch of its own) and A Aᵀ (r×r fp32): no N×K temporary. A row
// whose sum is under half the sum of its terms' sizes has cancelled (the adapter undoes much of W_n, or the rank-r
// sum B_n A itself cancels, at small K), and the expansion's fp32 rounding, relative to those sizes, is then large
// against the result: that row is summed again directly, Σ_k (W_nk + s·B_n·A_k)². The sizes are every product's:
// ‖W_n‖², 2|s|·Σ_j |B_nj (W Aᵀ)_nj|, s²·Σ_jk |B_nj (A Aᵀ)_jk B_nk| (the Triton combine,
// lora_kernels/backends/triton/kernels/dora_norm.py, does the same).
// Tiling: one warp per row n, B_n (r ≤ 256) in shared memory, the lanes over B's columns (over K for a row summed
// directly: W's row and A's columns read from global memory, only for such rows); math in fp32.
#include "common.cuh"
#include "plans.cuh"

#include <algorithm>

namespace lora_kernels {
using namespace detail;
namespace {

constexpr int kWarps = kThreads / 32;

// One warp per row n of B: the row's squared norm from ‖W_n‖² (wsq), W Aᵀ (wa: splits partials of N × r fp32) and
// A Aᵀ (aat, r × r fp32); then g_n = magnitude_n / norm_n, Bg_n = g_n B_n and big_adapter_n (when not null).
__global__ void __launch_bounds__(kThreads)
dora_combine_kernel(const float* __restrict__ wa, int64_t splits, const float* __restrict__ wsq,
                    const void* __restrict__ B, DType b_dt, const float* __restrict__ aat,
                    const void* __restrict__ W, DType w_dt, const void* __restrict__ A, DType a_dt, int64_t K, const void* __restrict__ mag, DType m_dt, float s, int64_t N, int r,
                    float* __restrict__ norm, float* __restrict__ g, void* __restrict__ Bg,
                    uint8_t* __restrict__ big_adapter) {
  __shared__ float rows[kWarps][kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = (int64_t)blockIdx.x * kWarps + warp;
  if (n >= N) return;
  float* b = rows[warp];
  float lin = 0.f, lin_size = 0.f;
  for (int j = lane; j < r; j += 32) {
    b[j] = load_any(B, b_dt, n * r + j);
    float w = 0.f;  // (W Aᵀ)_nj: its partials in split order
    for (int64_t sp = 0; sp < splits; ++sp) w += wa[(sp * N + n) * r + j];
    lin = fmaf(b[j], w, lin);
    lin_size += fabsf(b[j] * w);
  }
  __syncwarp();
  // quad = Σ_j b_j Σ_k (A Aᵀ)_jk b_k, lane j reading column j of the symmetric A Aᵀ: at each k the lanes read
  // consecutive floats of row k (coalesced), where reading row j of their own would touch 32 rows per load (at
  // r = 64 that read dominated the forward's norm: +70 to +220 us per call on the H200, twentieth session);
  // quad_size the same form of |b| and |A Aᵀ|
  float quad = 0.f, quad_size = 0.f;
  for (int j = lane; j < r; j += 32) {
    float t = 0.f, t_size = 0.f;
    for (int k = 0; k < r; ++k) {
      const float a = aat[(int64_t)k * r + j];
      t = fmaf(a, b[k], t);
      t_size = fmaf(fabsf(a), fabsf(b[k]), t_size);
    }
    quad = fmaf(b[j], t, quad);
    quad_size = fmaf(fabsf(b[j]), t_size, quad_size);
  }
  lin = 2.f * s * warp_sum(lin);
  lin_size = 2.f * fabsf(s) * warp_sum(lin_size);
  quad = (s * s) * warp_sum(quad);
  quad_size = (s * s) * warp_sum(quad_size);
  const bool big = quad > (kDoraZFromYMaxAdapter * kDoraZFromYMaxAdapter) * wsq[n];  // quad = ‖s(BA)_n‖²
  float sq = wsq[n] + lin + quad;
  if (sq < 0.5f * (wsq[n] + lin_size + quad_size)) {  // the same on every lane (warp_sum's all-reduce): no divergence
    float direct = 0.f;
    for (int64_t k = lane; k < K; k += 32) {
      float ba = 0.f;
      for (int j = 0; j < r; ++j) ba = fmaf(b[j], load_any(A, a_dt, (int64_t)j * K + k), ba);
      const float v = fmaf(s, ba, load_any(W, w_dt, n * K + k));
      direct = fmaf(v, v, direct);
    }
    sq = warp_sum(direct);
  }
  const float nn = sqrtf(fmaxf(sq, 0.f));
  const float gn = load_any(mag, m_dt, n) / nn;
  if (lane == 0) {
    norm[n] = nn;
    g[n] = gn;
    if (big_adapter != nullptr) big_adapter[n] = big;
  }
  for (int j = lane; j < r; j += 32) store_any(Bg, b_dt, n * r + j, b[j] * gn);
}

}  // namespace

cudaError_t launch_dora_combine(const float* wa, int64_t wa_splits, const float* wsq, const void* B, DType b_dtype,
                                const float* aat, const void* W, DType w_dtype, const void* A, DType a_dtype, int64_t K,
                                const void* magnitude, DType m_dtype, float scaling, int64_t N, int r, float* norm,
                                float* g, void* Bg, uint8_t* big_adapter, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (r < 1 || r > kMaxRank || wa_splits < 1) return cudaErrorInvalidValue;
  return launch_kernel(dora_combine_kernel, dim3((unsigned)ceil_div(N, kWarps)), kThreads, 0, stream, wa, wa_splits,
                       wsq, B, b_dtype, aat, W, w_dtype, A, a_dtype, K, magnitude, m_dtype, scaling, N, r, norm, g, Bg,
                       big_adapter);
}

}  // namespace lora_kernels
