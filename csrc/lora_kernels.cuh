// Fused CUDA kernels of the LoRA op around the two frozen GEMMs (which cuBLAS does, called by csrc/binding.cpp).
// Plain CUDA/C++: no torch headers, so the kernel files (csrc/*.cu, one per pass, and plans.cu) compile with plain
// nvcc, without torch (.ci/compile_cu.sh).
//
// All launchers take raw contiguous row-major pointers, return the cudaError_t of the launch (cudaGetLastError),
// and do nothing (cudaSuccess) for empty problems. r must be in 1..kMaxRank.
// The launchers with dropout take its Philox key as `seed` (by value) and `seed_ptr`: null, or a device pointer to an
// int64 holding the key, which the kernels then read when they run (CUDA graphs: a replay refills that memory, so
// each replay gets a fresh mask; a by-value seed would be baked into the captured launch). Same 64 bits, same mask.
//
// Forward  : launch_lora_small_m_forward for M <= 64 (one launch), else launch_dropout_keep_bits (p > 0),
//            launch_lora_shrink (u = scaling * dropout(x) A^T, fp32), launch_lora_expand (y = u B^T + bias),
//            cuBLAS y += x W^T (beta = 1).
// Backward : launch_lora_dy_pass (g = dy B, fp32, and per-split partials of dB = dy^T u, one pass over dy),
//            launch_reduce_partials (dB), launch_dropout_keep_bits (p > 0: once, for dA and dx), launch_lora_dA
//            (partials of dA = scaling * g^T dropout(x)), launch_reduce_partials (dA), launch_lora_dx
//            (dx = scaling*keep/(1-p) * g A), cuBLAS dx += dy W.
//            (csrc/binding.cpp runs dx before dA, and leaves out a reduce where it would only copy one fp32 split.)
//            At M <= 64 on Hopper, p = 0: launch_lora_small_m_sm90_dx (dx and s·g) and launch_lora_small_m_grads.
// Every reduction is done in a fixed order (no atomics): results are bitwise deterministic run to run.
//
// Precision: each product is computed in the precision PyTorch would use for the same inputs, so that the error stays
// within 2x of the same-precision PyTorch computation (the tolerance rule). With 16-bit x and 16-bit adapters on sm_80+
// the rank-r products of the shrink, dy pass and dA run on tensor cores (the fp32 buffers u, g cast to x's dtype,
// fp32 accumulation): PyTorch rounds those intermediates to 16 bits too. With fp32 adapters (PEFT's default) PyTorch
// computes the adapter products in fp32. On bf16 x they still run on tensor cores: the fp32 operand (A, B, u or g)
// is split into three bf16 pieces (adapter_pieces; common.cuh to_t4_piece) whose products with the exact bf16 x or dy
// sum to the fp32 product. On fp16 x (the pieces would underflow fp16's range), fp32 x or below sm_80 they run as
// fp32 FFMA. The expand and dx write 16-bit outputs and stay on tensor cores. Outputs as documented per launcher.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace lora_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxRank = 256;

struct LoraGemmArgs;  // gemm_sm90.h

// Streaming multiprocessors of the current device (csrc/plans.cu; 132 when there is none).
namespace detail {
int num_sms();
}  // namespace detail

// Backward passes over at most this many rows (decoding-size batches) stay off the sm_90 kernels: the dy pass and dA
// take their mma.sync kernels (no staging launch for the adapters' pieces) and dx takes cuBLAS (dy W) over the dx
// kernel's rank-r term, where the sm_90 GEMM has one 128-row tile per column and too few CTAs to stream W. Small-M
// fwd+bwd on the H200 at M = 1, 16, 64 (4096 -> 4096 / 14336, r = 16): GPU time 2.52-3.94x the floor with the sm_90
// kernels, 1.86-3.46x without (bench/results/h200_2026-12-02/session17).
// LORA_KERNELS_SMALL_M_BWD_ROWS=<n> (read once) moves the threshold, 0 puts every M on the sm_90 kernels: A/B timing.
constexpr int64_t kSmallMBackwardRows = 64;
inline int64_t small_m_backward_rows() {
  static const int64_t rows = [] {
    const char* v = getenv("LORA_KERNELS_SMALL_M_BWD_ROWS");
    return v != nullptr ? (int64_t)atoll(v) : kSmallMBackwardRows;
  }();
  return rows;
}

