// Thin torch binding of the CUDA backend: registers torch.ops.lora_kernels_cuda.forward / backward.
// The frozen GEMMs go to cuBLAS through ATen (at::addmm / at::mm, on the current stream); the LoRA work around
// them is the fused kernels of lora_kernels.cu. Built as the Python extension module lora_kernels._C, whose
// import only runs the static registrations below (no pybind11 needed).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "fused_fwd_sm90.h"
#include "gemm_sm90.h"
#include "gemm_sm90_pack.h"
#include "dora_autograd.h"
#include "lora_autograd.h"
#include "lora_kernels.cuh"

namespace {

using at::Tensor;
namespace lk = lora_kernels;

// Error messages. Every check's message is built here into one std::string (numbers by std::to_string, dtypes and
// devices by c10's own toString/str) and handed to TORCH_CHECK whole, so nothing of ours formats a number through an
// ostream. On the GPU machine (torch 2.11+cu130) a failed TORCH_CHECK whose message streamed an int64 from this
// extension crashed the process (SIGSEGV) where one that streamed a dtype or only text raised
// (bench/dev/bad_input_probe.py, nineteenth and twentieth sessions; bench/dev/check_fail_probe.py isolates it).
void put(std::string& s, const char* v) { s += v; }
void put(std::string& s, const std::string& v) { s += v; }
void put(std::string& s, at::ScalarType v) { s += c10::toString(v); }
void put(std::string& s, const c10::Device& v) { s += v.str(); }
void put(std::string& s, double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  s += b;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void put(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... T>
std::string cat(const T&... v) {
  std::string s;
  (put(s, v), ...);
  return s;
}
#define LK_CHECK(cond, ...) TORCH_CHECK(cond, cat(__VA_ARGS__))

lk::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return lk::DType::kFloat32;
    case at::kHalf: return lk::DType::kFloat16;
    case at::kBFloat16: return lk::DType::kBFloat16;
    default: LK_CHECK(false, "lora_kernels_cuda: ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return lk::DType::kFloat32;
}

void check_cuda(cudaError_t e, const char* what) {
  LK_CHECK(e == cudaSuccess, "lora_kernels_cuda: ", what, " failed: ", cudaGetErrorString(e));
}

// The dropout mask of an (M, K) input as keep bits (csrc/dropout_bits.cu), the seed by value or device pointer.
void make_keep_bits(uint8_t* bits, int64_t M, int64_t K, float p, int64_t seed, const int64_t* seed_ptr,
                    int64_t offset, cudaStream_t stream) {
  check_cuda(lk::launch_dropout_keep_bits(bits, M, K, p, (uint64_t)seed, seed_ptr, (uint64_t)offset, stream),
             "dropout keep bits launch");
}

// A tensor's shape as "[d0, d1, ...]" for the error messages.
std::string shape_of(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

void check_tensor(const Tensor& t, const char* name, const Tensor& ref, int64_t dim) {
  LK_CHECK(t.is_cuda(), "lora_kernels_cuda: ", name, " must be a CUDA tensor");
  LK_CHECK(t.device() == ref.device(), "lora_kernels_cuda: ", name, " is on ", t.device(), " but x is on ",
              ref.device());
  LK_CHECK(t.dim() == dim, "lora_kernels_cuda: ", name, " must be ", dim, "-D, got shape ", shape_of(t));
  LK_CHECK(t.is_contiguous(), "lora_kernels_cuda: ", name, " must be contiguous");
}

void check_adapter_dtype(const Tensor& t, const char* name, const Tensor& x) {
  LK_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), "lora_kernels_cuda: ", name,
              " must be float32 or x's dtype (", x.scalar_type(), "), got ", t.scalar_type());
}

void check_common(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B, double p, int64_t seed) {
  LK_CHECK(x.is_cuda(), "lora_kernels_cuda: x must be a CUDA tensor");
  check_tensor(x, "x", x, 2);
  check_tensor(weight, "weight", x, 2);
  check_tensor(A, "lora_A", x, 2);
  check_tensor(B, "lora_B", x, 2);
  to_dtype(x, "x");
  LK_CHECK(weight.scalar_type() == x.scalar_type(), "lora_kernels_cuda: weight must have x's dtype (",
              x.scalar_type(), "), got ", weight.scalar_type());
  check_adapter_dtype(A, "lora_A", x);
  check_adapter_dtype(B, "lora_B", x);
  const int64_t K = x.size(1), N = weight.size(0), r = A.size(0);
  LK_CHECK(weight.size(1) == K, "lora_kernels_cuda: weight must be (N, K=", K, "), got ", shape_of(weight));
  LK_CHECK(r >= 1 && r <= lk::kMaxRank, "lora_kernels_cuda: rank r = lora_A.size(0) must be in 1..",
              lk::kMaxRank, ", got ", r);
  LK_CHECK(A.size(1) == K, "lora_kernels_cuda: lora_A must be (r, K=", K, "), got ", shape_of(A));
  LK_CHECK(B.size(0) == N && B.size(1) == r, "lora_kernels_cuda: lora_B must be (N=", N, ", r=", r, "), got ",
              shape_of(B));
  LK_CHECK(p >= 0.0 && p < 1.0, "lora_kernels_cuda: p must be in [0, 1), got ", p);
  LK_CHECK(seed >= 0, "lora_kernels_cuda: seed must be in [0, 2^63), got ", seed);
}

// The device seed of a call: seed_t, when given, is a one-element int64 tensor on x's device holding the Philox key
// (the graph-safe seed drawn on the device under CUDA graph capture and torch.compile, lora_kernels/ops.py): the
// kernels read it when they run, and `seed` is ignored. Returns the pointer the kernels take, null without seed_t or
// without dropout (the by-value seed is used, or nothing is masked). No host read of the value: no sync.
const int64_t* device_seed(const std::optional<Tensor>& seed_t, const Tensor& x, double p) {
  if (!seed_t.has_value() || !seed_t->defined()) return nullptr;
  LK_CHECK(seed_t->is_cuda() && seed_t->device() == x.device(), "lora_kernels_cuda: seed_t must be on x's device (",
              x.device(), "), got ", seed_t->device());
  LK_CHECK(seed_t->scalar_type() == at::kLong && seed_t->numel() == 1,
              "lora_kernels_cuda: seed_t must hold one int64, got ", seed_t->scalar_type(), " of shape ",
              shape_of(*seed_t));
  return p > 0.0 ? seed_t->data_ptr<int64_t>() : nullptr;
}

// ------------------------------------------------------------------ the sm_90 path (csrc/gemm_sm90.h)
// On a compute-capability-9.0 GPU with 16-bit x, the frozen GEMM and the rank-r term run as one GEMM: the
// rank-r operands are packed into extra K-tiles (kx columns: r rounded up to the 64-wide K tile).
// LORA_KERNELS_SM90_GEMM=0 turns the path off (read once).
bool sm90_enabled() {
  static const bool on = lk::env_switch_on("LORA_KERNELS_SM90_GEMM");
  return on;
}

int64_t sm90_kx(int64_t r) { return (r + 63) / 64 * 64; }
// The extension's columns the sm_90 GEMM multiplies (LoraGemmArgs::Kx_used): r, so that the zero padding up to
// sm90_kx(r) is skipped; with LORA_KERNELS_SM90_GEMM_TRIM=0 (read once, A/B timing) all of them.
int64_t sm90_kx_used(int64_t r) {
  static const bool trim = lk::env_switch_on("LORA_KERNELS_SM90_GEMM_TRIM");
  return trim ? r : 0;
}

lk::GemmDType gemm_dtype(const Tensor& x) {
  return x.scalar_type() == at::kHalf ? lk::GemmDType::kFloat16 : lk::GemmDType::kBFloat16;
}

// nullptr when a GEMM D (M, N) = a (M, K) op(b) (+ bias) can take the sm_90 path, else why not. masked: with an
// extension masked by keep bits (dx with dropout; the operands and bits are workspace pieces, aligned like a).
const char* sm90_unsupported(const Tensor& a, const Tensor& b, const Tensor* bias, int64_t M, int64_t N, int64_t K,
                             lk::GemmLayoutB layout, bool masked = false) {
  if (!sm90_enabled()) return "LORA_KERNELS_SM90_GEMM=0";
  if (a.scalar_type() != at::kHalf && a.scalar_type() != at::kBFloat16) return "x is not float16 or bfloat16";
  lk::LoraGemmArgs args;
  args.M = M; args.N = N; args.K = K;
  args.a = a.data_ptr(); args.b = b.data_ptr();
  args.d = a.data_ptr();  // the output comes from the caching allocator: aligned like a
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.layout_b = layout;
  if (masked) {
    args.Kx = 64;
    args.ax = args.bx = a.data_ptr();
    args.keep = static_cast<const uint8_t*>(a.data_ptr());
  }
  return lk::lora_gemm_sm90_unsupported(args, a.get_device());
}

// ------------------------------------------------------------------ the fused sm_90 forward (csrc/fused_fwd_sm90.h)
// The forward as one GEMM launch with the shrink inside it (plus a prep launch): on the sm_90 GEMM's devices and
// dtypes, r <= 64. Mode (LORA_KERNELS_FUSED_FWD, read once; set_fused_forward at run time):
//   -1 (unset, the default)  p = 0 only (p > 0: the shrink + GEMM path). u computed by each row block's lead tiles
//                            (ceil(r / 8) of them for fp32 adapters on bf16, 8 u columns each; 16-bit adapters
//                            ceil(r / 32) of 32 columns, or of 8 where those fit one wave), by u tiles where the lead
//                            tiles do not fit (fewer output tile columns than lead tiles).
//    1                       u tiles only (with dropout they mask their copy of x in shared memory);
//    2                       lead tiles only (with dropout: fp32 adapters on bf16 x, masking x's copy in registers);
//    0                       off (the shrink + pack + GEMM path).
// Measured on the Llama-3-8B shapes (bench/results): the lead tiles beat the u tiles and the separate shrink pass
// with 2 to 4 lead tiles per row block at 8192 tokens (fp32 adapters at r = 16 and 32, bf16 adapters at r = 64:
// 1.057 against 1.131 the floor at 4096->4096, 1.228 against 1.582 at ->1024; thirteenth and fourteenth sessions),
// and with 8 (fp32 adapters at r = 64) at every M from 1024 to 8192 in the targets' burst regime (session 38, run 1:
// GPU time over the floor, geomean of the four shapes, 1.464 against 1.813 at M = 1024, 1.219 against 1.519 at 2048,
// 1.198 against 1.214 at 8192; the u tiles won only at 4096->14336, by 1-5%, at M = 1024, 3072, 6144 and 8192). The
// thirteenth session had the u tiles ahead at r = 64 (8192 tokens, back to back), before the lead tiles moved to the
// 128 x 256 tile. With dropout neither beats the shrink pass that reads the keep bits: the u tiles' masking in
// shared memory sits on the path every output tile of the row block waits for, and the lead tiles' in registers
// (with the keep-bits pass they still need) made them 1.29x the floor against 1.24x at 8192x4096->4096, r = 16
// (fourteenth session, run 3). LORA_KERNELS_SM90_GEMM=0 turns the fused forward off with the rest of the sm_90 GEMM.
std::atomic<int>& fused_mode() {
  static std::atomic<int> mode{[] {
    const char* v = std::getenv("LORA_KERNELS_FUSED_FWD");
    if (v == nullptr || *v == '\0') return -1;
    const std::string s(v);
    return s == "0" ? 0 : s == "2" ? 2 : 1;
  }()};
  return mode;
}

lk::FusedFwdArgs fused_args(const Tensor& x, const Tensor& weight, const Tensor* bias, const Tensor& lora_A,
                            const Tensor& lora_B, double scaling, double p, bool lead) {
  lk::FusedFwdArgs a;
  a.lead = lead;
  a.p = (float)p;
  a.M = x.size(0); a.N = weight.size(0); a.K = x.size(1); a.r = (int)lora_A.size(0);
  a.x_dtype = to_dtype(x, "x"); a.a_dtype = to_dtype(lora_A, "lora_A"); a.b_dtype = to_dtype(lora_B, "lora_B");
  a.x = x.data_ptr(); a.w = weight.data_ptr(); a.bias = bias ? bias->data_ptr() : nullptr;
  a.lora_A = lora_A.data_ptr(); a.lora_B = lora_B.data_ptr();
  a.scale = (float)scaling;
  return a;
}

// nullptr when the forward takes the fused kernel (*lead: its lead-tile variant), else why not.
const char* fused_forward_unsupported(const Tensor& x, const Tensor& weight, const Tensor* bias, const Tensor& lora_A,
                                      const Tensor& lora_B, double p, bool* lead = nullptr) {
  if (!sm90_enabled()) return "LORA_KERNELS_SM90_GEMM=0";
  const int mode = fused_mode().load(std::memory_order_relaxed);
  if (mode == 0) return "off (LORA_KERNELS_FUSED_FWD=0 or set_fused_forward)";
  lk::FusedFwdArgs a = fused_args(x, weight, bias, lora_A, lora_B, 1.0, p, mode != 1);
  a.y = x.data_ptr();  // the output comes from the caching allocator: aligned
  // With dropout the default takes the fused kernel only where the split variant runs (x masked in registers for u's
  // products; set_fused_split(1) asks for it, since it measured slower than the shrink + GEMM path); the u and lead
  // tiles' masking measured slower than the shrink pass (FINDINGS).
  if (p > 0.0 && mode < 0 && !lk::lora_fused_fwd_sm90_split(a))
    return "dropout (the fused kernel's masking is slower than the shrink pass: set_fused_forward(1) or (2))";
  const char* why = lk::lora_fused_fwd_sm90_unsupported(a, x.get_device());
  if (why != nullptr && mode < 0 && p == 0.0) {  // the default: u tiles where the lead tiles do not fit
    a.lead = false;
    why = lk::lora_fused_fwd_sm90_unsupported(a, x.get_device());
  }
  if (lead != nullptr) *lead = a.lead;
  return why;
}

// ------------------------------------------------------------------ the small-M forward (csrc/small_m.cu)
// M <= 64: the whole forward in one launch. On unless LORA_KERNELS_SMALL_M=0 (read once); set_small_m switches it at
// run time (tests of the other paths at small M, A/B timing).
std::atomic<bool>& small_m_switch() {
  static std::atomic<bool> on{lk::env_switch_on("LORA_KERNELS_SMALL_M")};
  return on;
}

// Whether the small-M forward runs the Hopper wgmma kernel (csrc/small_m_sm90.cu; it reads x once per 64 or
// 128 columns): nullptr when it does, else why not.
const char* small_m_sm90_unsupported(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                     const Tensor& lora_B, double p) {
  return lk::lora_small_m_sm90_unsupported(x.data_ptr(), weight.data_ptr(), lora_A.data_ptr(), lora_B.data_ptr(),
                                           x.size(0), weight.size(0), x.size(1), (int)lora_A.size(0),
                                           to_dtype(x, "x"), to_dtype(lora_A, "lora_A"), to_dtype(lora_B, "lora_B"),
                                           (float)p);
}

// nullptr when a forward with these inputs takes the small-M kernel, else why not. Above M = 16, where y has at least
// half as many 128-column tiles as the GPU has SMs, the fused forward (prep + GEMM) takes the call when it can: its
// 128-row tiles read x once per 128 columns, where the small-M kernel's warps re-read x from L2 for every 16. On the
// H200 (GPU time / floor, r = 16): 4096->14336 at M = 32 and 64, 1.62 and 1.54 against 1.75 and 2.82; at 4096->4096
// (32 tiles) the small-M kernel stays ahead, 1.83 and 2.75 against 2.68 and 2.91 (bench/results/h200_2026-12-02/
// session17, run 2). Where the Hopper kernel runs, the small-M forward keeps the call: 1.18 against the fused
// forward's 1.43 at 4096->14336, M = 64 (H100, bench/results/h100_2026-12-06/session56).
const char* small_m_unsupported(const Tensor& x, const Tensor& weight, const Tensor* bias, const Tensor& lora_A,
                                const Tensor& lora_B, double p) {
  if (!small_m_switch().load(std::memory_order_relaxed)) return "off (LORA_KERNELS_SMALL_M=0 or set_small_m)";
  const char* why = lk::lora_small_m_unsupported(x.data_ptr(), weight.data_ptr(), lora_A.data_ptr(), x.size(0),
                                                 weight.size(0), x.size(1), (int)lora_A.size(0), to_dtype(x, "x"),
                                                 to_dtype(lora_A, "lora_A"), (float)p);
  if (why == nullptr && x.size(0) > 16 && 2 * ((weight.size(0) + 127) / 128) >= lk::detail::num_sms() &&
      small_m_sm90_unsupported(x, weight, lora_A, lora_B, p) != nullptr &&
      fused_forward_unsupported(x, weight, bias, lora_A, lora_B, p) == nullptr)
    return "M > 16 with N / 128 >= SMs / 2: the fused forward is faster";
  return why;
}

// ------------------------------------------------------------------ the temporaries of a call
// Every buffer of a call that is not returned (split-K and split-M partials, g, the sm_90 GEMM's packed rank-r
// operands) is a piece of one byte allocation: one at::empty per call instead of one per buffer, each of which costs
// microseconds of host time (what decides the speed of small-M calls). Pieces start at multiples of kAlign bytes: the
// sm_90 GEMM's TMA operands and the kernels' 16-byte vector loads and stores need 16. A piece of zero bytes is a null
// pointer, as the data_ptr() of a zero-element tensor is (the launchers take both alike). The buffer is freed when
// the Workspace goes out of scope, after the launches that use it are queued: the caching allocator reuses it in
// stream order, as it does any temporary tensor.
class Workspace {
 public:
  static constexpr int64_t kAlign = 256;

  // Reserves a piece of `bytes` bytes; returns its handle for ptr() (-1: an empty piece).
  int64_t reserve(int64_t bytes) {
    if (bytes <= 0) return -1;
    const int64_t offset = end_;
    end_ += (bytes + kAlign - 1) / kAlign * kAlign;
    size_ = std::max(size_, end_);
    return offset;
  }
  int64_t reserve_floats(int64_t count) { return reserve(count * (int64_t)sizeof(float)); }

  // Pieces reserved after rewind(mark()) start again where mark() was taken, over the pieces reserved since: for
  // buffers whose last use comes, in stream order, before the first write of the new ones (all the launches of a
  // call are on one stream). It keeps a call's peak memory what it was with one tensor per buffer, each freed after
  // its last use.
  int64_t mark() const { return end_; }
  void rewind(int64_t mark) { end_ = mark; }

  // One allocation for every piece reserved so far, on options' device and its current stream (at::empty). The
  // kAlign - 1 bytes of slack align the first piece whatever the base (the caching allocator's is already 512-byte
  // aligned).
  void allocate(const at::TensorOptions& options) {
    if (size_ == 0) return;
    buffer_ = at::empty({size_ + kAlign - 1}, options.dtype(at::kByte));
    const uintptr_t base = reinterpret_cast<uintptr_t>(buffer_.data_ptr());
    base_ = reinterpret_cast<char*>((base + kAlign - 1) / (uintptr_t)kAlign * (uintptr_t)kAlign);
  }

  template <typename T = void>
  T* ptr(int64_t handle) const {
    return handle < 0 ? nullptr : reinterpret_cast<T*>(base_ + handle);
  }

 private:
  int64_t end_ = 0, size_ = 0;
  Tensor buffer_;
  char* base_ = nullptr;
};

// y (M, N) = x W^T + u B^T + bias on the sm_90 path. u_work holds u = s·dropout(x) A^T (M, r) fp32, or the
// shrink's `partials` split-K parts of it; the pack launch sums them on the way, into u (kept for backward) when u is
// not null. ux (M, kx) and bx (N, kx) in x's dtype: the packed rank-r operands (workspace pieces).
void sm90_forward(const Tensor& x, const Tensor& weight, const Tensor* bias, const float* u_work, int64_t partials,
                  float* u, int r, const Tensor& lora_B, void* ux, void* bx, Tensor& y, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), kx = sm90_kx(r);
  lk::PackJob ju{u_work, lk::DType::kFloat32, M, r, ux, M, kx, 1.f};
  if (partials > 1) {
    ju.partials = partials;
    ju.partial_stride = M * r;
    ju.sum_out = u;
  }
  lk::PackJob jb{lora_B.data_ptr(), to_dtype(lora_B, "lora_B"), N, r, bx, N, kx, 1.f};
  check_cuda(lk::launch_pack_rank_operands(ju, jb, to_dtype(x, "x"), stream), "pack(u, B) launch");
  lk::LoraGemmArgs g;
  g.M = M; g.N = N; g.K = K; g.Kx = kx; g.Kx_used = sm90_kx_used(r);
  g.a = x.data_ptr(); g.b = weight.data_ptr(); g.ax = ux; g.bx = bx;
  g.bias = bias ? bias->data_ptr() : nullptr;
  g.d = y.data_ptr();
  g.dtype = gemm_dtype(x);
  g.layout_b = lk::GemmLayoutB::kNK;
  check_cuda(lk::launch_lora_gemm_sm90(g, stream), "sm90 GEMM launch (forward)");
}

// nullptr when dx = dy W + (s g) A (M, K) can take the sm_90 path, else why not. With dropout the GEMM masks the
// rank-r term with the keep bits, so it needs them (bits: the backward makes them) and their layout (K % 128).
// LORA_KERNELS_SM90_DX_MASK=0 (read once) keeps dx with dropout off the sm_90 path (for A/B timing).
const char* dx_sm90_unsupported(const Tensor& dy, const Tensor& weight, float p, bool bits) {
  static const bool mask_on = lk::env_switch_on("LORA_KERNELS_SM90_DX_MASK");
  if (p > 0.0f && !mask_on) return "LORA_KERNELS_SM90_DX_MASK=0";
  if (p > 0.0f && !bits) return "no keep bits for these dtypes (dropout_bits_used)";
  const char* why = sm90_unsupported(dy, weight, nullptr, dy.size(0), weight.size(1), weight.size(0),
                                     lk::GemmLayoutB::kKN, p > 0.0f);
  if (why == nullptr && dy.size(0) <= lk::small_m_backward_rows())
    return "M <= kSmallMBackwardRows (64): cuBLAS is faster";
  return why;
}

// Whether the backward's dA pass over x (M, K) runs on the sm_90 streaming kernel (dA_sm90.cu); with dropout only
// where the keep bits are made (bits), which it reads.
bool dA_on_sm90(const Tensor& x, lk::DType x_dt, lk::DType a_dt, int r, float p, bool bits) {
  const int64_t M = x.size(0), K = x.size(1);
  return M > 0 && K > 0 && (p == 0.0f || bits) &&
         lk::lora_dA_sm90_unsupported(x.data_ptr(), x_dt, a_dt, M, K, r, p) == nullptr;
}

// The rank-r operands of dx on the sm_90 path, packed: vx (M, kx) = s·g and ax (kx, K) = lora_A in dy's dtype
// (workspace pieces). g_work holds g = dy B (M, r) fp32, or the dy pass's `partials` column-group parts of it: the
// pack sums them on the way (the same fp32 sums in the same order as launch_reduce_partials), into g_sum when it
// is not null (the reduced g, for dA). dB_reduce: the dB partials' reduction, run by the same launch. v_pieces, if
// set: also the bf16x3 pieces of s·g (M, 3r) there, the dA GEMM's operand with fp32 adapters.
void sm90_dx_pack(const Tensor& dy, const float* g_work, int64_t partials, float* g_sum, int r,
                  const Tensor& lora_A, double scaling, void* vx, void* ax, cudaStream_t stream,
                  const lk::ReduceJob& dB_reduce = lk::ReduceJob{}, void* v_pieces = nullptr) {
  const int64_t M = dy.size(0), K = lora_A.size(1), kx = sm90_kx(r);
  lk::PackJob jv{g_work, lk::DType::kFloat32, M, r, vx, M, kx, (float)scaling};
  if (partials > 1) {
    jv.partials = partials;
    jv.partial_stride = M * r;
    jv.sum_out = g_sum;
  }
  jv.pieces_out = v_pieces;
  jv.pieces_ld = 3 * r;
  lk::PackJob ja{lora_A.data_ptr(), to_dtype(lora_A, "lora_A"), r, K, ax, kx, K, 1.f};
  check_cuda(lk::launch_pack_rank_operands(jv, ja, to_dtype(dy, "dy"), stream, dB_reduce), "pack(g, A) launch");
}

// dx (M, K) = dy W + (s g) A on the sm_90 path, from the operands that sm90_dx_pack packed; with dropout
// (keep = the mask's keep bits) dx = dy W + keep ⊙ (s / (1 - p) g) A, the pack having scaled g by s / (1 - p).
// beside_blocks > 0: the GEMM's grid leaves that many SMs to the dA pass launched right after it (dA beside dx).
lk::LoraGemmArgs sm90_dx_args(const Tensor& dy, const Tensor& weight, int r, const void* vx, const void* ax,
                              const uint8_t* keep, void* dx, int beside_blocks = 0) {
  lk::LoraGemmArgs a;
  a.M = dy.size(0); a.N = weight.size(1); a.K = dy.size(1); a.Kx = sm90_kx(r); a.Kx_used = sm90_kx_used(r);
  a.a = dy.data_ptr(); a.b = weight.data_ptr(); a.ax = vx; a.bx = ax;
  a.keep = keep;
  a.d = dx;
  a.dtype = gemm_dtype(dy);
  a.layout_b = lk::GemmLayoutB::kKN;
  if (beside_blocks > 0) {
    a.sms = lk::detail::num_sms() - beside_blocks;
    a.early_dependents = true;
  }
  return a;
}

// dA beside the dx GEMM (lk::lora_dA_sm90_beside): -1 the cost model's choice (the default), 0 never, n > 0 that many
// SMs for dA (A/B timing). LORA_KERNELS_DA_BESIDE sets it at start-up, set_dA_beside in a process.
std::atomic<int>& dA_beside_mode() {
  static std::atomic<int> mode{[] {
    const char* v = std::getenv("LORA_KERNELS_DA_BESIDE");
    if (v == nullptr || *v == '\0') return -1;
    const int n = std::atoi(v);
    return n > 0 ? n : std::string(v) == "0" ? 0 : -1;
  }()};
  return mode;
}

// Where dA runs beside the dx GEMM (dy: what the GEMM multiplies by W; x is (M, K)), the SMs it takes and its plan.
lk::DaBeside dA_beside(const Tensor& dy, const Tensor& weight, int64_t M, int64_t K, int r, int pieces, float p) {
  const int mode = dA_beside_mode().load();
  if (mode == 0) return lk::DaBeside{0, lk::SplitPlan{0, 0, 0, 0}};
  return lk::lora_dA_sm90_beside(sm90_dx_args(dy, weight, r, nullptr, nullptr, nullptr, nullptr), M, K, r, pieces,
                                 p > 0.0f, mode);
}

// A stand-in for a backward's dy (M, N) where only its shape, dtype and an aligned pointer are read (the path and
// plan queries below).
Tensor dy_stand_in(const Tensor& x, int64_t N) { return x.new_empty({1}).expand({x.size(0), N}); }

// dA inside the dx GEMM (gemm_sm90.h, da_x): -1 the default and 0 never; 1 wherever it can run (r <= 64, dropout too:
// the GEMM masks x by the keep bits). Opt-in: on an H100 (session 60, M = 8192, r = 16, bf16 adapters) the backward
// took 19 us longer than the dA pass beside the GEMM at 4096->1024 and tied at 4096->4096 (the GEMM 4.8% slower, the
// reduce of ceil(M / 128) partials). LORA_KERNELS_DA_IN_GEMM=1 sets it at start-up, set_dA_in_gemm in a process.
std::atomic<int>& dA_in_gemm_mode() {
  static std::atomic<int> mode{lk::env_mode("LORA_KERNELS_DA_IN_GEMM")};
  return mode;
}

// Whether a backward's dA joins its dx GEMM (dy: what the GEMM multiplies by W; x (M, K); with dropout the GEMM is the
// masked one, whose keep bits mask x too): with adapters in x's dtype (the GEMM multiplies x by s·g rounded to that
// dtype, as the dx term does: the same-precision reference rounds it so too; fp32 adapters keep the dA pass, which
// reads g in fp32), where the sm_90 GEMM takes it.
bool dA_in_dx_gemm(const Tensor& dy, const Tensor& x, const Tensor& weight, lk::DType x_dt, lk::DType a_dt, int r,
                   float p) {
  const int mode = dA_in_gemm_mode().load();
  if (mode <= 0 || a_dt != x_dt || r < 1 || r > 64 || x.size(0) == 0) return false;
  // the workspace pieces come from the caching allocator: aligned like x's storage, whose own pointer is checked
  const auto* keep = p > 0.0f ? static_cast<const uint8_t*>(x.data_ptr()) : nullptr;
  lk::LoraGemmArgs a = sm90_dx_args(dy, weight, r, x.data_ptr(), x.data_ptr(), keep, x.data_ptr());
  a.da_x = x.data_ptr();
  a.da_partial = static_cast<float*>(x.data_ptr());
  a.da_r = r;
  return lk::lora_gemm_sm90_unsupported(a, x.get_device()) == nullptr;
}

// dA as a GEMM of its own (gemm_sm90.h, DaGemmArgs): -1 (the default) or 1 wherever it can run, up to 192 columns of
// s·g (r·pieces); measured faster than the dA pass with one 64-wide tile (session 61) and with three (fp32 adapters
// at r = 64, session 62); 0 never (the dA pass). LORA_KERNELS_DA_GEMM=0 or 1 sets it at start-up, set_dA_gemm in a
// process.
std::atomic<int>& dA_gemm_mode() {
  static std::atomic<int> mode{lk::env_mode("LORA_KERNELS_DA_GEMM")};
  return mode;
}

// The pieces of s·g that the dA GEMM multiplies: 1 with adapters in x's dtype (the pack's vx, s·g rounded to that
// dtype, as the dx term multiplies it: the same-precision reference rounds it so too), 3 with fp32 adapters on bf16 x
// (the pack's bf16x3 pieces of the fp32 s·g: exact), else 0 (the dA pass).
int dA_gemm_pieces(lk::DType x_dt, lk::DType a_dt) {
  return a_dt == x_dt ? 1 : a_dt == lk::DType::kFloat32 && x_dt == lk::DType::kBFloat16 ? 3 : 0;
}

// The dA GEMM's arguments for x (M, K): v is the pack's vx (M, sm90_kx(r)) with one piece, its bf16x3 pieces (M, 3r)
// with three; the partials (splits, pieces, r, K).
lk::DaGemmArgs dA_gemm_args(const Tensor& x, int r, int pieces, int64_t splits, const void* v, float* partial) {
  lk::DaGemmArgs d;
  d.M = x.size(0); d.K = x.size(1); d.r = r; d.pieces = pieces; d.splits = splits;
  d.ldv = pieces == 1 ? sm90_kx(r) : 3 * r;
  d.x = x.data_ptr(); d.v = v; d.partial = partial;
  d.dtype = gemm_dtype(x);
  return d;
}

// The waves of tiles the dA GEMM's token ranges aim at: 1 (one wave of 128-column tiles); LORA_KERNELS_DA_GEMM_WAVES=n
// (read once, 1 to 16) splits the tokens into n times as many ranges, which the persistent kernel takes n to a block
// (shorter ranges, more partials for the reduce): A/B timing of the one wave's fill and tail (at K = 4096 the kernel
// read x at 2.2-2.3 TB/s against 2.8 at K = 14336, session 61).
int dA_gemm_waves() {
  static const int waves = lk::env_int_in("LORA_KERNELS_DA_GEMM_WAVES", 1, 1, 16);
  return waves;
}

// The token ranges of dA as a GEMM after the dx GEMM, over the pack's s·g (dA_gemm_pieces); 0 where the dA pass runs
// instead. At p = 0, where the sm_90 dx GEMM runs (its pack makes s·g) and dA neither joins it nor runs beside it.
int64_t dA_gemm_splits(const Tensor& x, lk::DType x_dt, lk::DType a_dt, int r, float p) {
  const int pieces = dA_gemm_pieces(x_dt, a_dt);
  if (dA_gemm_mode().load() == 0 || p > 0.0f || pieces == 0 || x.size(0) == 0) return 0;
  const int64_t splits = lk::lora_dA_gemm_sm90_splits(x.size(0), x.size(1), r * pieces,
                                                               lk::detail::num_sms() * dA_gemm_waves());
  if (splits < 1) return 0;
  // the workspace pieces come from the caching allocator: aligned like x's storage, whose own pointer is checked
  const lk::DaGemmArgs d = dA_gemm_args(x, r, pieces, splits, x.data_ptr(), static_cast<float*>(x.data_ptr()));
  return lk::lora_dA_gemm_sm90_unsupported(d, x.get_device()) == nullptr ? splits : 0;
}

// Where a backward's dA runs, for dx's frozen product dyw W on the sm_90 GEMM or not (dx_sm90), with the keep bits
// made or not (bits): inside the dx GEMM (dA_in_dx_gemm); else beside it, on the SMs its grid leaves free, where the
// cost model finds that faster than after it (dA_beside; the pass runs on sm_90 then: sm90_ok); else as a GEMM of its
// own after it (splits > 0, dA_gemm_splits); else the dA pass (its sm_90 kernel where sm90_ok). The backward and the
// path queries below decide it here.
struct DaRoute {
  bool in_gemm = false, sm90_ok = false;
  lk::DaBeside beside{0, lk::SplitPlan{0, 0, 0, 0}};
  int64_t splits = 0;
};
DaRoute dA_route(const Tensor& dyw, const Tensor& x, const Tensor& weight, lk::DType x_dt, lk::DType a_dt, int r,
                 float p, bool bits, bool dx_sm90) {
  DaRoute d;
  d.in_gemm = dx_sm90 && dA_in_dx_gemm(dyw, x, weight, x_dt, a_dt, r, p);
  if (d.in_gemm) return d;
  d.sm90_ok = dA_on_sm90(x, x_dt, a_dt, r, p, bits);
  if (d.sm90_ok && dx_sm90)
    d.beside = dA_beside(dyw, weight, x.size(0), x.size(1), r, lk::adapter_pieces(x_dt, a_dt), p);
  if (dx_sm90 && d.beside.blocks == 0) d.splits = dA_gemm_splits(x, x_dt, a_dt, r, p);
  return d;
}

// The shrink u = s·dropout(x) Aᵀ (M, r) as the kernels write it: plan.col_groups split-K parts (summed by a reduce
// or the sm_90 pack) or, with one group, u itself. With dropout, where it runs, the kernel that makes the mask
// itself in one pass over x (shrink_drop.cu: no keep bits). Else on Hopper the wgmma streaming kernel
// (shrink_sm90.cu: lora_A's pieces staged in a scratch piece of scratch_bytes(), dropout from the keep bits), else
// mma.sync / FFMA (shrink.cu, which regenerates the mask itself where there are no keep bits).
struct ShrinkPass {
  lk::DType x_dt, a_dt;
  int64_t M, K;
  int r, pieces;
  bool drop;  // shrink_drop.cu: the mask made in the pass, so the forward makes no keep bits
  bool sm90;
  lk::SplitPlan plan;

