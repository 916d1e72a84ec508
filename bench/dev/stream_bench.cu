// The Hopper streaming passes (csrc/stream_sm90.cuh) timed without torch: the dy pass (g = dy B and the dB partials,
// one read of dy), the dA pass (the dA partials of s gᵀ x, one read of x) and the forward's shrink (u's K-split
// partials of s x Aᵀ, one read of x, p = 0), each with its prep launch where it has one, at the Llama-3-8B shapes
// with fp32 adapters on bf16 (3 pieces) and bf16 adapters (1 piece), against a plain streaming read of the same
// matrix (the bandwidth these passes are held to: the issue asks >= 80% of HBM's). Where a plan that also counts the
// side operands' bytes (stream_sm90_plan's side_bytes) differs from the production one, that plan is timed too.
// Built and run by stream_bench.sh; the plan lines give each pass's split plan, ring depth and shared memory. GPU time
// as the suite measures it: each launch queued behind a GPU sleep, the streamed matrix rotated through 3 copies
// (larger than L2 together), median of 30. Every pass's outputs are checked against a reference kernel in the same
// binary.
#include "lora_kernels.cuh"
#include "stream_sm90.cuh"

#include "gpu_timing.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

namespace lk = lora_kernels;
using bf16 = __nv_bfloat16;

__device__ __forceinline__ float hash_unit(uint64_t i, uint32_t seed) {  // in [-1, 1)
  uint64_t h = (i + 0x9E3779B97F4A7C15ull * (seed + 1)) * 0xBF58476D1CE4E5B9ull;
  h ^= h >> 31;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 29;
  return (float)(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
}
__global__ void fill_bf16(bf16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(hash_unit(i, seed));
}
__global__ void fill_f32(float* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = scale * hash_unit(i, seed);
}
// out[i][j] (I x r) = sum_t a[t][i] * s[t][j] with a (T x I) bf16 read down its columns, s (T x r) fp32: dB = dyᵀ u
// (a = dy, s = u) and dA = gᵀ x transposed (a = x, s = g); out[m][j] = sum_n a[m][n] * s[n][j]: g = dy B.
__global__ void ref_colsum(const bf16* a, const float* s, float* out, int64_t T, int64_t I, int r) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int j = blockIdx.y;
  if (i >= I) return;
  float acc = 0.f;
  for (int64_t t = 0; t < T; ++t) acc += __bfloat162float(a[t * I + i]) * s[t * r + j];
  out[i * r + j] = acc;
}
__global__ void ref_rowdot(const bf16* a, const float* s, float* out, int64_t M, int64_t N, int r) {
  const int64_t m = blockIdx.x;
  const int j = threadIdx.x;  // r threads
  float acc = 0.f;
  for (int64_t n = 0; n < N; ++n) acc += __bfloat162float(a[m * N + n]) * s[n * r + j];
  out[m * r + j] = acc;
}
// Adapters as bf16 (1 piece): the fp32 values rounded in place (so that the references see what the pass sees) and
// their bf16 copy.
__global__ void round_bf16(float* p, bf16* q, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    q[i] = __float2bfloat16(p[i]);
    p[i] = __bfloat162float(q[i]);
  }
}
// xm = keep ⊙ x from the keep bits (bit k % 8 of byte k / 8 of row m): the references' dropped input
__global__ void mask_copy(const bf16* x, const uint8_t* keep8, bf16* xm, int64_t M, int64_t K) {
  const int64_t kb = (K + 7) / 8;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * K; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    xm[i] = (keep8[m * kb + k / 8] >> (k % 8)) & 1 ? x[i] : __float2bfloat16(0.f);
  }
}
// a (R x C) -> t (C x R)
template <typename T>
__global__ void transpose(const T* a, T* t, int64_t R, int64_t C) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < R * C; i += (int64_t)gridDim.x * blockDim.x)
    t[(i % C) * R + i / C] = a[i];
}
bool same_plan(const lk::SplitPlan& a, const lk::SplitPlan& b) {
  return a.row_splits == b.row_splits && a.col_groups == b.col_groups;
}