// An on/off switch from the environment: on unless the variable `name` is set to "0". Callers read it once (a static).
inline bool env_switch_on(const char* name) {
  const char* v = getenv(name);
  return v == nullptr || strcmp(v, "0") != 0;
}
// An opt-in switch from the environment: on only where the variable `name` is set to "1". Read once, as above.
inline bool env_switch_set(const char* name) {
  const char* v = getenv(name);
  return v != nullptr && strcmp(v, "1") == 0;
}
// A three-way mode from the environment: 0 where the variable `name` is "0", 1 where it is "1", else (unset, empty or
// anything else) -1, the default. Read once, as above.
inline int env_mode(const char* name) {
  const char* v = getenv(name);
  return v == nullptr ? -1 : strcmp(v, "0") == 0 ? 0 : strcmp(v, "1") == 0 ? 1 : -1;
}
// A count from the environment: `dflt` where the variable `name` is unset, else its integer value clamped to
// [lo, hi] (anything that is not a number reads as 0, so lo). Read once, as above.
inline int env_int_in(const char* name, int dflt, int lo, int hi) {
  const char* v = getenv(name);
  if (v == nullptr) return dflt;
  const int n = atoi(v);
  return n < lo ? lo : n > hi ? hi : n;
}

// The factor of the kept elements of dropout(x) times the LoRA scaling: scaling / (1 - p), rounded once to fp32
// (the shrink, dA and dx launches, and the binding's pack of dx's rank-r operand on the sm_90 path).
inline float dropout_scale(float scaling, float p) { return (float)((double)scaling / (1.0 - (double)p)); }

// Pieces of the fp32 operand in the tensor-core shrink, dy pass and dA (see Precision above): 3 for fp32 adapters on
// bf16 x, else 1. The dy pass plan takes it (its shared memory grows with it).
inline int adapter_pieces(DType x, DType adapter) {
  return adapter == DType::kFloat32 && x == DType::kBFloat16 ? 3 : 1;
}

// Work split of the deterministic backward reductions over M. Row split s owns rows
// [s * rows_per_split, min(M, (s+1) * rows_per_split)) (rows_per_split a multiple of 32); column group c owns
// columns [c * cols_per_group, ...) (a multiple of 32). Grid = (row_splits, col_groups), times the r-chunks of at
// most 64 columns for 16-bit inputs. The plan helpers size the splits for the tensor-core kernels' tiles (the fp32
// kernels run any plan) so that the grid fills the GPU with as few partial bytes as possible.
struct SplitPlan {
  int64_t row_splits;
  int64_t rows_per_split;
  int64_t col_groups;
  int64_t cols_per_group;
};
// dy pass over dy (M, N): dB partial buffer row_splits * N * r floats; when col_groups > 1 the g output of
// launch_lora_dy_pass is a partial buffer of col_groups * M * r floats to reduce with launch_reduce_partials.
SplitPlan lora_dy_pass_plan(int64_t M, int64_t N, int r, int pieces = 1);
// dA pass over x (M, K): dA partial buffer row_splits * r * K floats. blocks_per_sm: lora_dA_resident_blocks.
SplitPlan lora_dA_plan(int64_t M, int64_t K, int r, int blocks_per_sm);
int lora_dA_resident_blocks(DType x_dtype, DType a_dtype, int r);

// Shrink work split: row blocks, and K split into plan.col_groups groups of plan.cols_per_group columns (whole
// 64-column chunks) when the row blocks alone leave the GPU short. blocks_per_sm: lora_shrink_resident_blocks, the
// blocks of the kernel that launch_lora_shrink runs for these dtypes and rank that one SM holds.
SplitPlan lora_shrink_plan(int64_t M, int64_t K, int r, int blocks_per_sm);
int lora_shrink_resident_blocks(DType x_dtype, DType a_dtype, int r);