  ShrinkPass(const Tensor& x, const Tensor& lora_A, float p)
      : x_dt(to_dtype(x, "x")), a_dt(to_dtype(lora_A, "lora_A")), M(x.size(0)), K(x.size(1)),
        r((int)lora_A.size(0)), pieces(lk::adapter_pieces(x_dt, a_dt)),
        drop(K > 0 && lk::lora_shrink_drop_unsupported(x.data_ptr(), x_dt, lora_A.data_ptr(), a_dt, M, K, r, p) ==
                          nullptr),
        sm90(!drop && K > 0 && lk::lora_shrink_sm90_unsupported(x.data_ptr(), x_dt, a_dt, M, K, r, p) == nullptr),
        plan(drop   ? lk::lora_shrink_drop_plan(M, K, r, lk::lora_shrink_drop_resident_blocks(x_dt, a_dt, r))
             : sm90 ? lk::lora_shrink_sm90_plan(M, K, r, pieces)
                    : lk::lora_shrink_plan(M, K, r, lk::lora_shrink_resident_blocks(x_dt, a_dt, r))) {}

  int64_t scratch_bytes() const {
    return drop ? (int64_t)lk::lora_shrink_drop_scratch_bytes(x_dt, a_dt, r, K)
           : sm90 ? (int64_t)lk::lora_shrink_sm90_scratch_bytes(K, r, pieces)
                  : 0;
  }

