// DoRA's eager call in C++ at p = 0: its autograd node and entry, shared by the CUDA binding (binding.cpp, with the
// fused kernels and csrc/dora_*.cu) and the CPU test shim (tests/cpp/autograd_shim.cpp, with reference ATen math), as
// lora_autograd.h is for lora_linear.
//
//   g = magnitude / ‖W + s·B A‖_row (the norm detached),   y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b
//   saved for backward: x, W, A, B, Bg = g ⊙ B (N×r), u = s·x Aᵀ (M×r fp32), y (the output itself), g and the norm
//   (N fp32 each): lora_linear's plus y and O(N·r), nothing N×K.
//   backward: dy_c = g ⊙ dy and dmag = Σ_m dy ⊙ (y − b)/g / norm (z recomputed where g = 0), then one LoRA backward
//   with dx = dy_c W + s·(dy Bg) A, dA and dB·g; dmag needs no autograd through g = magnitude / norm.
//   Where the node owns dy (grad_is_ours), dy_c is written over dy between the LoRA backward's dy pass (which reads
//   dy) and its dx GEMM (which reads dy_c): the same launches and values, without DoRA's only M×N buffer.
// Same math and routing as lora_kernels/dora.py at p = 0 with SAVE_Y (its module docstring), which runs every call
// this entry declines (dropout, torch.compile, autocast, a trainable base, ...).
//
// Impl provides, besides what lora_linear_entry's Impl provides (kMaxRank, on_device, capturing):
//   static std::tuple<Tensor, Tensor, Tensor> dora_norm(W, A, B, magnitude, scaling, wsq)   -> (g, norm, Bg)
//   static std::tuple<Tensor, Tensor> forward_scaled(x, W, bias, A, B, g, scaling)           -> (y, u)
//   static std::tuple<Tensor, Tensor> dora_dy(dy, y, g, norm, bias, x, W, u, B, need_dyc, need_dm, m_dtype,
//                                             in_place)        -> (dy_c, dmag in m_dtype; each undefined unless
//                                                                   asked for; in_place: dy_c is dy, overwritten)
//   static std::tuple<Tensor, Tensor, Tensor> backward_dx_from(dy, x, W, A, Bg, u, dx_from, scaling, need_dx,
//                                                              need_dA, need_dB, before_dx)
//                                                               dx_from undefined: dx from dy (as the LoRA backward);
//                                                               before_dx (may be empty) runs after every read of dy
//                                                               and before dx_from is read
// Why C++: the Python path's host time (autograd.Function, the norm's three launches and a cache lookup, the
// backward's torch ops) decided DoRA's wall time below about 8192 × 4096 → 1024 on the H200 (nineteenth session).
#pragma once

#include "lora_autograd.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace lora_kernels {

// ‖W_n‖² of a frozen weight, cached per weight tensor: the entry is keyed on the TensorImpl (held weakly, so its
// address cannot be reused while the entry lives) and checked against its storage (held weakly: replacing W.data or
// the storage misses), data pointer, storage offset, shape, strides, dtype and version counter (every in-place op on
// W bumps it), as lora_kernels/dora.py's _weight_sq checks its own cache. clear_weight_sq_cache() empties it
// (dora.clear_weight_norm_cache calls it). The entry of a freed weight (its N floats) is dropped at the next fill of
// the cache, not at once as Python's weak dictionary drops its own; clear_weight_sq_cache() drops them all.
struct WeightSqEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  int64_t version;
  at::Tensor wsq;
};

inline std::mutex& weight_sq_mutex() {
  static std::mutex m;
  return m;
}
inline std::unordered_map<const c10::TensorImpl*, WeightSqEntry>& weight_sq_map() {
  static std::unordered_map<const c10::TensorImpl*, WeightSqEntry> m;
  return m;
}
inline void clear_weight_sq_cache() {
  std::lock_guard<std::mutex> lock(weight_sq_mutex());
  weight_sq_map().clear();
}

inline bool weight_sq_matches(const WeightSqEntry& e, const at::Tensor& w) {
  if (e.impl.expired() || e.storage.expired()) return false;
  const c10::Storage& st = w.storage();
  return e.storage._unsafe_get_target() == st.unsafeGetStorageImpl() && e.data == w.data_ptr() &&
         e.offset == w.storage_offset() && e.sizes == w.sizes().vec() && e.strides == w.strides().vec() &&
         e.dtype == w.scalar_type() && e.version == w._version();
}