// u_out[c] (M, r) fp32 = scaling * dropout(x)[:, cols of c] @ A^T[cols of c] ; x (M, K) x_dtype, A (r, K) a_dtype.
// With plan.col_groups == 1, u_out is u itself; otherwise a partial buffer of col_groups * M * r floats to sum
// with launch_reduce_partials. plan from lora_shrink_plan.
cudaError_t launch_lora_shrink(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out, int64_t M,
                               int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed,
                               const int64_t* seed_ptr, uint64_t offset, const uint8_t* keep8, cudaStream_t stream);

// The shrink with dropout that makes its mask itself (shrink_drop.cu: no keep bits, one pass over x): the same u
// and partial layout as launch_lora_shrink, for lora_shrink_drop_plan's plan. lora_shrink_drop_unsupported: nullptr
// where it runs (p > 0, sm_80+, 16-bit x with lora_A in x's dtype or fp32 on bf16, r <= 64, K % 8 == 0, 16-byte
// aligned x and lora_A; by default only where it measured faster, on compute capability 9.0), else why not. set_shrink_drop(mode): -1 the
// default, 0 off, 1 wherever it runs (LORA_KERNELS_SHRINK_DROP=0 / 1 start there); returns the previous mode.
// scratch: lora_shrink_drop_scratch_bytes (fp32 lora_A's bf16x3 pieces, made by a prep launch), else unused.
const char* lora_shrink_drop_unsupported(const void* x, DType x_dtype, const void* A, DType a_dtype, int64_t M,
                                         int64_t K, int r, float p);
int set_shrink_drop(int mode);
// x's loads in that shrink: -1 the default (plans.cuh, sd_ring), 0 plain loads, 2 or 4 a cp.async ring of that many
// 32-column steps per warp (LORA_KERNELS_SHRINK_DROP_RING starts there); returns the previous setting.
int set_shrink_drop_ring(int stages);
size_t lora_shrink_drop_scratch_bytes(DType x_dtype, DType a_dtype, int r, int64_t K);
// Row blocks of the kernel's rows and K split into col_groups groups of whole steps, about two waves of blocks.
// blocks_per_sm: lora_shrink_drop_resident_blocks.
SplitPlan lora_shrink_drop_plan(int64_t M, int64_t K, int r, int blocks_per_sm);
int lora_shrink_drop_resident_blocks(DType x_dtype, DType a_dtype, int r);
cudaError_t launch_lora_shrink_drop(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out,
                                    int64_t M, int64_t K, int r, SplitPlan plan, float scaling, float p,
                                    uint64_t seed, const int64_t* seed_ptr, uint64_t offset, void* scratch,
                                    cudaStream_t stream);

// Dropout keep bits (csrc/dropout_bits.cu): bits (M, ceil(K/8)) bytes, bit q of bits[m, k8] set iff element
// (m, 8*k8 + q) is kept; the contract's mask (philox.cuh), computed in a pass of its own. The shrink, dA and dx take
// them as keep8 (null: each computes the mask itself); dropout_bits_used says whether their kernels for these dtypes
// read them (the tensor-core kernels do, the FFMA kernels compute the mask themselves).
bool dropout_bits_used(DType x_dtype, DType a_dtype);
int64_t dropout_keep_bits_bytes(int64_t M, int64_t K);  // M * ceil(K / 8)
cudaError_t launch_dropout_keep_bits(uint8_t* bits, int64_t M, int64_t K, float p, uint64_t seed,
                                     const int64_t* seed_ptr, uint64_t offset, cudaStream_t stream);