  // Whether the forward makes keep bits for this pass to read.
  bool needs_bits(float p) const { return p > 0.0f && K > 0 && !drop && lk::dropout_bits_used(x_dt, a_dt); }

  void launch(const Tensor& x, const Tensor& lora_A, float* u_work, double scaling, float p, int64_t seed,
              const int64_t* seed_ptr, int64_t offset, const uint8_t* keep8, void* scratch,
              cudaStream_t stream) const {
    if (drop) {
      check_cuda(lk::launch_lora_shrink_drop(x.data_ptr(), x_dt, lora_A.data_ptr(), a_dt, u_work, M, K, r, plan,
                                             (float)scaling, p, (uint64_t)seed, seed_ptr, (uint64_t)offset,
                                             scratch, stream),
                 "lora_shrink (dropout) launch");
    } else if (sm90) {
      check_cuda(lk::launch_lora_shrink_sm90(x.data_ptr(), x_dt, lora_A.data_ptr(), a_dt, u_work, M, K, r, plan,
                                             (float)scaling, p, keep8, scratch, stream),
                 "lora_shrink (sm90) launch");
    } else {
      check_cuda(lk::launch_lora_shrink(x.data_ptr(), x_dt, lora_A.data_ptr(), a_dt, u_work, M, K, r, plan,
                                        (float)scaling, p, (uint64_t)seed, seed_ptr, (uint64_t)offset, keep8, stream),
                 "lora_shrink launch");
    }
  }
};

// The forward. keep_u: u comes back as the second output (saved for backward); without it u is a temporary and
// the second output is undefined (the forward alone, lora_linear below autograd). col_scale_t (N,) fp32, or null:
// y = col_scale ⊙ (x Wᵀ + s·u Bᵀ) + bias (DoRA's column scale; forward_scaled below), in the fused forward's
// epilogue, else by one in-place pass over y after the path's kernels (launch_lora_col_scale), the bias then added
// there and not before.
std::tuple<Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& lora_A, const Tensor& lora_B, double scaling, double p,
                                        int64_t seed, int64_t offset, const std::optional<Tensor>& seed_t,
                                        bool keep_u, const Tensor* col_scale_t = nullptr) {
  check_common(x, weight, lora_A, lora_B, p, seed);
  const int64_t* seed_ptr = device_seed(seed_t, x, p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int r = (int)lora_A.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_tensor(*bias, "bias", x, 1);
    LK_CHECK(bias->scalar_type() == x.scalar_type(), "lora_kernels_cuda: bias must have x's dtype (",
                x.scalar_type(), "), got ", bias->scalar_type());
    LK_CHECK(bias->size(0) == N, "lora_kernels_cuda: bias must be (N=", N, ",), got ", shape_of(*bias));
  }
  // col_scale_t, or its copy where it is not 16-byte aligned (the fused epilogue reads 16-byte vectors)
  Tensor col_scale_held;
  if (col_scale_t != nullptr) {
    check_tensor(*col_scale_t, "col_scale", x, 1);
    LK_CHECK(col_scale_t->scalar_type() == at::kFloat, "lora_kernels_cuda: col_scale must be float32, got ",
                col_scale_t->scalar_type());
    LK_CHECK(col_scale_t->size(0) == N, "lora_kernels_cuda: col_scale must be (N=", N, ",), got ",
                shape_of(*col_scale_t));
    const bool aligned = reinterpret_cast<uintptr_t>(col_scale_t->data_ptr()) % 16 == 0;
    col_scale_held = aligned ? *col_scale_t : col_scale_t->clone();
  }
  const float* const col_scale = col_scale_t != nullptr ? col_scale_held.data_ptr<float>() : nullptr;
  const Tensor* bias_t = has_bias ? &*bias : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const float pf = (float)p;
  const lk::DType x_dt = to_dtype(x, "x"), a_dt = to_dtype(lora_A, "lora_A"), b_dt = to_dtype(lora_B, "lora_B");
  // With a column scale, the paths other than the fused one write y without the bias; this pass scales it and adds
  // the bias.
  const void* const bias_ptr = has_bias ? bias->data_ptr() : nullptr;
  auto scale_columns = [&](Tensor& y) {
    if (col_scale != nullptr)
      check_cuda(lk::launch_lora_col_scale(y.data_ptr(), x_dt, col_scale, bias_ptr, M, N, stream),
                 "column scale launch");
  };
  const Tensor* const path_bias = col_scale != nullptr ? nullptr : bias_t;
  // u: the output (keep_u), else undefined and the kernels write a workspace piece where they need one.
  const Tensor u = keep_u ? at::empty({M, r}, x.options().dtype(at::kFloat)) : Tensor();
  Workspace ws;

  if (small_m_unsupported(x, weight, bias_t, lora_A, lora_B, p) == nullptr) {  // M <= 64: one launch
    const int64_t u_piece = keep_u ? -1 : ws.reserve_floats(M * r);
    ws.allocate(x.options());
    Tensor y = at::empty({M, N}, x.options());
    check_cuda(lk::launch_lora_small_m_forward(x.data_ptr(), x_dt, weight.data_ptr(),
                                               path_bias ? bias_ptr : nullptr, lora_A.data_ptr(), a_dt,
                                               lora_B.data_ptr(), b_dt, y.data_ptr(),
                                               keep_u ? u.data_ptr<float>() : ws.ptr<float>(u_piece), M, N, K, r,
                                               (float)scaling, pf, (uint64_t)seed, seed_ptr, (uint64_t)offset, stream),
               "small-M forward launch");
    scale_columns(y);
    return {y, u};
  }
  bool lead = false;
  if (fused_forward_unsupported(x, weight, bias_t, lora_A, lora_B, p, &lead) == nullptr) {  // one GEMM launch (+ prep)
    lk::FusedFwdArgs a = fused_args(x, weight, bias_t, lora_A, lora_B, scaling, p, lead);
    a.col_scale = col_scale;  // with the bias, in the epilogue
    const int64_t u_piece = keep_u ? -1 : ws.reserve_floats(M * r);
    const int64_t f_piece =
        ws.reserve((int64_t)lk::lora_fused_fwd_sm90_workspace_bytes(M, N, K, r, x_dt, a_dt, a.lead));
    const int64_t bits_piece = pf > 0.0f ? ws.reserve(lk::dropout_keep_bits_bytes(M, K)) : -1;
    ws.allocate(x.options());
    Tensor y = at::empty({M, N}, x.options());
    a.y = y.data_ptr();
    a.u = keep_u ? u.data_ptr<float>() : ws.ptr<float>(u_piece);
    a.workspace = ws.ptr(f_piece);
    if (pf > 0.0f) {  // the mask as keep bits (a pass over the whole GPU), read by the u or lead tiles
      a.keep = ws.ptr<uint8_t>(bits_piece);
      make_keep_bits(ws.ptr<uint8_t>(bits_piece), M, K, pf, seed, seed_ptr, offset, stream);
    }
    check_cuda(lk::launch_lora_fused_fwd_sm90(a, stream), "fused sm90 forward launch");
    return {y, u};
  }
  // The shrink (ShrinkPass). With dropout, the mask as keep bits where the shrink's kernel reads them
  // (csrc/dropout_bits.cu says why), unless the shrink makes it itself (shrink_drop.cu).
  const ShrinkPass shrink(x, lora_A, pf);
  const lk::SplitPlan& shrink_plan = shrink.plan;
  const bool bits = shrink.needs_bits(pf);
  const bool partial = shrink_plan.col_groups > 1;  // u comes as split-K partials, summed by pack or reduce
  const bool sm90 = sm90_unsupported(x, weight, bias_t, M, N, K, lk::GemmLayoutB::kNK) == nullptr;
  // Without keep_u, u is a temporary, needed unless the sm_90 pack sums the partials (which it can do without
  // writing u).
  const int64_t u_piece = !keep_u && (!partial || !sm90) ? ws.reserve_floats(M * r) : -1;
  const int64_t u_work_piece = partial ? ws.reserve_floats(shrink_plan.col_groups * M * r) : -1;
  const int64_t kx = sm90_kx(r), elem = (int64_t)x.element_size();
  const int64_t ux_piece = sm90 ? ws.reserve(M * kx * elem) : -1;
  const int64_t bx_piece = sm90 ? ws.reserve(N * kx * elem) : -1;
  const int64_t bits_piece = bits ? ws.reserve(lk::dropout_keep_bits_bytes(M, K)) : -1;
  const int64_t shrink_scratch_piece = ws.reserve(shrink.scratch_bytes());  // -1 where it needs none
  ws.allocate(x.options());
  if (bits) make_keep_bits(ws.ptr<uint8_t>(bits_piece), M, K, pf, seed, seed_ptr, offset, stream);
  float* const u_out = keep_u ? u.data_ptr<float>() : ws.ptr<float>(u_piece);  // null where not needed
  float* const u_work = partial ? ws.ptr<float>(u_work_piece) : u_out;
  shrink.launch(x, lora_A, u_work, scaling, pf, seed, seed_ptr, offset, ws.ptr<uint8_t>(bits_piece),
                ws.ptr(shrink_scratch_piece), stream);
  Tensor y = at::empty({M, N}, x.options());
  if (sm90) {
    sm90_forward(x, weight, path_bias, u_work, shrink_plan.col_groups, u_out, r, lora_B, ws.ptr(ux_piece),
                 ws.ptr(bx_piece), y, stream);
    scale_columns(y);
    return {y, u};
  }
  if (partial) {
    check_cuda(lk::launch_reduce_partials(u_work, shrink_plan.col_groups, M * r, u_out, lk::DType::kFloat32, stream),
               "reduce(u) launch");
  }
  // y = u B^T + bias written once, then the frozen GEMM by cuBLAS (through ATen) accumulates into it (beta = 1).
  check_cuda(lk::launch_lora_expand(y.data_ptr(), x_dt, u_out, lora_B.data_ptr(), b_dt,
                                    path_bias ? bias_ptr : nullptr, M, N, r, stream),
             "lora_expand launch");
  if (K > 0) y.addmm_(x, weight.t());
  scale_columns(y);
  return {y, u};
}