// ‖W_n‖² (N,) fp32 by row chunks of at most 2^22 elements: no N×K fp32 temporary (dora._weight_sq_compute).
inline at::Tensor weight_sq_compute(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N}, w.options().dtype(at::kFloat));
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, K));
  for (int64_t i = 0; i < N; i += rows) {
    const int64_t n = std::min(rows, N - i);
    out.narrow(0, i, n).copy_(w.narrow(0, i, n).to(at::kFloat).square().sum(1));
  }
  return out;
}

inline at::Tensor weight_sq_cached(const at::Tensor& w) {
  const c10::TensorImpl* key = w.unsafeGetTensorImpl();
  {
    std::lock_guard<std::mutex> lock(weight_sq_mutex());
    auto it = weight_sq_map().find(key);
    if (it != weight_sq_map().end() && weight_sq_matches(it->second, w)) return it->second.wsq;
  }
  at::Tensor wsq;
  {
    at::NoGradGuard no_grad;
    wsq = weight_sq_compute(w);
  }
  std::lock_guard<std::mutex> lock(weight_sq_mutex());
  auto& map = weight_sq_map();
  for (auto it = map.begin(); it != map.end();) {  // entries of freed weights or storages
    it = (it->second.impl.expired() || it->second.storage.expired()) ? map.erase(it) : std::next(it);
  }
  map.insert_or_assign(key, WeightSqEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()),
                           w.storage().getWeakStorageImpl(),
                           w.data_ptr(),
                           w.storage_offset(),
                           w.sizes().vec(),
                           w.strides().vec(),
                           w.scalar_type(),
                           w._version(),
                           wsq});
  return wsq;
}

// Whether the node's backward may overwrite the incoming grad (DoRA's dy_c over dy). A non-contiguous grad is copied
// by the node itself. A contiguous one is ours when no one else can see it: the only references to its TensorImpl
// are the two of CppNode's call (its backward_inputs list and the backward's by-value copy, custom_function.h) and no
// other tensor shares its storage, but for the base of a view that only the view holds (a reshape's backward hands
// on a view of the next op's grad, whose view metadata keeps that grad alive). A caller's tensor (y.backward(dy),
// torch.autograd.grad(..., dy)), a Python object, a hook's capture or a grad shared with another node (e.g. by an
// add) all count as references: those keep dy. This is the engine's own test before it steals a grad into .grad
// (impl::is_tensor_stealable), with a Python object counted as a reference. Never under create_graph.
inline bool grad_is_ours(const at::Tensor& grad) {
  if (at::GradMode::is_enabled() || !grad.defined() || grad.is_inference()) return false;
  if (!grad.is_contiguous()) return true;  // the node's .contiguous() copy
  if (grad.use_count() > 2) return false;
  const int64_t storage_refs = (int64_t)grad.storage().use_count();
  if (!grad.is_view()) return storage_refs == 1;
  return grad._base().use_count() == 1 && storage_refs == 2;  // the view and its base, held by the view alone
}

// How the last DoRA backward produced dy_c: 1 over dy (in place), 0 in a buffer of its own, -1 not at all (no dx
// asked for). Process-wide (a CUDA backward runs on the engine's device thread); read by the tests through the
// dora_last_dyc_in_place op.
inline std::atomic<int>& dora_last_dyc_in_place() {
  static std::atomic<int> v{-1};
  return v;
}