// max |sum of the parts - ref| / max |ref| over n values, parts `parts` apart
double rel_err(const float* parts, int64_t nparts, const float* ref, int64_t n, float scale = 1.f) {
  std::vector<float> p((size_t)(nparts * n)), q((size_t)n);
  CK(cudaMemcpy(p.data(), parts, p.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(q.data(), ref, q.size() * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t c = 0; c < nparts; ++c) s += p[(size_t)(c * n + i)];
    num = std::max(num, std::fabs(s - (double)scale * q[(size_t)i]));
    den = std::max(den, std::fabs((double)scale * q[(size_t)i]));
  }
  return den > 0 ? num / den : num;
}

// One route of a pass with dropout: `parts` (nparts partials of n floats) allocated and poisoned (NaN where a route
// leaves an element unwritten), run once and checked against ref (times `scale`), then timed; parts and scratch freed.
void check_and_time(float*& parts, int64_t nparts, int64_t n, const float* ref, float scale, void* scratch,
                    const std::function<void(int)>& run, cudaStream_t st, float& t, double& err) {
  CK(cudaMalloc(&parts, nparts * n * 4));
  CK(cudaMemset(parts, 0xff, nparts * n * 4));
  run(0);
  CK(cudaStreamSynchronize(st));
  err = rel_err(parts, nparts, ref, n, scale);
  t = time_it(run, st);
  if (scratch) CK(cudaFree(scratch));
  CK(cudaFree(parts));
}

// dA's reference in the passes' layout: ref[j][k] = sum_m g[m][j] x[m][k] (ref_colsum's [k][j], transposed on the
// host), ref holding C * r floats
void ref_dA(const bf16* x, const float* g, float* ref, int64_t M, int64_t C, int r, cudaStream_t st) {
  ref_colsum<<<dim3((unsigned)((C + 127) / 128), r), 128, 0, st>>>(x, g, ref, M, C, r);
  CK(cudaStreamSynchronize(st));
  std::vector<float> rt((size_t)(C * r)), tr((size_t)(C * r));
  CK(cudaMemcpy(rt.data(), ref, rt.size() * 4, cudaMemcpyDeviceToHost));
  for (int64_t k = 0; k < C; ++k)
    for (int j = 0; j < r; ++j) tr[(size_t)(j * C + k)] = rt[(size_t)(k * r + j)];
  CK(cudaMemcpy(ref, tr.data(), tr.size() * 4, cudaMemcpyHostToDevice));
}

int main() {
  setenv("LORA_KERNELS_SM90_SHRINK", "2", 1);  // the wgmma shrink with dropout at r <= 16 too, timed beside mma.sync
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int64_t M = 8192;
  // N of the dy pass / K of the dA pass and the shrink; SB_WIDTHS (e.g. "4096,14336") times a subset
  std::vector<int> widths = {4096, 1024, 14336};
  if (const char* w = getenv("SB_WIDTHS")) {
    widths.clear();
    for (const char* c = w; *c;) {
      widths.push_back(atoi(c));
      while (*c && *c != ',') ++c;
      if (*c == ',') ++c;
    }
  }
  const int ranks[] = {16, 64};
  float* sink;
  CK(cudaMalloc(&sink, 4));
  for (int width : widths) {
    const int64_t C = width, n = M * C;
    bf16* a[3];
    for (int s = 0; s < 3; ++s) {
      CK(cudaMalloc(&a[s], n * 2));
      fill_bf16<<<1024, 256, 0, st>>>(a[s], n, 11 + s);
    }
    const float plain = time_it([&](int i) { plain_read<<<prop.multiProcessorCount * 8, 512, 0, st>>>(
                                                   reinterpret_cast<const uint4*>(a[i % 3]), n / 8, sink); }, st);
    printf("\n=== M=%lld x %d (%.1f MB): plain read %.1f us, %.2f TB/s\n", (long long)M, width, n * 2 / 1e6, plain,
           n * 2 / plain / 1e6);
    for (int P : {3, 1}) {
      const lk::DType adt = P == 3 ? lk::DType::kFloat32 : lk::DType::kBFloat16;
      for (int r : ranks) {
        // side: B (C x r), also Aᵀ for the shrink; rs: u (M x r) or g; side16 / a16: their bf16 copies (P = 1)
        float *side, *rs, *ref, *parts, *gpart, *a_rk;
        bf16 *side16, *a16;
        CK(cudaMalloc(&side, C * r * 4));
        CK(cudaMalloc(&a_rk, C * r * 4));
        CK(cudaMalloc(&side16, C * r * 2));
        CK(cudaMalloc(&a16, C * r * 2));
        CK(cudaMalloc(&rs, M * r * 4));
        CK(cudaMalloc(&ref, std::max<int64_t>(C, M) * r * 4));
        fill_f32<<<256, 256, 0, st>>>(side, C * r, 5, 0.05f);
        fill_f32<<<256, 256, 0, st>>>(rs, M * r, 7, 1.0f);
        if (P == 1) round_bf16<<<256, 256, 0, st>>>(side, side16, C * r);
        transpose<float><<<256, 256, 0, st>>>(side, a_rk, C, r);  // lora_A (r x K) = sideᵀ
        if (P == 1) transpose<bf16><<<256, 256, 0, st>>>(side16, a16, C, r);
        const void* b_in = P == 3 ? (const void*)side : (const void*)side16;
        const void* a_in = P == 3 ? (const void*)a_rk : (const void*)a16;
        // dy pass: a = dy (M x C), B = side (C x r), u = rs
        const lk::SplitPlan dy_plans[2] = {lk::lora_dy_pass_sm90_plan(M, C, r, P),
                                           lk::detail::stream_sm90_plan(M, C, r, P, lk::detail::kDy, true)};
        for (int v = 0; v < 2 && !(v == 1 && same_plan(dy_plans[0], dy_plans[1])); ++v) {
          const lk::SplitPlan plan = dy_plans[v];
          const char* tag = v ? " (side-operand plan)" : "";
          const char* why = lk::lora_dy_pass_sm90_unsupported(a[0], lk::DType::kBFloat16, adt, M, C, r);
          const auto sh = lk::detail::ds_shape(r, P, lk::detail::kDy);
          const int64_t groups = std::max<int64_t>(plan.col_groups, 1), tpg = ((C + 63) / 64 + groups - 1) / groups;
          printf("dy pass P=%d r=%d%s: plan S=%lld C=%lld z=%d stages=%d smem=%zu %s\n", P, r, tag,
                 (long long)plan.row_splits, (long long)plan.col_groups, sh.z,
                 lk::detail::ds_stages(lk::detail::kDy, sh.nw), lk::detail::ds_smem(sh, lk::detail::kDy, tpg),
                 why ? why : "");
          if (!why) {
            void* scratch;
            CK(cudaMalloc(&scratch, lk::lora_dy_pass_sm90_scratch_bytes(M, C, r, P)));
            CK(cudaMalloc(&gpart, plan.col_groups * M * r * 4));
            CK(cudaMalloc(&parts, plan.row_splits * C * r * 4));
            CK(cudaMemset(gpart, 0xff, plan.col_groups * M * r * 4));  // poison: NaN where a part is unwritten
            CK(cudaMemset(parts, 0xff, plan.row_splits * C * r * 4));
            auto run = [&](int i) {
              CK(lk::launch_lora_dy_pass_sm90(a[i % 3], lk::DType::kBFloat16, b_in, adt, rs, gpart, parts, M, C, r,
                                              plan, scratch, st));
            };
            run(0);
            ref_rowdot<<<(unsigned)M, r, 0, st>>>(a[0], side, ref, M, C, r);
            CK(cudaStreamSynchronize(st));
            const double eg = rel_err(gpart, plan.col_groups, ref, M * r);
            ref_colsum<<<dim3((unsigned)((C + 127) / 128), r), 128, 0, st>>>(a[0], rs, ref, M, C, r);
            CK(cudaStreamSynchronize(st));
            const double eb = rel_err(parts, plan.row_splits, ref, C * r);
            const float t = time_it(run, st);
            printf("  dy pass P=%d r=%d%s: %.1f us (%.2f TB/s of dy, %.2fx the plain read)  err g %.2e dB %.2e\n", P,
                   r, tag, t, n * 2 / t / 1e6, t / plain, eg, eb);
            CK(cudaFree(scratch));
            CK(cudaFree(gpart));
            CK(cudaFree(parts));
          }
        }
        // dA pass: a = x (M x C = K), g = rs (M x r)
        const lk::SplitPlan dA_plans[2] = {lk::lora_dA_sm90_plan(M, C, r, P),
                                           lk::detail::stream_sm90_plan(M, C, r, P, lk::detail::kDA, true)};
        for (int v = 0; v < 2 && !(v == 1 && same_plan(dA_plans[0], dA_plans[1])); ++v) {
          const lk::SplitPlan plan = dA_plans[v];
          const char* tag = v ? " (side-operand plan)" : "";
          const char* why = lk::lora_dA_sm90_unsupported(a[0], lk::DType::kBFloat16, adt, M, C, r, 0.f);
          const auto sh = lk::detail::ds_shape(r, P, lk::detail::kDA);
          printf("dA pass P=%d r=%d%s: plan S=%lld C=%lld z=%d stages=%d %s\n", P, r, tag, (long long)plan.row_splits,
                 (long long)plan.col_groups, sh.z, lk::detail::ds_stages(lk::detail::kDA, sh.nw), why ? why : "");
          if (!why) {
            void* scratch = nullptr;
            const size_t scratch_bytes = lk::lora_dA_sm90_scratch_bytes(M, r, P);
            if (scratch_bytes) CK(cudaMalloc(&scratch, scratch_bytes));
            CK(cudaMalloc(&parts, plan.row_splits * C * r * 4));
            CK(cudaMemset(parts, 0xff, plan.row_splits * C * r * 4));
            auto run = [&](int i) {
              CK(lk::launch_lora_dA_sm90(a[i % 3], lk::DType::kBFloat16, adt, rs, parts, M, C, r, plan, 0.5f,
                                         0.f, nullptr, scratch, st));
            };
            run(0);
            ref_dA(a[0], rs, ref, M, C, r, st);  // dA[j][k] = 0.5 sum_m g[m][j] x[m][k]
            const double ea = rel_err(parts, plan.row_splits, ref, C * r, 0.5f);
            const float t = time_it(run, st);
            printf("  dA pass P=%d r=%d%s: %.1f us (%.2f TB/s of x, %.2fx the plain read)  err dA %.2e\n", P, r, tag,
                   t, n * 2 / t / 1e6, t / plain, ea);
            if (scratch) CK(cudaFree(scratch));
            CK(cudaFree(parts));
          }
        }
        // shrink: a = x (M x C = K), lora_A = a_in (r x K); u's K-split parts [c][m][j] of 0.5 x Aᵀ
        const lk::SplitPlan sh_plans[2] = {lk::lora_shrink_sm90_plan(M, C, r, P),
                                           lk::detail::stream_sm90_plan(M, C, r, P, lk::detail::kShrink, true)};
        for (int v = 0; v < 2 && !(v == 1 && same_plan(sh_plans[0], sh_plans[1])); ++v) {
          const lk::SplitPlan plan = sh_plans[v];
          const char* tag = v ? " (side-operand plan)" : "";
          const char* why = lk::lora_shrink_sm90_unsupported(a[0], lk::DType::kBFloat16, adt, M, C, r, 0.f);
          printf("shrink P=%d r=%d%s: plan S=%lld C=%lld %s\n", P, r, tag, (long long)plan.row_splits,
                 (long long)plan.col_groups, why ? why : "");
          if (!why) {
            void* scratch;
            CK(cudaMalloc(&scratch, lk::lora_shrink_sm90_scratch_bytes(C, r, P)));
            CK(cudaMalloc(&parts, plan.col_groups * M * r * 4));
            CK(cudaMemset(parts, 0xff, plan.col_groups * M * r * 4));
            auto run = [&](int i) {
              CK(lk::launch_lora_shrink_sm90(a[i % 3], lk::DType::kBFloat16, a_in, adt, parts, M, C, r, plan, 0.5f,
                                             0.f, nullptr, scratch, st));
            };
            run(0);
            ref_rowdot<<<(unsigned)M, r, 0, st>>>(a[0], side, ref, M, C, r);
            CK(cudaStreamSynchronize(st));
            const double eu = rel_err(parts, plan.col_groups, ref, M * r, 0.5f);
            const float t = time_it(run, st);
            printf("  shrink P=%d r=%d%s: %.1f us (%.2f TB/s of x, %.2fx the plain read)  err u %.2e\n", P, r, tag, t,
                   n * 2 / t / 1e6, t / plain, eu);
            CK(cudaFree(scratch));
            CK(cudaFree(parts));
          }
        }
        // With dropout (p = 0.1): the keep bits (the pass the backward runs once for dx and dA, and the forward for
        // the shrink), then each route of dA and of the shrink on them, against references on keep ⊙ x
        {
          const float p = 0.1f, sdrop = lk::dropout_scale(0.5f, p);
          const lk::DType xdt = lk::DType::kBFloat16;
          uint8_t* keep8;
          bf16* xm;
          CK(cudaMalloc(&keep8, lk::dropout_keep_bits_bytes(M, C)));
          CK(cudaMalloc(&xm, n * 2));
          auto bits_run = [&](int) { CK(lk::launch_dropout_keep_bits(keep8, M, C, p, 1234, nullptr, 0, st)); };
          bits_run(0);
          mask_copy<<<1024, 256, 0, st>>>(a[0], keep8, xm, M, C);
          const float t_bits = time_it(bits_run, st);
          ref_dA(xm, rs, ref, M, C, r, st);  // dA = 0.5 / (1 - p) · gᵀ xm
          // (a) the wgmma kernel masking x itself; (b) the mma.sync kernel
          float t_da[2] = {0, 0};
          double e_da[2] = {0, 0};
          for (int v = 0; v < 2; ++v) {
            const bool masked = v == 0, ms = v == 1;
            const lk::SplitPlan plan = ms ? lk::lora_dA_plan(M, C, r, lk::lora_dA_resident_blocks(xdt, adt, r))
                                          : lk::lora_dA_sm90_plan(M, C, r, P, masked);
            if (!ms && lk::lora_dA_sm90_unsupported(a[0], xdt, adt, M, C, r, masked ? p : 0.f)) continue;
            void* scratch = nullptr;
            const size_t scratch_bytes = ms ? 0 : lk::lora_dA_sm90_scratch_bytes(M, r, P);
            if (scratch_bytes) CK(cudaMalloc(&scratch, scratch_bytes));
            auto run = [&](int i) {
              if (masked)
                CK(lk::launch_lora_dA_sm90(a[i % 3], xdt, adt, rs, parts, M, C, r, plan, 0.5f, p, keep8, scratch, st));
              else
                CK(lk::launch_lora_dA(a[i % 3], xdt, adt, rs, parts, M, C, r, plan, 0.5f, p, 1234, nullptr, 0, keep8,
                                      st));
            };
            check_and_time(parts, plan.row_splits, C * r, ref, sdrop, scratch, run, st, t_da[v], e_da[v]);
          }
          printf("  dA p=0.1 P=%d r=%d: wgmma masked %.1f us, mma.sync %.1f us (keep bits %.1f us)  err %.2e / %.2e\n",
                 P, r, t_da[0], t_da[1], t_bits, e_da[0], e_da[1]);
          // the shrink: (a) the wgmma kernel (register-masked fragments), (b) the mma.sync kernel
          ref_rowdot<<<(unsigned)M, r, 0, st>>>(xm, side, ref, M, C, r);
          float t_sh[2] = {0, 0};
          double e_sh[2] = {0, 0};
          for (int v = 0; v < 2; ++v) {
            const bool wg = v == 0;
            if (wg && lk::lora_shrink_sm90_unsupported(a[0], xdt, adt, M, C, r, p)) continue;
            const lk::SplitPlan plan = wg ? lk::lora_shrink_sm90_plan(M, C, r, P)
                                          : lk::lora_shrink_plan(M, C, r, lk::lora_shrink_resident_blocks(xdt, adt, r));
            void* scratch = nullptr;
            if (wg) CK(cudaMalloc(&scratch, lk::lora_shrink_sm90_scratch_bytes(C, r, P)));
            auto run = [&](int i) {
              if (wg)
                CK(lk::launch_lora_shrink_sm90(a[i % 3], xdt, a_in, adt, parts, M, C, r, plan, 0.5f, p, keep8,
                                               scratch, st));
              else
                CK(lk::launch_lora_shrink(a[i % 3], xdt, a_in, adt, parts, M, C, r, plan, 0.5f, p, 1234, nullptr, 0,
                                          keep8, st));
            };
            check_and_time(parts, plan.col_groups, M * r, ref, sdrop, scratch, run, st, t_sh[v], e_sh[v]);
          }
          printf("  shrink p=0.1 P=%d r=%d: wgmma %.1f us, mma.sync %.1f us  err %.2e / %.2e\n", P, r, t_sh[0],
                 t_sh[1], e_sh[0], e_sh[1]);
          for (void* q : {(void*)keep8, (void*)xm}) CK(cudaFree(q));
        }
        for (void* q : {(void*)side, (void*)a_rk, (void*)side16, (void*)a16, (void*)rs, (void*)ref}) CK(cudaFree(q));
      }
    }
    for (int s = 0; s < 3; ++s) CK(cudaFree(a[s]));
  }
  printf("\nstream bench done\n");
  return 0;
}