std::tuple<Tensor, Tensor> lora_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& lora_A, const Tensor& lora_B, double scaling, double p,
                                        int64_t seed, int64_t offset, const std::optional<Tensor>& seed_t) {
  return forward_impl(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t, /*keep_u=*/true);
}

// The forward with a per-column scale (DoRA): y = col_scale ⊙ (x Wᵀ + s·u Bᵀ) + bias, u as lora_forward's.
std::tuple<Tensor, Tensor> lora_forward_scaled(const Tensor& x, const Tensor& weight,
                                               const std::optional<Tensor>& bias, const Tensor& lora_A,
                                               const Tensor& lora_B, const Tensor& col_scale, double scaling, double p,
                                               int64_t seed, int64_t offset, const std::optional<Tensor>& seed_t) {
  return forward_impl(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t, /*keep_u=*/true,
                      &col_scale);
}

// nullptr when a backward with dy (M, N) can take the small-M Hopper dx kernel (csrc/small_m_sm90.cu), else why not.
const char* small_m_dx_unsupported(const Tensor& dy, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                                   float p) {
  return lk::lora_small_m_sm90_dx_unsupported(dy.data_ptr(), weight.data_ptr(), lora_A.data_ptr(), lora_B.data_ptr(),
                                              dy.size(0), weight.size(0), weight.size(1), (int)lora_A.size(0),
                                              to_dtype(dy, "dy"), to_dtype(lora_A, "lora_A"),
                                              to_dtype(lora_B, "lora_B"), p);
}