// The DoRA node (p = 0, frozen weight and bias; magnitude may or may not require grad).
template <typename Impl>
class DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction<Impl>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& magnitude, double scaling, const at::Tensor& wsq) {
    auto [g, norm, bg] = Impl::dora_norm(weight, lora_A, lora_B, magnitude, scaling, wsq);
    auto [y, u] = Impl::forward_scaled(x, weight, bias, lora_A, lora_B, g, scaling);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, has_bias ? *bias : at::Tensor(), lora_A, lora_B, bg, u, y, g, norm});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["m_dtype"] = (int64_t)magnitude.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &lora_A = saved[3], &lora_B = saved[4];
    const at::Tensor &bg = saved[5], &u = saved[6], &y = saved[7], &g = saved[8], &norm = saved[9];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    // needs_input_grad counts tensor inputs: x, weight, [bias], lora_A, lora_B, magnitude, wsq. The weight and bias
    // are frozen (the entry takes no other call).
    const size_t a_edge = has_bias ? 3 : 2;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dA = ctx->needs_input_grad(a_edge), need_dB = ctx->needs_input_grad(a_edge + 1);
    const bool need_dm = ctx->needs_input_grad(a_edge + 2);
    // dy_c over dy where the node owns dy (grad_is_ours) and dx needs dy_c: made after the dy pass's read of dy
    const bool in_place = need_dx && grad_is_ours(grads[0]);
    const at::Tensor dy = grads[0].contiguous();
    grads.clear();  // dy is the only reference left in this frame
    variable_list out(8);  // one per forward argument
    const auto m_dtype = (at::ScalarType)ctx->saved_data["m_dtype"].toInt();
    at::Tensor dyc;
    auto dora_dy = [&] {
      auto [c, dm] = Impl::dora_dy(dy, y, g, norm, bias, x, weight, u, lora_B, need_dx, need_dm, m_dtype, in_place);
      dyc = c;
      if (need_dm) out[5] = dm;
    };
    if ((need_dx || need_dm) && !in_place) dora_dy();
    dora_last_dyc_in_place() = need_dx ? (int)in_place : -1;
    if (need_dx || need_dA || need_dB) {
      const std::function<void()> before_dx = in_place ? std::function<void()>(dora_dy) : std::function<void()>();
      auto [dx, dA, dB] = Impl::backward_dx_from(dy, x, weight, lora_A, bg, u, in_place ? dy : dyc, scaling, need_dx,
                                                 need_dA, need_dB, before_dx);
      if (need_dx) out[0] = dx;
      if (need_dA) out[3] = dA;
      if (need_dB) {  // the backward's dB is dyᵀ u for Bg = g ⊙ B: times g
        out[4] = dB.scalar_type() == at::kFloat ? dB.mul_(g.unsqueeze(1))
                                                : (dB.to(at::kFloat) * g.unsqueeze(1)).to(dB.scalar_type());
      }
    }
    if (at::GradMode::is_enabled()) {  // create_graph=True: first-order values, second order a clear error
      for (auto& t : out) {
        if (t.defined()) t = NotTwiceDifferentiable::apply(t, dy, x, weight, lora_A, lora_B);
      }
    }
    return out;
  }
};

// dora_linear's eager call at p = 0, whole in C++: lora_kernels/dora.py's dora_linear hands its arguments here first
// (the cuda backend, SAVE_Y on and SAVE_Z off, not under torch.compile), and this function either runs the call or
// returns an undefined tensor (None), after which the Python path runs it. It declines what every entry declines
// (entry_declines, lora_autograd.h) and, in addition, takes a call only where dropout is off (dropout_p = 0 or not
// training), magnitude is a plain (N,) tensor of float32 or x's dtype on x's device, the weight is contiguous (the
// Python norm takes its reference route otherwise) and no CUDA graph is being captured (the ‖W_n‖² cache would
// allocate inside it).
template <typename Impl>
at::Tensor dora_linear_entry(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                             const at::Tensor& magnitude, double dropout_p, bool training) {
  const at::Tensor none;
  if (entry_declines<Impl>(x, weight, bias_opt, lora_A, lora_B, scaling)) return none;
  if (!plain_tensor(magnitude) || magnitude.device() != x.device() || magnitude.dim() != 1 ||
      magnitude.size(0) != weight.size(0) || !contract_dtype(x.scalar_type(), magnitude.scalar_type()))
    return none;
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) return none;  // dora_linear refuses p = 1
  if (training && dropout_p > 0.0) return none;  // dropout: the Python path (two GEMMs over W, masking passes)
  if (!weight.is_contiguous() || Impl::capturing(x)) return none;
  const at::Tensor wsq = weight_sq_cached(weight);
  const at::Tensor x2 = as_rows(x, weight.size(1));
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), mag = magnitude.contiguous();
  const std::optional<at::Tensor> bias = contiguous_bias(bias_opt);
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || lora_A.requires_grad() ||
                                                   lora_B.requires_grad() || magnitude.requires_grad());
  at::Tensor y;
  if (grad) {
    y = DoraLinearFunction<Impl>::apply(x2, weight, bias, A, B, mag, scaling, wsq);
  } else {
    at::Tensor g = std::get<0>(Impl::dora_norm(weight, A, B, mag, scaling, wsq));
    y = std::get<0>(Impl::forward_scaled(x2, weight, bias, A, B, g, scaling));
  }
  return with_leading_dims(y, x);
}

}  // namespace lora_kernels