// Small M (csrc/small_m.cu): the whole forward in one launch, y (M, N) x_dtype = x W^T + bias + u B^T and u (M, r)
// fp32 = scaling / (1 - p) * (keep * x) A^T (the shrink's u, saved for backward; keep the contract's Philox mask
// for (seed or *seed_ptr, offset), all ones at p = 0). W (N, K) and bias (N,) or null in x_dtype; A (r, K) a_dtype,
// B (N, r) b_dtype, each float32 or x_dtype. lora_small_m_unsupported: null when the launcher takes these inputs
// here, else why not (M above 64, r too large for M, dropout where the register-direct kernel does not run, ...).
const char* lora_small_m_unsupported(const void* x, const void* W, const void* A, int64_t M, int64_t N, int64_t K,
                                     int r, DType x_dtype, DType a_dtype, float p);
cudaError_t launch_lora_small_m_forward(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                        DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                        int64_t N, int64_t K, int r, float scaling, float p, uint64_t seed,
                                        const int64_t* seed_ptr, uint64_t offset, cudaStream_t stream);
// Its Hopper kernel (csrc/small_m_sm90.cu: wgmma with W's rows as M, K split over a cluster), which
// launch_lora_small_m_forward takes first: p = 0, x, lora_A and lora_B in one 16-bit dtype (or, opt-in with
// LORA_KERNELS_SMALL_M_SM90_FP32=1, fp32 adapters on bf16 x at r <= 16), r % 8 == 0, K % 8 == 0, 16-byte aligned
// operands, on compute capability 9.0. lora_small_m_sm90_unsupported: null when it runs these inputs,
// else why not. set_small_m_sm90 switches it for this process (LORA_KERNELS_SMALL_M_SM90=0 starts it off) and
// returns the previous setting.
const char* lora_small_m_sm90_unsupported(const void* x, const void* W, const void* A, const void* B, int64_t M,
                                          int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype, DType b_dtype,
                                          float p);
cudaError_t launch_lora_small_m_sm90(const void* x, DType x_dtype, const void* W, const void* bias, const void* A,
                                     DType a_dtype, const void* B, DType b_dtype, void* y, float* u, int64_t M,
                                     int64_t N, int64_t K, int r, float scaling, cudaStream_t stream);
bool set_small_m_sm90(bool on);
// The same kernel transposed for the backward's dx at small M (one launch): dx (M, K) x_dtype = dy W + (s·g) A and
// sg (M, r) fp32 = s · dy B, for dy (M, N) and W (N, K) in x_dtype, A (r, K) and B (N, r) in x_dtype (or both fp32,
// with the forward's opt-in); p = 0, r % 8 == 0, N % 8 == 0 and K % 8 == 0, 16-byte aligned operands, compute
// capability 9.0. lora_small_m_sm90_dx_unsupported: null when it runs these inputs, else why not; set_small_m_sm90_dx
// switches it (LORA_KERNELS_SMALL_M_SM90_DX=0 starts it off). Then launch_lora_small_m_grads (csrc/small_m_grads.cu)
// makes dA (r, K) = sgᵀ x and dB (N, r) = dyᵀ u in ab_dtype (either may be null), one launch, for M <= 64 and
// r % 8 == 0.
const char* lora_small_m_sm90_dx_unsupported(const void* dy, const void* W, const void* A, const void* B, int64_t M,
                                             int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype,
                                             DType b_dtype, float p);
cudaError_t launch_lora_small_m_sm90_dx(const void* dy, DType x_dtype, const void* W, const void* A, DType a_dtype,
                                        const void* B, DType b_dtype, void* dx, float* sg, int64_t M, int64_t N,
                                        int64_t K, int r, float scaling, cudaStream_t stream);
bool set_small_m_sm90_dx(bool on);
cudaError_t launch_lora_small_m_grads(const void* x, const void* dy, DType x_dtype, const float* sg, const float* u,
                                      void* dA, void* dB, DType ab_dtype, int64_t M, int64_t N, int64_t K, int r,
                                      cudaStream_t stream);