// The backward at M <= 64 on Hopper, p = 0, in two launches where the passes of backward_impl take five or six of
// little work each: dx = dy W + (s·g) A with sg = s·g = s·dy B (fp32, a workspace piece) in one (the small-M kernel
// transposed), then dA = sgᵀ x and dB = dyᵀ u (small_m_grads.cu).
std::tuple<Tensor, Tensor, Tensor> small_m_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                    const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                    double scaling, bool need_dA, bool need_dB, cudaStream_t stream) {
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1);
  const int r = (int)lora_A.size(0);
  const lk::DType x_dt = to_dtype(x, "x"), a_dt = to_dtype(lora_A, "lora_A"), b_dt = to_dtype(lora_B, "lora_B");
  Workspace ws;
  const int64_t sg_piece = need_dA ? ws.reserve_floats(M * r) : -1;
  ws.allocate(x.options());
  Tensor dx = at::empty({M, K}, x.options()), dA, dB;
  if (need_dA) dA = at::empty({r, K}, lora_A.options());
  if (need_dB) dB = at::empty({N, r}, lora_B.options());
  check_cuda(lk::launch_lora_small_m_sm90_dx(dy.data_ptr(), x_dt, weight.data_ptr(), lora_A.data_ptr(), a_dt,
                                             lora_B.data_ptr(), b_dt, dx.data_ptr(), ws.ptr<float>(sg_piece), M, N, K,
                                             r, (float)scaling, stream),
             "small-M dx (sm90) launch");
  if (need_dA || need_dB)
    check_cuda(lk::launch_lora_small_m_grads(x.data_ptr(), dy.data_ptr(), x_dt, ws.ptr<float>(sg_piece),
                                             u.data_ptr<float>(), need_dA ? dA.data_ptr() : nullptr,
                                             need_dB ? dB.data_ptr() : nullptr, a_dt, M, N, K, r, stream),
               "small-M grads launch");
  return {dx, dA, dB};
}

// The backward's grads (dx, dA, dB); a grad not asked for is undefined (lora_backward gives the op's outputs).
// dx_from (M, N), or null for dy itself: the left operand of dx's frozen product, dx = dx_from W + s·(dy B) A (DoRA at
// p = 0: dx_from = g ⊙ dy with B = g ⊙ B, one call for every grad; backward_dx_from below). before_dx, if set, is
// called (to enqueue work) after the last launch that reads dy and before the first that reads dx_from: DoRA's
// node writes g ⊙ dy over a dy it owns there (csrc/dora_autograd.h), with dx_from = dy.
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                 double scaling, double p, int64_t seed, int64_t offset, bool need_dx,
                                                 bool need_dA, bool need_dB, const std::optional<Tensor>& seed_t,
                                                 const Tensor* dx_from = nullptr,
                                                 const std::function<void()>& before_dx = {}) {
  check_common(x, weight, lora_A, lora_B, p, seed);
  const int64_t* seed_ptr = device_seed(seed_t, x, p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int r = (int)lora_A.size(0);
  check_tensor(dy, "dy", x, 2);
  LK_CHECK(dy.scalar_type() == x.scalar_type(), "lora_kernels_cuda: dy must have x's dtype (", x.scalar_type(),
              "), got ", dy.scalar_type());
  LK_CHECK(dy.size(0) == M && dy.size(1) == N, "lora_kernels_cuda: dy must be (M=", M, ", N=", N, "), got ",
              shape_of(dy));
  check_tensor(u, "u", x, 2);
  LK_CHECK(u.scalar_type() == at::kFloat, "lora_kernels_cuda: u must be float32, got ", u.scalar_type());
  LK_CHECK(u.size(0) == M && u.size(1) == r, "lora_kernels_cuda: u must be (M=", M, ", r=", r, "), got ",
              shape_of(u));
  if (dx_from != nullptr) {
    check_tensor(*dx_from, "dx_from", x, 2);
    LK_CHECK(dx_from->scalar_type() == x.scalar_type(), "lora_kernels_cuda: dx_from must have x's dtype (",
                x.scalar_type(), "), got ", dx_from->scalar_type());
    LK_CHECK(dx_from->size(0) == M && dx_from->size(1) == N, "lora_kernels_cuda: dx_from must be (M=", M, ", N=",
                N, "), got ", shape_of(*dx_from));
  }
  const Tensor& dyw = dx_from != nullptr ? *dx_from : dy;  // dx's frozen product: dyw W
  Tensor dx, dA, dB;
  if (!need_dx && !need_dA && !need_dB) return {dx, dA, dB};

  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const float pf = (float)p;
  // M <= 64 on Hopper without dropout: two launches (small_m_backward)
  if (need_dx && dx_from == nullptr && !before_dx && small_m_dx_unsupported(dy, weight, lora_A, lora_B, pf) == nullptr)
    return small_m_backward(dy, x, weight, lora_A, lora_B, u, scaling, need_dA, need_dB, stream);
  const lk::DType x_dt = to_dtype(x, "x"), a_dt = to_dtype(lora_A, "lora_A"), b_dt = to_dtype(lora_B, "lora_B");
  const bool need_g = need_dx || need_dA;  // g = dy B (fp32); also computed when only dB is needed (one dy pass)

  // The passes, in stream order:
  //  1. the dy pass: g = dy B (fp32), as col_groups parts when g_partial, and the dB partials, one pass over dy;
  //  2. the reduces of g (where the sm_90 pack does not sum it) and of dB (where the sm_90 pack does not);
  //  3. dx. On sm_90 the rank-r term joins the GEMM's K axis: the pack of (s g, A) sums g's parts on the way (the
  //     fp32 sums of the reduce, in its order) and writes the reduced g where dA reads it, so that g needs no
  //     reduce launch; the same launch sums the dB partials (a launch fewer). With dropout the pack scales g by
  //     s / (1 - p) and the GEMM masks the term with the keep bits (made once, for dx and dA) before it
  //     accumulates dy W. Off sm_90 the term is written first (dropout
  //     applied) and cuBLAS accumulates dy W into it (beta = 1);
  //  4. dA and its reduce.
  // When the dy pass runs as one row split (small M), dB is that split's partial: in fp32 the pass writes it into
  // the output, and the reduce launch, which would only add it to zero, is left out (the same values bit for bit:
  // the partial's sums start at +0 and hold no -0 for that add to turn into +0). The same for dA and its pass, with
  // the same values, where the one bit that can differ is the sign of a zero: the tensor-core dA kernel scales its
  // sums at the end, so that a zero it writes can be -0 (a negative sum that underflows, a scale <= 0), which the
  // reduce's add made +0.
  // On Hopper the dy pass runs on wgmma (dy_pass_sm90.cu), with its adapters' pieces staged in a scratch piece
  const int pieces = lk::adapter_pieces(x_dt, b_dt);
  const bool dy_sm90 = M > 0 && N > 0 && lk::lora_dy_pass_sm90_unsupported(dy.data_ptr(), x_dt, b_dt, M, N, r) == nullptr;
  const lk::SplitPlan dy_plan =
      dy_sm90 ? lk::lora_dy_pass_sm90_plan(M, N, r, pieces) : lk::lora_dy_pass_plan(M, N, r, pieces);
  const bool g_partial = dy_plan.col_groups > 1;
  // with dropout, the mask as keep bits for dx and dA where their kernels read them, made once (dropout_bits.cu)
  const bool bits = pf > 0.0f && K > 0 && M > 0 && (need_dx || need_dA) && lk::dropout_bits_used(x_dt, a_dt);
  const bool dx_sm90 = need_dx && N > 0 && dx_sm90_unsupported(dyw, weight, pf, bits) == nullptr;
  // dA inside the dx GEMM where it can (dA_in_dx_gemm): its partials, one per 128-row block, summed by a reduce;
  // else its own pass over x. On Hopper that pass runs on the same wgmma streaming kernel as the dy pass
  // (dA_sm90.cu), g's pieces staged by the kernel itself or, where they are wide, in a scratch piece; with dropout it
  // masks x by the keep bits
  // (dA_route: inside the dx GEMM, beside it, as a GEMM of its own after it, or the pass)
  const DaRoute route = need_dA ? dA_route(dyw, x, weight, x_dt, a_dt, r, pf, bits, dx_sm90) : DaRoute{};
  const bool dA_in_gemm = route.in_gemm;
  const int a_pieces = lk::adapter_pieces(x_dt, a_dt);
  const lk::DaBeside& beside = route.beside;
  const int64_t dA_splits = route.splits;
  const bool dA_gemm = dA_splits > 0;
  const bool dA_pass = need_dA && !dA_in_gemm && !dA_gemm;
  const bool dA_sm90 = dA_pass && route.sm90_ok;
  const bool g_in_pack = dx_sm90 && g_partial;  // the pack sums g's parts
  // The reduced g as a buffer of its own: read by the dA pass, or by the dx kernel off the sm_90 path.
  const bool g_reduced = g_partial && (dA_pass || (need_dx && !dx_sm90));
  const lk::SplitPlan dA_plan =
      !dA_pass ? lk::SplitPlan{0, 1, 1, 1}
      : beside.blocks > 0 ? beside.plan
      : dA_sm90 ? lk::lora_dA_sm90_plan(M, K, r, a_pieces, pf > 0.0f)
                : lk::lora_dA_plan(M, K, r, lk::lora_dA_resident_blocks(x_dt, a_dt, r));
  const bool dB_direct = need_dB && dy_plan.row_splits == 1 && b_dt == lk::DType::kFloat32;
  const bool dA_direct = dA_pass && dA_plan.row_splits == 1 && a_dt == lk::DType::kFloat32;
  const bool dB_in_pack = need_dB && !dB_direct && dx_sm90;  // the pack launch sums the dB partials

  // The workspace: g lives from the dy pass (or its reduce, or the pack) to the last launch. The other pieces take
  // turns in one region, in the stream order above: g's parts up to the pack or reduce that sums them, the dB
  // partials up to their reduce and then (vx, ax) over them up to the dx GEMM (after them where the pack sums
  // them), then the dA partials over all of it; beside the dx GEMM or inside it, after (vx, ax), which the GEMM reads
  // meanwhile, and after them for the dA GEMM, which reads vx.
  Workspace ws;
  // g: the dy pass's output itself without parts (also when only dB is needed), else their sum where it is read
  const int64_t g_piece = g_reduced || !g_partial ? ws.reserve_floats(M * r) : -1;
  const int64_t bits_piece = bits ? ws.reserve(lk::dropout_keep_bits_bytes(M, K)) : -1;
  const int64_t phases = ws.mark();
  const int64_t g_parts_piece = g_partial ? ws.reserve_floats(dy_plan.col_groups * M * r) : -1;
  const int64_t after_g_parts = ws.mark();
  const int64_t dB_partial_piece =
      need_dB && !dB_direct ? ws.reserve_floats(std::max<int64_t>(dy_plan.row_splits, 1) * N * r) : -1;
  const int64_t after_dB_partials = ws.mark();
  const int64_t dy_scratch_piece =
      dy_sm90 ? ws.reserve((int64_t)lk::lora_dy_pass_sm90_scratch_bytes(M, N, r, pieces)) : -1;
  ws.rewind(dB_in_pack ? after_dB_partials : after_g_parts);
  const int64_t kx = sm90_kx(r), elem = (int64_t)dy.element_size();
  const int64_t vx_piece = dx_sm90 ? ws.reserve(M * kx * elem) : -1;
  const int64_t ax_piece = dx_sm90 ? ws.reserve(kx * K * elem) : -1;
  // the dA GEMM's s·g: vx itself, or its bf16x3 pieces (M, 3r) beside it with fp32 adapters
  const int dA_pieces = dA_gemm ? dA_gemm_pieces(x_dt, a_dt) : 0;
  const int64_t v3_piece = dA_pieces == 3 ? ws.reserve(M * 3 * r * elem) : -1;
  if (beside.blocks == 0 && !dA_in_gemm && !dA_gemm) ws.rewind(phases);
  // dA's partials: one per 128-row block of the dx GEMM's tiles, one per token range of the dA GEMM, else one per
  // row split of the pass
  const int64_t dA_partials = dA_in_gemm ? (M + 127) / 128
                              : dA_gemm  ? dA_splits * dA_pieces
                                         : std::max<int64_t>(dA_plan.row_splits, 1);
  const int64_t dA_partial_piece = need_dA && !dA_direct ? ws.reserve_floats(dA_partials * r * K) : -1;
  const int64_t dA_scratch_bytes =
      dA_sm90 ? (int64_t)lk::lora_dA_sm90_scratch_bytes(M, r, a_pieces) : 0;  // 0: one launch
  const int64_t dA_scratch_piece = dA_scratch_bytes > 0 ? ws.reserve(dA_scratch_bytes) : -1;
  ws.allocate(x.options());
  float* const g = ws.ptr<float>(g_piece);  // the reduced g (null where it is not needed)
  float* const g_work = g_partial ? ws.ptr<float>(g_parts_piece) : g;  // what the dy pass writes
  if (need_dB) dB = at::empty({N, r}, lora_B.options());
  if (need_dA) dA = at::empty({r, K}, lora_A.options());

  float* const dB_out = dB_direct ? dB.data_ptr<float>() : ws.ptr<float>(dB_partial_piece);
  if (dy_sm90) {
    check_cuda(lk::launch_lora_dy_pass_sm90(dy.data_ptr(), x_dt, lora_B.data_ptr(), b_dt, u.data_ptr<float>(), g_work,
                                            dB_out, M, N, r, dy_plan, ws.ptr(dy_scratch_piece), stream),
               "lora_dy_pass (sm90) launch");
  } else if (M > 0) {
    check_cuda(lk::launch_lora_dy_pass(dy.data_ptr(), x_dt, lora_B.data_ptr(), b_dt, u.data_ptr<float>(), g_work,
                                       dB_out, M, N, r, dy_plan, stream),
               "lora_dy_pass launch");
  }
  if (need_g && !g_partial && M > 0 && N == 0) {  // g = dy B = 0
    check_cuda(cudaMemsetAsync(g, 0, (size_t)(M * r) * sizeof(float), stream), "memset(g)");
  }
  if (g_reduced && !g_in_pack) {
    check_cuda(lk::launch_reduce_partials(g_work, dy_plan.col_groups, M * r, g, lk::DType::kFloat32, stream),
               "reduce(g) launch");
  }
  if (need_dB && !dB_direct && !dB_in_pack) {
    check_cuda(lk::launch_reduce_partials(ws.ptr<float>(dB_partial_piece), dy_plan.row_splits, N * r, dB.data_ptr(),
                                          b_dt, stream),
               "reduce(dB) launch");
  }
  if (bits) {
    make_keep_bits(ws.ptr<uint8_t>(bits_piece), M, K, pf, seed, seed_ptr, offset, stream);
  }
  if (before_dx) before_dx();  // dy is not read below (the pack takes its shape and dtype only)
  if (need_dx) {
    dx = at::empty({M, K}, x.options());
    if (dx_sm90) {
      const float dx_scale = lk::dropout_scale((float)scaling, pf);  // the dx kernel's factor
      lk::ReduceJob dB_reduce;
      if (dB_in_pack) dB_reduce = {ws.ptr<float>(dB_partial_piece), dy_plan.row_splits, N * r, dB.data_ptr(), b_dt};
      sm90_dx_pack(dy, g_work, dy_plan.col_groups, g_reduced ? g : nullptr, r, lora_A, dx_scale,
                   ws.ptr(vx_piece), ws.ptr(ax_piece), stream, dB_reduce, ws.ptr(v3_piece));
      if (beside.blocks > 0)  // dA's staging of g's pieces, where it has one, before the GEMM that dA runs beside
        check_cuda(lk::launch_lora_dA_sm90_prep(x_dt, a_dt, g, M, r, ws.ptr(dA_scratch_piece), stream),
                   "lora_dA (sm90) prep launch");
      lk::LoraGemmArgs a = sm90_dx_args(dyw, weight, r, ws.ptr(vx_piece), ws.ptr(ax_piece),
                                        ws.ptr<uint8_t>(bits_piece), dx.data_ptr(), beside.blocks);
      if (dA_in_gemm) {
        a.da_x = x.data_ptr();
        a.da_partial = ws.ptr<float>(dA_partial_piece);
        a.da_r = r;
      }
      check_cuda(lk::launch_lora_gemm_sm90(a, stream), "sm90 GEMM launch (dx)");
    } else {
      check_cuda(lk::launch_lora_dx(dx.data_ptr(), x_dt, g, lora_A.data_ptr(), a_dt, M, K, r, (float)scaling, pf,
                                    (uint64_t)seed, seed_ptr, (uint64_t)offset, ws.ptr<uint8_t>(bits_piece),
                                    stream),
                 "lora_dx launch");
      if (N > 0) dx.addmm_(dyw, weight);  // cuBLAS, beta = 1
    }
  }
  if (need_dA) {
    float* const dA_partial = dA_direct ? dA.data_ptr<float>() : ws.ptr<float>(dA_partial_piece);
    if (dA_in_gemm) {
      // the dx GEMM wrote the partials
    } else if (dA_gemm) {
      const void* v = ws.ptr(dA_pieces == 1 ? vx_piece : v3_piece);
      check_cuda(lk::launch_lora_dA_gemm_sm90(dA_gemm_args(x, r, dA_pieces, dA_splits, v, dA_partial), stream),
                 "sm90 dA GEMM launch");
    } else if (dA_sm90) {
      check_cuda(lk::launch_lora_dA_sm90(x.data_ptr(), x_dt, a_dt, g, dA_partial, M, K, r, dA_plan, (float)scaling,
                                         pf, ws.ptr<uint8_t>(bits_piece), ws.ptr(dA_scratch_piece), stream,
                                         beside.blocks > 0),
                 "lora_dA (sm90) launch");
    } else {
      check_cuda(lk::launch_lora_dA(x.data_ptr(), x_dt, a_dt, g, dA_partial, M, K, r, dA_plan, (float)scaling, pf,
                                    (uint64_t)seed, seed_ptr, (uint64_t)offset, ws.ptr<uint8_t>(bits_piece), stream),
                 "lora_dA launch");
    }
    if (!dA_direct) {
      check_cuda(lk::launch_reduce_partials(dA_partial, dA_partials, (int64_t)r * K, dA.data_ptr(), a_dt, stream),
                 "reduce(dA) launch");
    }
  }
  return {dx, dA, dB};
}

// The backward ops' outputs: grads not asked for come back as empty tensors, a distinct one per output (the outputs
// of an op must not alias each other); the Python side turns them into None.
std::tuple<Tensor, Tensor, Tensor> op_grads(std::tuple<Tensor, Tensor, Tensor> grads, const Tensor& x) {
  for (Tensor* t : {&std::get<0>(grads), &std::get<1>(grads), &std::get<2>(grads)}) {
    if (!t->defined()) *t = at::empty({0}, x.options());
  }
  return grads;
}

std::tuple<Tensor, Tensor, Tensor> lora_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                 double scaling, double p, int64_t seed, int64_t offset, bool need_dx,
                                                 bool need_dA, bool need_dB, const std::optional<Tensor>& seed_t) {
  return op_grads(backward_impl(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA,
                                need_dB, seed_t),
                  x);
}

// The backward with dx's frozen product taken from dx_from instead of dy (backward_impl): dx = dx_from W + s·(dy B) A
// (masked with dropout), dA and dB from dy as lora_backward's.
std::tuple<Tensor, Tensor, Tensor> lora_backward_dx_from(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                         const Tensor& dx_from, double scaling, double p, int64_t seed,
                                                         int64_t offset, bool need_dx, bool need_dA, bool need_dB,
                                                         const std::optional<Tensor>& seed_t) {
  return op_grads(backward_impl(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA,
                                need_dB, seed_t, &dx_from),
                  x);
}

// lora_linear: the op with its autograd node in C++ (csrc/lora_autograd.h), for eager mode with a frozen weight and
// bias (a trainable base goes to the Python autograd of lora_kernels/ops.py).
struct FusedKernels {
  static constexpr int64_t kMaxRank = lk::kMaxRank;
  static bool on_device(const Tensor& x) { return x.is_cuda(); }
  static bool capturing(const Tensor& x) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(x.device().index()), &status),
               "cudaStreamIsCapturing");
    return status != cudaStreamCaptureStatusNone;
  }
  static Tensor forward_only(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& lora_A, const Tensor& lora_B, double scaling, double p, int64_t seed,
                             int64_t offset, const std::optional<Tensor>& seed_t) {
    return std::get<0>(forward_impl(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t,
                                    /*keep_u=*/false));
  }
  static std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                            const Tensor& lora_A, const Tensor& lora_B, double scaling, double p,
                                            int64_t seed, int64_t offset, const std::optional<Tensor>& seed_t) {
    return lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t);
  }
  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                     const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                     double scaling, double p, int64_t seed, int64_t offset,
                                                     bool need_dx, bool need_dA, bool need_dB,
                                                     const std::optional<Tensor>& seed_t) {
    // The node reads the grads it asked for only: no empty tensors for the others.
    return backward_impl(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB,
                         seed_t);
  }
};

Tensor lora_linear_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& lora_A, const Tensor& lora_B, double scaling, double p, int64_t seed,
                            int64_t offset, const std::optional<Tensor>& seed_t) {
  return lk::LoraLinearFunction<FusedKernels>::apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset,
                                                     seed_t);
}

// Below autograd (inference mode): the forward alone.
Tensor lora_linear_forward_only(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                const Tensor& lora_A, const Tensor& lora_B, double scaling, double p, int64_t seed,
                                int64_t offset, const std::optional<Tensor>& seed_t) {
  return FusedKernels::forward_only(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t);
}

// lora_linear's eager call in C++ (csrc/lora_autograd.h, lora_linear_entry): y, or undefined (None) for a call that
// the Python path of lora_kernels/ops.py must run.
Tensor linear_entry(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                    const Tensor& lora_B, double scaling, double dropout_p, bool training) {
  return lk::lora_linear_entry<FusedKernels>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training);
}

// u = s·x Aᵀ (M, r) fp32 alone: the forward's shrink pass (the wgmma kernel on Hopper, else mma.sync / FFMA) and the
// reduce of its split-K parts; with sum_splits false, those parts as they are, (splits, M, r), for a consumer that
// sums them itself in split order (one launch fewer). DoRA's W Aᵀ is this pass over W with s = 1 (fp32 accuracy: a
// float32 A on a bf16 W runs as three exact bf16 pieces, as in the LoRA shrink), summed by its combine.
Tensor shrink_only(const Tensor& x, const Tensor& lora_A, double scaling, bool sum_splits = true) {
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const ShrinkPass shrink(x, lora_A, 0.f);
  const int64_t M = shrink.M, r = shrink.r, groups = shrink.plan.col_groups;
  const bool reduce = sum_splits && groups > 1;
  Tensor u = sum_splits ? at::empty({M, r}, x.options().dtype(at::kFloat))
                        : at::empty({groups, M, r}, x.options().dtype(at::kFloat));
  Workspace ws;
  const int64_t work_piece = reduce ? ws.reserve_floats(groups * M * r) : -1;
  const int64_t scratch_piece = shrink.sm90 ? ws.reserve(shrink.scratch_bytes()) : -1;
  ws.allocate(x.options());
  float* const work = reduce ? ws.ptr<float>(work_piece) : u.data_ptr<float>();
  shrink.launch(x, lora_A, work, scaling, 0.f, 0, nullptr, 0, nullptr, ws.ptr(scratch_piece), stream);
  if (reduce) {
    check_cuda(lk::launch_reduce_partials(work, groups, M * r, u.data_ptr(), lk::DType::kFloat32, stream),
               "reduce(u) launch");
  }
  return u;
}