// y (M, N) y_dtype = u (M, r) fp32 @ B^T + bias ; B (N, r) b_dtype, bias (N,) y_dtype or null. fp32 accumulation
// (u and B cast to y_dtype first when it is 16-bit), bias added in fp32, one write of y (never read).
cudaError_t launch_lora_expand(void* y, DType y_dtype, const float* u, const void* B, DType b_dtype,
                                       const void* bias, int64_t M, int64_t N, int r, cudaStream_t stream);

// y (M, N) y_dtype = c ⊙ y + bias in place: c (N,) fp32 per column, bias (N,) y_dtype or null (col_scale.cu: DoRA's
// column scale on the forward paths whose epilogue does not apply it). Math in fp32, one rounding.
cudaError_t launch_lora_col_scale(void* y, DType y_dtype, const float* c, const void* bias, int64_t M, int64_t N,
                                  cudaStream_t stream);

// DoRA's passes (dora_norm.cu, dora_colsum.cu, dora_dmag.cu, dora_dropout.cu; the C++ entry of dora_autograd.h).
// wa = W Aᵀ as wa_splits partials of (N, r) fp32 (the shrink pass's K splits, summed here in their order), wsq =
// ‖W_n‖² (N,) fp32,
// aat = A Aᵀ (r, r) fp32, B (N, r) b_dtype, magnitude (N,) m_dtype: norm = ‖W + s·B A‖_row, g = magnitude / norm
// (fp32) and Bg = g ⊙ B (b_dtype); big_adapter (N,) (or null) = ‖s·(B A)_n‖ > ‖W_n‖ / 2 (common.cuh's
// dora_recompute_z). W (N, K) w_dtype and A (r, K) a_dtype, both contiguous: the rows that cancel are summed again
// from them.
cudaError_t launch_dora_combine(const float* wa, int64_t wa_splits, const float* wsq, const void* B, DType b_dtype,
                                const float* aat, const void* W, DType w_dtype, const void* A, DType a_dtype, int64_t K,
                                const void* magnitude, DType m_dtype, float scaling, int64_t N, int r, float* norm,
                                float* g, void* Bg, uint8_t* big_adapter, cudaStream_t stream);
// aat (r, r) fp32 = A Aᵀ, A (r, K) a_dtype (dora_gram.cu: one launch, fp32 products and sums, symmetric exactly).
cudaError_t launch_dora_gram(const void* A, DType a_dtype, int r, int64_t K, float* aat, cudaStream_t stream);
// Row splits of launch_dora_colsum's partial sums for an (M, N) dy.
int64_t dora_colsum_splits(int64_t M, int64_t N);
// dy, y (M, N) dtype, c and div (N,) fp32 (div may be null), bias (N,) dtype or null: dyc = c ⊙ dy (dyc null: not
// written; dyc = dy or dyc = y: in place) and part[s] (N,) fp32 = Σ_{m in split s} dy ⊙ (y − bias) / div (0 where
// div = 0; div null: no division), part (splits, N) or null. p = 0: y the output, c = div = g; p > 0: y = z, div null.
// keep_recomputed: dyc = dy in the columns that launch_dora_dmag recomputes (dora_recompute_z of c, the bias and
// big_adapter (N,), which may be null; its scale_dy finishes them).
cudaError_t launch_dora_colsum(const void* dy, const void* y, DType dtype, const float* c, const float* div,
                               const void* bias, const uint8_t* big_adapter, void* dyc, float* part, int64_t M,
                               int64_t N, int64_t splits, bool keep_recomputed, cudaStream_t stream);