// dora_linear with its autograd nodes in C++ (csrc/dora_autograd.h): the LoRA passes above plus csrc/dora_*.cu.
struct DoraKernels : FusedKernels {
  static std::tuple<Tensor, Tensor, Tensor, Tensor> dora_norm(const Tensor& weight, const Tensor& lora_A,
                                                              const Tensor& lora_B, const Tensor& magnitude,
                                                              double scaling, const Tensor& wsq) {
    const int64_t N = weight.size(0);
    const int r = (int)lora_A.size(0);
    // W Aᵀ: one pass over W, its K-split partials (splits, N, r) summed by the combine (one launch fewer)
    const Tensor wa = shrink_only(weight, lora_A, 1.0, /*sum_splits=*/false);
    const c10::cuda::CUDAGuard guard(weight.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index());
    const Tensor aat = at::empty({r, r}, weight.options().dtype(at::kFloat));  // A Aᵀ: one launch (dora_gram.cu)
    check_cuda(lk::launch_dora_gram(lora_A.data_ptr(), to_dtype(lora_A, "lora_A"), r, lora_A.size(1),
                                    aat.data_ptr<float>(), stream),
               "dora gram launch");
    Tensor norm = at::empty({N}, weight.options().dtype(at::kFloat)), g = at::empty_like(norm);
    Tensor bg = at::empty_like(lora_B), big = at::empty({N}, weight.options().dtype(at::kBool));
    LK_CHECK(weight.is_contiguous() && lora_A.is_contiguous(), "lora_kernels_cuda: dora_norm needs a contiguous "
             "weight and lora_A");
    check_cuda(lk::launch_dora_combine(wa.data_ptr<float>(), wa.size(0), wsq.data_ptr<float>(), lora_B.data_ptr(),
                                       to_dtype(lora_B, "lora_B"), aat.data_ptr<float>(), weight.data_ptr(),
                                       to_dtype(weight, "weight"), lora_A.data_ptr(), to_dtype(lora_A, "lora_A"),
                                       weight.size(1), magnitude.data_ptr(),
                                       to_dtype(magnitude, "magnitude"), (float)scaling, N, r, norm.data_ptr<float>(),
                                       g.data_ptr<float>(), bg.data_ptr(),
                                       reinterpret_cast<uint8_t*>(big.data_ptr<bool>()), stream),
               "dora combine launch");
    return {g, norm, bg, big};
  }
  static std::tuple<Tensor, Tensor> forward_scaled(const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                   const Tensor& lora_B, const Tensor& g, double scaling) {
    return lora_forward_scaled(x, weight, bias, lora_A, lora_B, g, scaling, 0.0, 0, 0, std::nullopt);
  }
  static std::tuple<Tensor, Tensor> dora_dy(const Tensor& dy, const Tensor& y, const Tensor& g, const Tensor& norm,
                                            const Tensor& big, const Tensor& bias, const Tensor& x,
                                            const Tensor& weight, const Tensor& u, const Tensor& lora_B, bool need_dyc,
                                            bool need_dm, at::ScalarType m_dtype, bool in_place) {
    const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
    const c10::cuda::CUDAGuard guard(dy.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index());
    const lk::DType dt = to_dtype(dy, "dy");
    const int64_t splits = lk::dora_colsum_splits(M, N);
    // in place: dy_c over dy, whose recomputed columns (g = 0, a bias and a small g, or a big adapter row) the dmag
    // launch reads and then scales (when it runs)
    const uint8_t* big_adapter = reinterpret_cast<const uint8_t*>(big.data_ptr<bool>());
    Tensor dyc = !need_dyc ? Tensor() : in_place ? dy : at::empty_like(dy);
    const bool defer_scale = in_place && need_dyc && need_dm;
    // the colsum's splits, then the rows of launch_dora_dmag's recompute
    Tensor part = need_dm
        ? at::empty({splits + lk::dora_dmag_recompute_splits(M, N), N}, dy.options().dtype(at::kFloat))
        : Tensor();
    check_cuda(lk::launch_dora_colsum(dy.data_ptr(), y.data_ptr(), dt, g.data_ptr<float>(), g.data_ptr<float>(),
                                      bias.defined() ? bias.data_ptr() : nullptr, big_adapter,
                                      need_dyc ? dyc.data_ptr() : nullptr, need_dm ? part.data_ptr<float>() : nullptr,
                                      M, N, splits, defer_scale, stream),
               "dora colsum launch");
    Tensor dm;
    if (need_dm) {
      dm = at::empty({N}, dy.options().dtype(m_dtype));
      check_cuda(lk::launch_dora_dmag(part.data_ptr<float>(), splits, g.data_ptr<float>(), norm.data_ptr<float>(),
                                      1.f, dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                      bias.defined() ? bias.data_ptr() : nullptr, big_adapter, dt,
                                      u.data_ptr<float>(), lora_B.data_ptr(), to_dtype(lora_B, "lora_B"), dm.data_ptr(),
                                      to_dtype(dm, "magnitude"), defer_scale ? dy.data_ptr() : nullptr, M, K, N,
                                      (int)lora_B.size(1), stream),
                 "dora dmag launch");
    }
    return {dyc, dm};
  }
  static std::tuple<Tensor, Tensor, Tensor> backward_dx_from(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                             const Tensor& lora_A, const Tensor& lora_B,
                                                             const Tensor& u, const Tensor& dx_from, double scaling,
                                                             bool need_dx, bool need_dA, bool need_dB,
                                                             const std::function<void()>& before_dx) {
    return backward_impl(dy, x, weight, lora_A, lora_B, u, scaling, 0.0, 0, 0, need_dx, need_dA, need_dB,
                         std::nullopt, dx_from.defined() ? &dx_from : nullptr, before_dx);
  }
  // p > 0 (csrc/dora_dropout.cu, dora_colsum.cu, dora_dmag.cu)
  static Tensor dora_masked(const Tensor& t, double p, int64_t seed, int64_t offset, double a_keep, double a_drop,
                            const Tensor& base, const Tensor& out) {
    const Tensor o = out.defined() ? out : at::empty_like(t);
    const c10::cuda::CUDAGuard guard(t.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index());
    check_cuda(lk::launch_dora_masked(t.data_ptr(), base.defined() ? base.data_ptr() : nullptr, o.data_ptr(),
                                      to_dtype(t, "x"), t.size(0), t.size(1), (float)p, (uint64_t)seed,
                                      (uint64_t)offset, (float)a_keep, (float)a_drop, stream),
               "dora masked launch");
    return o;
  }
  static std::tuple<Tensor, Tensor> dora_colsum_z(const Tensor& dy, const Tensor& z, const Tensor& c, bool need_dyc,
                                                  bool need_part, const Tensor& dyc_out) {
    const int64_t M = dy.size(0), N = dy.size(1);
    const c10::cuda::CUDAGuard guard(dy.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index());
    const int64_t splits = lk::dora_colsum_splits(M, N);
    Tensor dyc = !need_dyc ? Tensor() : dyc_out.defined() ? dyc_out : at::empty_like(dy);
    Tensor part = need_part ? at::empty({splits, N}, dy.options().dtype(at::kFloat)) : Tensor();
    check_cuda(lk::launch_dora_colsum(dy.data_ptr(), need_part ? z.data_ptr() : nullptr, to_dtype(dy, "dy"),
                                      c.data_ptr<float>(), nullptr, nullptr, nullptr,
                                      need_dyc ? dyc.data_ptr() : nullptr,
                                      need_part ? part.data_ptr<float>() : nullptr, M, N, splits, false, stream),
               "dora colsum launch");
    return {dyc, part};
  }
  static Tensor dora_dmag_sum(const Tensor& part, const Tensor& norm, double q, at::ScalarType m_dtype) {
    const int64_t N = part.size(1);
    const c10::cuda::CUDAGuard guard(part.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(part.device().index());
    Tensor dm = at::empty({N}, part.options().dtype(m_dtype));
    check_cuda(lk::launch_dora_dmag(part.data_ptr<float>(), part.size(0), nullptr, norm.data_ptr<float>(), (float)q,
                                    nullptr, nullptr, nullptr, nullptr, nullptr, lk::DType::kFloat32, nullptr, nullptr,
                                    lk::DType::kFloat32, dm.data_ptr(), to_dtype(dm, "magnitude"), nullptr, 0, 0, N, 0,
                                    stream),
               "dora dmag launch");
    return dm;
  }
};

Tensor dora_entry(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, const Tensor& magnitude, double dropout_p, bool training,
                  int64_t chunk_bytes) {
  return lk::dora_linear_entry<DoraKernels>(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_p, training,
                                            chunk_bytes);
}

void dora_clear_cache() { lk::clear_weight_sq_cache(); }

// 1 where the last DoRA backward wrote g ⊙ dy over the dy it owned, 0 where into a buffer, -1 where it made none.
int64_t dora_last_dyc_in_place() { return lk::dora_last_dyc_in_place().load(); }

// Which GEMM path a forward (and its p = 0 dx) with these inputs takes: "sm90" or "cublas: <why not sm90>".
std::string gemm_path(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  LK_CHECK(x.is_cuda() && x.dim() == 2 && weight.dim() == 2, "lora_kernels_cuda: gemm_path takes 2-D CUDA x, weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const char* why = sm90_unsupported(x, weight, has_bias ? &*bias : nullptr, x.size(0), weight.size(0), x.size(1),
                                     lk::GemmLayoutB::kNK);
  return why == nullptr ? std::string("sm90") : std::string("cublas: ") + why;
}

// Which GEMM path dx of a backward with these inputs takes: "small_m sm90" (M <= 64: the small-M Hopper kernel,
// dx and s·g in one launch; judged with x's pointer and dtype standing for dy's), "sm90", "sm90 + dA" (dA's product
// inside the same GEMM, dA_in_dx_gemm), "sm90 masked" (dropout: the keep bits mask the rank-r term inside the GEMM;
// "sm90 masked + dA" with dA) or "cublas: <why not sm90>" (the dx kernel writes the term, cuBLAS adds dy W).
std::string dx_path(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double p) {
  check_common(x, weight, lora_A, lora_B, p, 0);
  const c10::cuda::CUDAGuard guard(x.device());
  const float pf = (float)p;
  if (small_m_dx_unsupported(x, weight, lora_A, lora_B, pf) == nullptr) return "small_m sm90";
  const bool bits = pf > 0.0f && lk::dropout_bits_used(to_dtype(x, "x"), to_dtype(lora_A, "lora_A"));
  const char* why = dx_sm90_unsupported(x, weight, pf, bits);
  if (why != nullptr) return std::string("cublas: ") + why;
  const Tensor dy = dy_stand_in(x, weight.size(0));
  const lk::DType x_dt = to_dtype(x, "x"), a_dt = to_dtype(lora_A, "lora_A");
  const bool dA = dA_in_dx_gemm(dy, x, weight, x_dt, a_dt, (int)lora_A.size(0), pf);
  return std::string(pf > 0.0f ? "sm90 masked" : "sm90") + (dA ? " + dA" : "");
}

// Which kernel the dy pass of a backward with this dy (M, N) and lora_B (N, r) runs: "sm90" (wgmma,
// dy_pass_sm90.cu) or "mma.sync: <why not sm90>" (dy_pass.cu; the FFMA kernel where the tensor cores are not used).
std::string dy_path(const Tensor& dy, const Tensor& lora_B) {
  LK_CHECK(dy.is_cuda() && dy.dim() == 2 && lora_B.dim() == 2 && dy.size(1) == lora_B.size(0),
              "lora_kernels_cuda: dy_path takes a 2-D CUDA dy (M, N) and lora_B (N, r)");
  const c10::cuda::CUDAGuard guard(dy.device());
  const Tensor d = dy.contiguous();
  const char* why = lk::lora_dy_pass_sm90_unsupported(d.data_ptr(), to_dtype(d, "dy"), to_dtype(lora_B, "lora_B"),
                                                      d.size(0), d.size(1), (int)lora_B.size(1));
  return why == nullptr ? std::string("sm90") : std::string("mma.sync: ") + why;
}

// dA_route for a backward of these 2-D inputs (a stand-in for dy; dx and dA both asked for).
DaRoute dA_route_of(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double p) {
  check_common(x, weight, lora_A, lora_B, p, 0);
  const c10::cuda::CUDAGuard guard(x.device());
  const float pf = (float)p;
  const lk::DType x_dt = to_dtype(x, "x"), a_dt = to_dtype(lora_A, "lora_A");
  const bool bits = pf > 0.0f && lk::dropout_bits_used(x_dt, a_dt);
  const Tensor dy = dy_stand_in(x, weight.size(0));  // the checks and the model read its shape, dtype and pointer only
  const bool dx_sm90 = weight.size(0) > 0 && dx_sm90_unsupported(dy, weight, pf, bits) == nullptr;
  return dA_route(dy, x, weight, x_dt, a_dt, (int)lora_A.size(0), pf, bits, dx_sm90);
}

// The SMs dA takes beside the dx GEMM in a backward of these 2-D inputs; 0: it runs otherwise (inside the GEMM,
// after it, or off sm_90).
int64_t dA_beside_blocks(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                         double p) {
  return dA_route_of(x, weight, lora_A, lora_B, p).beside.blocks;
}

// The token ranges of the backward's dA GEMM for these 2-D inputs (dA_gemm_splits); 0 where dA runs otherwise (the
// pass, beside the dx GEMM or after it; inside the dx GEMM).
int64_t dA_gemm_splits_of(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                          double p) {
  return dA_route_of(x, weight, lora_A, lora_B, p).splits;
}

// Which kernel a pass over x (M, K) with lora_A (r, K) and p runs, from its sm_90 support check: "sm90" (wgmma) or
// "mma.sync: <why not sm90>" (the FFMA kernel where the tensor cores are not used).
using XPassCheck = const char* (*)(const void*, lk::DType, lk::DType, int64_t, int64_t, int, float);
std::string x_pass_path(const char* name, XPassCheck unsupported, const Tensor& x, const Tensor& lora_A, double p) {
  LK_CHECK(x.is_cuda() && x.dim() == 2 && lora_A.dim() == 2 && x.size(1) == lora_A.size(1), "lora_kernels_cuda: ",
              name, " takes a 2-D CUDA x (M, K) and lora_A (r, K)");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  const char* why = unsupported(xc.data_ptr(), to_dtype(xc, "x"), to_dtype(lora_A, "lora_A"), xc.size(0), xc.size(1),
                                (int)lora_A.size(0), (float)p);
  return why == nullptr ? std::string("sm90") : std::string("mma.sync: ") + why;
}
// The backward's dA pass (dA_sm90.cu, else dA.cu).
std::string dA_path(const Tensor& x, const Tensor& lora_A, double p) {
  return x_pass_path("dA_path", &lk::lora_dA_sm90_unsupported, x, lora_A, p);
}
// The forward's shrink when the forward is neither the small-M nor the fused one: "dropout" (shrink_drop.cu, the
// mask made in the pass), else x_pass_path's answer (shrink_sm90.cu, else shrink.cu).
std::string shrink_path(const Tensor& x, const Tensor& lora_A, double p) {
  const std::string other = x_pass_path("shrink_path", &lk::lora_shrink_sm90_unsupported, x, lora_A, p);
  const Tensor xc = x.contiguous(), ac = lora_A.contiguous();
  const c10::cuda::CUDAGuard guard(x.device());
  const bool drop = xc.size(1) > 0 &&
                    lk::lora_shrink_drop_unsupported(xc.data_ptr(), to_dtype(xc, "x"), ac.data_ptr(),
                                                     to_dtype(ac, "lora_A"), xc.size(0), xc.size(1),
                                                     (int)ac.size(0), (float)p) == nullptr;
  return drop ? std::string("dropout") : other;
}

// Sets the mode of the shrink with dropout that makes its own mask (shrink_drop.cu) for this process: -1 the default
// (where it measured faster), 0 off, 1 wherever it runs; returns the previous mode.
int64_t set_shrink_drop(int64_t mode) { return lk::set_shrink_drop(mode > 0 ? 1 : mode == 0 ? 0 : -1); }
// Sets how that shrink loads x for this process: -1 the default, 0 plain loads, 2 or 4 a cp.async ring of that many
// steps per warp; returns the previous setting.
int64_t set_shrink_drop_ring(int64_t stages) {
  return lk::set_shrink_drop_ring((int)std::min<int64_t>(std::max<int64_t>(stages, -1), 4));
}

// Which path a forward with these inputs takes: "small_m" (one launch, csrc/small_m.cu; "small_m sm90" where it runs
// the Hopper kernel of csrc/small_m_sm90.cu), "sm90 fused (small_m: <why
// not>)" or "sm90 fused lead (small_m: <why not>)" (csrc/fused_fwd_sm90.h; followed by " one launch" where no prep
// or keep-bits launch runs, " cluster-split u" where the split variant runs (dropout included) and
// " 128x256 cooperative" where the lead tiles or the split variant take the wide tiles), or gemm_path's answer
// followed by " (fused: <why not>) (small_m: <why not>)".
// Checks what lora_forward checks first (the call would fail otherwise).
std::string forward_path(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const Tensor& lora_A, const Tensor& lora_B, double p) {
  check_common(x, weight, lora_A, lora_B, p, 0);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const char* why = small_m_unsupported(x, weight, has_bias ? &*bias : nullptr, lora_A, lora_B, p);
  if (why == nullptr)
    return small_m_sm90_unsupported(x, weight, lora_A, lora_B, p) == nullptr ? "small_m sm90" : "small_m";
  bool lead = false;
  const char* why_fused = fused_forward_unsupported(x, weight, has_bias ? &*bias : nullptr, lora_A, lora_B, p, &lead);
  if (why_fused == nullptr) {
    const lk::FusedFwdArgs a = fused_args(x, weight, has_bias ? &*bias : nullptr, lora_A, lora_B, 1.0, p, lead);
    const bool split = lk::lora_fused_fwd_sm90_split(a);
    const bool wide = lead && (lk::lora_fused_fwd_sm90_wide(a) || split);
    return std::string(lead ? "sm90 fused lead" : "sm90 fused") + " (small_m: " + why + ")" +
           (lk::lora_fused_fwd_sm90_direct(a) && p == 0.0 ? " one launch" : "") +
           (split ? " cluster-split u" : "") + (wide ? " 128x256 cooperative" : "");
  }
  return gemm_path(x, weight, bias) + " (fused: " + why_fused + ") (small_m: " + why + ")";
}

// Switches the small-M forward on or off for this process; returns the previous setting.
bool set_small_m(bool enabled) { return small_m_switch().exchange(enabled); }

// Sets the fused forward's mode for this process (-1 the default: lead tiles where they fit, else u tiles, p = 0; 1 u
// tiles, dropout included; 2 lead tiles; 0 off); returns the previous one.
int64_t set_fused_forward(int64_t mode) {
  return fused_mode().exchange(mode == 2 ? 2 : mode > 0 ? 1 : mode == 0 ? 0 : -1);
}

// Sets the fused forward's split variant for this process (-1 the default: N <= 1024 where the wide lead tiles would
// run on the adapters as they are; 0 never; 1 wherever it can run); returns the previous mode.
int64_t set_fused_split(int64_t mode) { return lk::set_fused_split(mode > 0 ? 1 : mode == 0 ? 0 : -1); }

// Sets dA beside the dx GEMM for this process (-1 the cost model's choice, 0 never, n > 0 n SMs); returns the previous.
int64_t set_dA_beside(int64_t mode) { return dA_beside_mode().exchange(mode > 0 ? (int)mode : mode == 0 ? 0 : -1); }
// Sets dA inside the dx GEMM for this process (-1 the default, 0 never, 1 wherever it runs); returns the previous.
int64_t set_dA_in_gemm(int64_t mode) { return dA_in_gemm_mode().exchange(mode > 0 ? 1 : mode == 0 ? 0 : -1); }
int64_t set_dA_gemm(int64_t mode) { return dA_gemm_mode().exchange(mode > 0 ? 1 : mode == 0 ? 0 : -1); }

}  // namespace

// seed_t (optional, last): the device seed (see device_seed); without it the kernels use `seed`.
TORCH_LIBRARY(lora_kernels_cuda, m) {
  m.def("gemm_path(Tensor x, Tensor weight, Tensor? bias) -> str");
  m.def("dx_path(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float p) -> str");
  m.def("forward_path(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float p) -> str");
  m.def("dy_path(Tensor dy, Tensor lora_B) -> str");
  m.def("dA_path(Tensor x, Tensor lora_A, float p) -> str");
  m.def("shrink_path(Tensor x, Tensor lora_A, float p) -> str");
  m.def("set_shrink_drop(int mode) -> int", &set_shrink_drop);
  m.def("set_shrink_drop_ring(int stages) -> int", &set_shrink_drop_ring);
  m.def("set_small_m(bool enabled) -> bool", &set_small_m);  // no tensor arguments: a catch-all kernel
  m.def("set_small_m_sm90(bool enabled) -> bool", &lk::set_small_m_sm90);
  m.def("set_small_m_sm90_dx(bool enabled) -> bool", &lk::set_small_m_sm90_dx);
  m.def("set_fused_forward(int mode) -> int", &set_fused_forward);
  m.def("set_fused_split(int mode) -> int", &set_fused_split);
  m.def("set_dA_beside(int mode) -> int", &set_dA_beside);
  m.def("set_dA_in_gemm(int mode) -> int", &set_dA_in_gemm);
  m.def("set_dA_gemm(int mode) -> int", &set_dA_gemm);
  m.def("dA_gemm_splits(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float p) -> int");
  m.def("dA_beside_blocks(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float p) -> int");
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float p, "
      "int seed, int offset, Tensor? seed_t=None) -> (Tensor, Tensor)");
  m.def(
      "forward_scaled(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor col_scale, "
      "float scaling, float p, int seed, int offset, Tensor? seed_t=None) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, float scaling, "
      "float p, int seed, int offset, bool need_dx, bool need_dA, bool need_dB, Tensor? seed_t=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "backward_dx_from(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, Tensor dx_from, "
      "float scaling, float p, int seed, int offset, bool need_dx, bool need_dA, bool need_dB, Tensor? seed_t=None) "
      "-> (Tensor, Tensor, Tensor)");
  // a catch-all (CompositeImplicitAutograd) kernel: it runs above autograd, and the node it makes records the graph
  m.def(
      "linear_entry(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, bool training) -> Tensor",
      &linear_entry);
  // DoRA's eager call in C++ (csrc/dora_autograd.h), y or None; and the clearing of its ‖W_n‖² cache
  m.def(
      "dora_entry(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "Tensor magnitude, float dropout_p, bool training, int chunk_bytes=67108864) -> Tensor",
      &dora_entry);
  m.def("dora_clear_cache() -> ()", &dora_clear_cache);
  m.def("dora_last_dyc_in_place() -> int", &dora_last_dyc_in_place);
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float p, "
      "int seed, int offset, Tensor? seed_t=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("forward", &lora_forward);
  m.impl("forward_scaled", &lora_forward_scaled);
  m.impl("backward", &lora_backward);
  m.impl("backward_dx_from", &lora_backward_dx_from);
  m.impl("lora_linear", &lora_linear_forward_only);
  m.impl("gemm_path", &gemm_path);
  m.impl("dx_path", &dx_path);
  m.impl("forward_path", &forward_path);
  m.impl("dy_path", &dy_path);
  m.impl("dA_path", &dA_path);
  m.impl("dA_beside_blocks", &dA_beside_blocks);
  m.impl("dA_gemm_splits", &dA_gemm_splits_of);
  m.impl("shrink_path", &shrink_path);
}

TORCH_LIBRARY_IMPL(lora_kernels_cuda, Autograd, m) { m.impl("lora_linear", &lora_linear_autograd); }

// `import lora_kernels._C` loads this library (running the registrations above) and gets an empty module.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