// dmag (N,) m_dtype = Σ_s part[s] / q / norm; where y cannot give z (g not null: p = 0; dora_recompute_z of g,
// the bias (N,) dtype or null, and big_adapter (N,) or null), Σ_m dy ⊙ (x Wᵀ + u Bᵀ) / norm for that column instead
// (x (M, K), W (N, K), dy (M, N) dtype, contiguous; u (M, r) fp32; B (N, r) b_dtype), and then, when scale_dy
// (= dy) is not null, that column of dy set to g ⊙ dy. With g, part has dora_dmag_recompute_splits(M, N) rows more
// after its `splits`: the recompute's scratch.
int64_t dora_dmag_recompute_splits(int64_t M, int64_t N);
cudaError_t launch_dora_dmag(float* part, int64_t splits, const float* g, const float* norm, float q,
                             const void* dy, const void* x, const void* W, const void* bias,
                             const uint8_t* big_adapter, DType dtype, const float* u, const void* B, DType b_dtype,
                             void* dmag, DType m_dtype, void* scale_dy, int64_t M, int64_t K, int64_t N, int r,
                             cudaStream_t stream);
// out (M, K) = base + (keep ? a_keep · t : a_drop · t), keep the contract's dropout mask of an (M, K) input at (seed,
// offset) and p; t, base (or null), out contiguous (M, K) of one dtype, any two of them possibly the same tensor.
cudaError_t launch_dora_masked(const void* t, const void* base, void* out, DType dtype, int64_t M, int64_t K, float p,
                               uint64_t seed, uint64_t offset, float a_keep, float a_drop, cudaStream_t stream);

// g_out[c] (M, r) fp32 = dy[:, cols of c] @ B[cols of c] (g_out = g itself when plan.col_groups == 1);
// and if dB_partial != nullptr: dB_partial[s] (N, r) = dy[rows of s]^T @ u[rows of s] (u may be null otherwise).
// dy (M, N) dy_dtype, B (N, r) b_dtype, u (M, r) fp32. plan from lora_dy_pass_plan(M, N, r).
cudaError_t launch_lora_dy_pass(const void* dy, DType dy_dtype, const void* B, DType b_dtype, const float* u,
                                float* g_out, float* dB_partial, int64_t M, int64_t N, int r, SplitPlan plan,
                                cudaStream_t stream);
// The same pass on Hopper (dy_pass_sm90.cu: wgmma, one more launch that stages the adapters' pieces in `scratch`,
// lora_dy_pass_sm90_scratch_bytes long): same outputs and partial layout, for lora_dy_pass_sm90_plan's plan.
// lora_dy_pass_sm90_unsupported: nullptr where it runs, else why not (then launch_lora_dy_pass).
const char* lora_dy_pass_sm90_unsupported(const void* dy, DType dy_dtype, DType b_dtype, int64_t M, int64_t N, int r);
SplitPlan lora_dy_pass_sm90_plan(int64_t M, int64_t N, int r, int pieces);
size_t lora_dy_pass_sm90_scratch_bytes(int64_t M, int64_t N, int r, int pieces);
cudaError_t launch_lora_dy_pass_sm90(const void* dy, DType dy_dtype, const void* B, DType b_dtype, const float* u,
                                     float* g_out, float* dB_partial, int64_t M, int64_t N, int r, SplitPlan plan,
                                     void* scratch, cudaStream_t stream);
// The dA pass on Hopper (dA_sm90.cu: the same streaming kernel, D product only, x masked in shared memory by the
// keep bits with dropout): same outputs and partial layout as launch_lora_dA, for lora_dA_sm90_plan's plan; g's pieces staged in `scratch` where
// lora_dA_sm90_scratch_bytes is not 0 (a prep launch), else by the kernel itself (one launch, scratch unused).
const char* lora_dA_sm90_unsupported(const void* x, DType x_dtype, DType a_dtype, int64_t M, int64_t K, int r,
                                     float p);
// masked: the plan of a call with dropout (p > 0), whose keep bits take shared memory too.
// blocks > 0: a plan of at most that many blocks (row_splits 0 when none fits), for dA beside the dx GEMM.
SplitPlan lora_dA_sm90_plan(int64_t M, int64_t K, int r, int pieces, bool masked = false, int blocks = 0);
size_t lora_dA_sm90_scratch_bytes(int64_t M, int r, int pieces);
// With p > 0 the kernel masks x by the keep bits keep8 (launch_dropout_keep_bits) and scales by scaling / (1 - p).
// beside: launched right after an sm_90 GEMM with early_dependents (gemm_sm90.h), the pass runs on the SMs the GEMM's
// grid leaves free and waits for the GEMM at its end; it must read nothing the GEMM writes, and its prep (where
// lora_dA_sm90_scratch_bytes is not 0) must have run before the GEMM: launch_lora_dA_sm90_prep.
cudaError_t launch_lora_dA_sm90(const void* x, DType x_dtype, DType a_dtype, const float* g, float* dA_partial,
                                int64_t M, int64_t K, int r, SplitPlan plan, float scaling, float p,
                                const uint8_t* keep8, void* scratch, cudaStream_t stream, bool beside = false);
// dA beside the dx GEMM (launch_lora_dA_sm90, beside): `blocks` SMs taken from the GEMM's grid (LoraGemmArgs::sms =
// the device's SMs - blocks) and the dA plan of at most that many blocks; blocks 0: dA runs after the GEMM. The
// argument blocks: < 0 lets a cost model of the GEMM's waves and the pass's largest span choose (dA_sm90.cu),
// 0 never, > 0 that many (A/B timing). dx: the dx GEMM's arguments (shapes and extension; pointers unused).
struct DaBeside {
  int blocks;
  SplitPlan plan;
};
DaBeside lora_dA_sm90_beside(const LoraGemmArgs& dx, int64_t M, int64_t K, int r, int pieces, bool masked,
                             int blocks);
cudaError_t launch_lora_dA_sm90_prep(DType x_dtype, DType a_dtype, const float* g, int64_t M, int r, void* scratch,
                                     cudaStream_t stream);
// The shrink on Hopper (shrink_sm90.cu: the same streaming kernel, G product only, x masked in shared memory by the
// keep bits keep8, which a call with p > 0 must give): same outputs and partial layout as launch_lora_shrink, for
// lora_shrink_sm90_plan's plan; lora_A's pieces staged in `scratch` (lora_shrink_sm90_scratch_bytes).
const char* lora_shrink_sm90_unsupported(const void* x, DType x_dtype, DType a_dtype, int64_t M, int64_t K, int r,
                                         float p);
SplitPlan lora_shrink_sm90_plan(int64_t M, int64_t K, int r, int pieces);
size_t lora_shrink_sm90_scratch_bytes(int64_t K, int r, int pieces);
cudaError_t launch_lora_shrink_sm90(const void* x, DType x_dtype, const void* A, DType a_dtype, float* u_out,
                                    int64_t M, int64_t K, int r, SplitPlan plan, float scaling, float p,
                                    const uint8_t* keep8, void* scratch, cudaStream_t stream);

// dA_partial[s] (r, K) = scaling * g[rows of s]^T @ dropout(x)[rows of s]. plan from lora_dA_plan.
// a_dtype (lora_A's) picks the precision as for the other passes.
cudaError_t launch_lora_dA(const void* x, DType x_dtype, DType a_dtype, const float* g, float* dA_partial, int64_t M,
                           int64_t K, int r, SplitPlan plan, float scaling, float p, uint64_t seed,
                           const int64_t* seed_ptr, uint64_t offset, const uint8_t* keep8, cudaStream_t stream);

// out[i] = sum_{s=0}^{S-1} partial[s * count + i] in order s = 0, 1, ... (zeros when S == 0), cast to out_dtype.
cudaError_t launch_reduce_partials(const float* partial, int64_t num_splits, int64_t count, void* out,
                                   DType out_dtype, cudaStream_t stream);

// dx (M, K) x_dtype = scaling * keep / (1-p) * (g @ A) ; g (M, r) fp32, A (r, K) a_dtype. One write of dx.
cudaError_t launch_lora_dx(void* dx, DType x_dtype, const float* g, const void* A, DType a_dtype, int64_t M,
                               int64_t K, int r, float scaling, float p, uint64_t seed, const int64_t* seed_ptr,
                               uint64_t offset, const uint8_t* keep8, cudaStream_t stream);

}  // namespace lora_kernels
