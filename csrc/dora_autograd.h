// DoRA's eager call in C++: its autograd nodes and entry, shared by the CUDA binding (binding.cpp, with the fused
// kernels and csrc/dora_*.cu) and the CPU test shim (tests/cpp/autograd_shim.cpp, with reference ATen math), as
// lora_autograd.h is for lora_linear. Same math and routing as lora_kernels/dora.py (its module docstring), which
// runs every call this entry declines (torch.compile, autocast, a trainable base, CUDA graph capture, ...).
//
// p = 0 (DoraLinearFunction; dora.py with SAVE_Y):
//   g = magnitude / ‖W + s·B A‖_row (the norm detached),   y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b
//   saved for backward: x, W, A, B, Bg = g ⊙ B (N×r), u = s·x Aᵀ (M×r fp32), y (the output itself), g and the norm
//   (N fp32 each), big (N bool): lora_linear's plus y and O(N·r), nothing N×K.
//   backward: dy_c = g ⊙ dy and dmag = Σ_m dy ⊙ (y − b)/g / norm (z recomputed in the columns y cannot give:
//   common.cuh's dora_recompute_z of g, the bias and big), then one LoRA backward
//   with dx = dy_c W + s·(dy Bg) A, dA and dB·g; dmag needs no autograd through g = magnitude / norm.
//   Where the node owns dy (grad_is_ours), dy_c is written over dy between the LoRA backward's dy pass (which reads
//   dy) and its dx GEMM (which reads dy_c): the same launches and values, without DoRA's only M×N buffer.
// p > 0 (DoraDropoutFunction; dora.py's p > 0 path, by the same row chunks: its x_k, z and dy_c are transients of
//   one chunk): see that class.
//
// Impl provides, besides what lora_linear_entry's Impl provides (kMaxRank, on_device, capturing, forward,
// backward):
//   static std::tuple<Tensor, Tensor, Tensor, Tensor> dora_norm(W, A, B, magnitude, scaling, wsq)
//                                                            -> (g, norm, Bg, big: (N,) bool, ‖s·(B A)_n‖ > ‖W_n‖/2)
//   static std::tuple<Tensor, Tensor> forward_scaled(x, W, bias, A, B, g, scaling)           -> (y, u)
//   static std::tuple<Tensor, Tensor> dora_dy(dy, y, g, norm, big, bias, x, W, u, B, need_dyc, need_dm, m_dtype,
//                                             in_place)        -> (dy_c, dmag in m_dtype; each undefined unless
//                                                                   asked for; in_place: dy_c is dy, overwritten)
//   static std::tuple<Tensor, Tensor, Tensor> backward_dx_from(dy, x, W, A, Bg, u, dx_from, scaling, need_dx,
//                                                              need_dA, need_dB, before_dx)
//                                                               dx_from undefined: dx from dy (as the LoRA backward);
//                                                               before_dx (may be empty) runs after every read of dy
//                                                               and before dx_from is read
//   p > 0:
//   static Tensor dora_masked(t, p, seed, offset, a_keep, a_drop, base, out)
//                                                               base + (keep ? a_keep·t : a_drop·t) for the (M, K)
//                                                               t, the contract's mask at (seed, offset); base and out
//                                                               may be undefined (none / a new tensor), or t
//   static std::tuple<Tensor, Tensor> dora_colsum_z(dy, z, c, need_dyc, need_part, dyc_out)
//                                                            -> (dy_c = c ⊙ dy, into dyc_out when defined (may be z);
//                                                                column sums of dy ⊙ z as (splits, N) fp32 partials)
//   static Tensor dora_dmag_sum(part, norm, q, m_dtype)       -> Σ_rows part / q / norm, in m_dtype
// Why C++: the Python path's host time (autograd.Function, the norm's three launches and a cache lookup, the
// backward's torch ops) decided DoRA's wall time below about 8192 × 4096 → 1024 on the H200 (nineteenth session);
// with dropout, its row chunks and Triton passes took 2.3-2.6 ms of wall time for 0.9-1.0 ms of GPU time there
// (thirty-sixth session).
#pragma once

#include "lora_autograd.h"

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
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
// The entry keeps the stream that computed it and an event recorded there: a hit on another stream waits for that
// event and marks the tensor as used on that stream (the caching allocator must not reuse its memory under that
// stream's reads once a miss drops it), as the Python cache does.
struct WeightSqEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  int64_t version;
  at::Tensor wsq;
  std::optional<c10::Stream> stream;  // CUDA only: the stream that computed wsq, and an event recorded there
  std::shared_ptr<c10::Event> done;
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
  std::optional<c10::impl::VirtualGuardImpl> guard;
  std::optional<c10::Stream> current;
  if (w.is_cuda()) {
    guard.emplace(w.device().type());
    current = guard->getStream(w.device());
  }
  {
    std::lock_guard<std::mutex> lock(weight_sq_mutex());
    auto it = weight_sq_map().find(key);
    if (it != weight_sq_map().end() && weight_sq_matches(it->second, w)) {
      const WeightSqEntry& e = it->second;
      if (current && e.stream != current) {
        e.done->block(*current);
        guard->recordDataPtrOnStream(e.wsq.storage().data_ptr(), *current);
      }
      return e.wsq;
    }
  }
  at::Tensor wsq;
  {
    at::NoGradGuard no_grad;
    wsq = weight_sq_compute(w);
  }
  std::shared_ptr<c10::Event> done;
  if (current) {
    done = std::make_shared<c10::Event>(w.device().type());
    done->record(*current);
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
                           wsq,
                           current,
                           std::move(done)});
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

// dB · c per row (c (N,) fp32): the LoRA backward's dB for Bg = g ⊙ B, brought back to B's grad. In place for fp32
// dB, else through fp32 and rounded once to dB's dtype.
inline at::Tensor scale_rows(at::Tensor dB, const at::Tensor& c) {
  const at::Tensor c1 = c.unsqueeze(1);
  return dB.scalar_type() == at::kFloat ? dB.mul_(c1) : (dB.to(at::kFloat) * c1).to(dB.scalar_type());
}

// The DoRA node (p = 0, frozen weight and bias; magnitude may or may not require grad).
template <typename Impl>
class DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction<Impl>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& magnitude, double scaling, const at::Tensor& wsq) {
    auto [g, norm, bg, big] = Impl::dora_norm(weight, lora_A, lora_B, magnitude, scaling, wsq);
    auto [y, u] = Impl::forward_scaled(x, weight, bias, lora_A, lora_B, g, scaling);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, has_bias ? *bias : at::Tensor(), lora_A, lora_B, bg, u, y, g, norm, big});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["m_dtype"] = (int64_t)magnitude.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &lora_A = saved[3], &lora_B = saved[4];
    const at::Tensor &bg = saved[5], &u = saved[6], &y = saved[7], &g = saved[8], &norm = saved[9], &big = saved[10];
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
      auto [c, dm] = Impl::dora_dy(dy, y, g, norm, big, bias, x, weight, u, lora_B, need_dx, need_dm, m_dtype,
                                   in_place);
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
      if (need_dB) out[4] = scale_rows(dB, g);  // the backward's dB is dyᵀ u for Bg = g ⊙ B: times g
    }
    return first_order(std::move(out), dy, x, weight, lora_A, lora_B);
  }
};

// Row ranges of at most chunk_bytes of per-row temporaries each (lora_kernels/dora.py's _row_chunks_of, the same
// ranges): balanced, a multiple of 64 rows when over 64 (whole tiles for the GEMMs).
inline std::vector<std::pair<int64_t, int64_t>> dora_row_chunks(int64_t M, int64_t row_bytes, int64_t chunk_bytes) {
  const int64_t n = std::max<int64_t>(1, (M * row_bytes + std::max<int64_t>(1, chunk_bytes) - 1) /
                                             std::max<int64_t>(1, chunk_bytes));
  if (n == 1) return {{0, M}};
  int64_t rows = (M + n - 1) / n;
  if (rows > 64) rows = (rows + 63) / 64 * 64;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t i = 0; i < M; i += rows) out.emplace_back(i, std::min(i + rows, M));
  return out;
}

// The row chunks of a p > 0 call on x (M, K) with N outputs: per row, an M×K and an M×N temporary of x's dtype.
inline std::vector<std::pair<int64_t, int64_t>> dora_chunks_of(const at::Tensor& x, int64_t N, int64_t chunk_bytes) {
  return dora_row_chunks(x.size(0), (N + x.size(1)) * (int64_t)x.element_size(), chunk_bytes);
}

// The forward at p > 0 (q = 1 − p, keep the contract's mask of x at `seed`, a row chunk at m0 at counter offset
// m0·ceil(K/8)): per row chunk x_k = keep ⊙ x, y = (g/q) ⊙ (x_k Wᵀ + s·x_k Aᵀ Bᵀ) + b in the backend's scaled
// forward, x_c = x − x_k/q over x_k, y += x_c Wᵀ. (x_d = x_k/q, so y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ (s·x_d
// Aᵀ Bᵀ): PEFT's two GEMMs over W.) Returns (y, u = s·x_k Aᵀ).
template <typename Impl>
std::tuple<at::Tensor, at::Tensor> dora_dropout_forward(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                        const at::Tensor& B, const at::Tensor& g, double scaling,
                                                        double p, int64_t seed, int64_t chunk_bytes) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0), k8 = (K + 7) / 8;
  const double q = 1.0 - p;
  const at::Tensor gq = g / q;
  const auto chunks = dora_chunks_of(x, N, chunk_bytes);
  const bool one = chunks.size() == 1;
  at::Tensor y, u;
  if (!one) {
    y = at::empty({M, N}, x.options());
    u = at::empty({M, r}, x.options().dtype(g.scalar_type()));
  }
  const at::Tensor none;
  for (const auto& [m0, m1] : chunks) {
    const at::Tensor xs = one ? x : x.narrow(0, m0, m1 - m0);
    const int64_t off = m0 * k8;
    const at::Tensor xk = Impl::dora_masked(xs, p, seed, off, 1.0, 0.0, none, none);
    auto [ys, us] = Impl::forward_scaled(xk, weight, bias, A, B, gq, scaling);
    const at::Tensor xc = Impl::dora_masked(xs, p, seed, off, 1.0 - 1.0 / q, 1.0, none, xk);  // over x_k
    ys.addmm_(xc, weight.t());
    if (one) return {ys, us};
    y.narrow(0, m0, m1 - m0).copy_(ys);
    u.narrow(0, m0, m1 - m0).copy_(us);
  }
  return {y, u};
}

// The DoRA node at p > 0 (training with dropout; frozen weight and bias), lora_kernels/dora.py's p > 0 path:
//   forward: dora_dropout_forward above.
//   backward (c = (g − 1)/q): dx_b, dA, dB = the LoRA backward at p of (dy, Bg) (its masked dx: dy W + keep ⊙
//            (s/q·(dy Bg) A)), dB (dyᵀ u) then times g/q; per row chunk: x_k, z = x_k Wᵀ + u Bᵀ (the backend's
//            forward: z is recomputed, as y holds x_c Wᵀ too), dy_c = c ⊙ dy over z with the column sums of dy ⊙ z
//            (one pass), t = dy_c W over x_k, dx_b += keep ⊙ t; dmag = Σ dy ⊙ z / q / norm. With float32 adapters
//            on a 16-bit x, z's base x_k Wᵀ alone (the frozen GEMM in x's dtype, as PEFT's base layer) and dmag =
//            (Σ_m dy ⊙ x_k Wᵀ + Σ_j B ⊙ dyᵀ u) / q / norm: z's LoRA part from dB's product in float32, not rounded
//            to x's dtype with the base (lora_kernels/dora.py says why).
//   saved: x, W, A, B, Bg, u, g, norm and the seed: lora_linear's plus O(N·r); no mask, nothing M×N.
// Three GEMMs over W in backward (dx_b's, z's, t's) and two in forward: five, as the Python path.
template <typename Impl>
class DoraDropoutFunction : public torch::autograd::Function<DoraDropoutFunction<Impl>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& magnitude, double scaling, double p, int64_t seed, int64_t chunk_bytes,
                            const at::Tensor& wsq) {
    const auto normed = Impl::dora_norm(weight, lora_A, lora_B, magnitude, scaling, wsq);  // its big: p = 0 only
    const at::Tensor &g = std::get<0>(normed), &norm = std::get<1>(normed), &bg = std::get<2>(normed);
    auto [y, u] = dora_dropout_forward<Impl>(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, chunk_bytes);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, lora_A, lora_B, bg, u, g, norm});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["m_dtype"] = (int64_t)magnitude.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &bg = saved[4];
    const at::Tensor &u = saved[5], &g = saved[6], &norm = saved[7];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const double scaling = ctx->saved_data["scaling"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt(), chunk_bytes = ctx->saved_data["chunk_bytes"].toInt();
    const auto m_dtype = (at::ScalarType)ctx->saved_data["m_dtype"].toInt();
    // needs_input_grad counts tensor inputs: x, weight, [bias], lora_A, lora_B, magnitude, wsq (frozen base)
    const size_t a_edge = has_bias ? 3 : 2;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dA = ctx->needs_input_grad(a_edge), need_dB = ctx->needs_input_grad(a_edge + 1);
    const bool need_dm = ctx->needs_input_grad(a_edge + 2);
    const at::Tensor dy = grads[0].contiguous();
    grads.clear();
    variable_list out(11);  // one per forward argument
    const double q = 1.0 - p;
    // float32 adapters on a 16-bit x: z's base recomputed, its LoRA part from dB's product (above)
    const bool split = need_dm && lora_B.scalar_type() != x.scalar_type();
    at::Tensor dx, lora_part;  // lora_part: Σ_j B ⊙ dyᵀ u (N,) fp32, z's LoRA part of dmag's column sums
    if (need_dx || need_dA || need_dB || split) {
      auto [dxb, dA, dB] = Impl::backward(dy, x, weight, lora_A, bg, u, scaling, p, seed, 0, need_dx, need_dA,
                                          need_dB || split, std::nullopt);
      dx = dxb;
      if (need_dA) out[3] = dA;
      if (split) lora_part = (lora_B.to(at::kFloat) * dB.to(at::kFloat)).sum(1);
      // the backward's dB is dyᵀ u for Bg = g ⊙ B, u = s·x_k Aᵀ = q·(s·x_d Aᵀ): times g/q
      if (need_dB) out[4] = scale_rows(dB, g / q);
    }
    if (need_dx || need_dm) {
      const at::Tensor c = (g - 1.0) / q;
      const int64_t k8 = (x.size(1) + 7) / 8;
      const auto chunks = dora_chunks_of(x, weight.size(0), chunk_bytes);
      const bool one = chunks.size() == 1;
      const at::Tensor none;
      std::vector<at::Tensor> parts;
      for (const auto& [m0, m1] : chunks) {
        auto rows = [&](const at::Tensor& t) { return one ? t : t.narrow(0, m0, m1 - m0); };
        const int64_t off = m0 * k8;
        at::Tensor xk, z;
        if (need_dm) {  // z of these rows (no bias): the backend's LoRA forward of x_k, or its base x_k Wᵀ
          xk = Impl::dora_masked(rows(x), p, seed, off, 1.0, 0.0, none, none);
          z = split ? at::mm(xk, weight.t())
                    : std::get<0>(Impl::forward(xk, weight, std::nullopt, lora_A, lora_B, scaling, 0.0, 0, 0,
                                                std::nullopt));
        }
        auto [dyc, part] = Impl::dora_colsum_z(rows(dy), z, c, need_dx, need_dm, need_dm ? z : none);
        if (need_dm) parts.push_back(part);
        if (need_dx) {  // dx += keep ⊙ (dy_c W), the product written over x_k when there is one
          const at::Tensor t = xk.defined() ? at::mm_out(xk, dyc, weight) : at::mm(dyc, weight);
          const at::Tensor dxs = rows(dx);
          Impl::dora_masked(t, p, seed, off, 1.0, 0.0, dxs, dxs);
        }
      }
      if (need_dx) out[0] = dx;
      if (need_dm) {
        if (split) parts.push_back(lora_part.unsqueeze(0));
        out[5] = Impl::dora_dmag_sum(parts.size() == 1 ? parts[0] : at::cat(parts), norm, q, m_dtype);
      }
    }
    return first_order(std::move(out), dy, x, weight, lora_A, lora_B);
  }
};

// dora_linear's eager call, whole in C++: lora_kernels/dora.py's dora_linear hands its arguments here first (the cuda
// backend, SAVE_Y on and SAVE_Z off, not under torch.compile, no record_dropout block in the way), and this function
// either runs the call or returns an undefined tensor (None), after which the Python path runs it. It declines what
// every entry declines (entry_declines, lora_autograd.h) and, in addition, takes a call only where magnitude is a
// plain (N,) tensor of float32 or x's dtype on x's device, the weight is contiguous (the Python norm takes its
// reference route otherwise) and no CUDA graph is being captured (the ‖W_n‖² cache would allocate inside it).
// With dropout (training, dropout_p > 0) the seed is drawn as ops._draw_seed draws it (draw_seed), so that
// torch.manual_seed gives the same mask whichever path takes the call; chunk_bytes is dora.BWD_CHUNK_BYTES.
template <typename Impl>
at::Tensor dora_linear_entry(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                             const at::Tensor& magnitude, double dropout_p, bool training, int64_t chunk_bytes) {
  const at::Tensor none;
  if (entry_declines<Impl>(x, weight, bias_opt, lora_A, lora_B, scaling)) return none;
  if (!plain_tensor(magnitude) || magnitude.device() != x.device() || magnitude.dim() != 1 ||
      magnitude.size(0) != weight.size(0) || !contract_dtype(x.scalar_type(), magnitude.scalar_type()))
    return none;
  if (!(dropout_p >= 0.0 && dropout_p <= 1.0)) return none;
  if (!weight.is_contiguous() || Impl::capturing(x)) return none;
  const double p = training ? dropout_p : 0.0;
  if (p == 1.0) return none;  // everything dropped: dora_linear's _all_dropped (y = x Wᵀ + b, zero adapter grads)
  const at::Tensor wsq = weight_sq_cached(weight);
  const at::Tensor x2 = as_rows(x, weight.size(1));
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), mag = magnitude.contiguous();
  const std::optional<at::Tensor> bias = contiguous_bias(bias_opt);
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || lora_A.requires_grad() ||
                                                   lora_B.requires_grad() || magnitude.requires_grad());
  const int64_t seed = p > 0.0 ? draw_seed() : 0;
  at::Tensor y;
  if (grad) {
    y = p > 0.0 ? DoraDropoutFunction<Impl>::apply(x2, weight, bias, A, B, mag, scaling, p, seed, chunk_bytes, wsq)
                : DoraLinearFunction<Impl>::apply(x2, weight, bias, A, B, mag, scaling, wsq);
  } else {  // the forward alone
    const at::Tensor g = std::get<0>(Impl::dora_norm(weight, A, B, mag, scaling, wsq));
    y = std::get<0>(p > 0.0 ? dora_dropout_forward<Impl>(x2, weight, bias, A, B, g, scaling, p, seed, chunk_bytes)
                            : Impl::forward_scaled(x2, weight, bias, A, B, g, scaling));
  }
  return with_leading_dims(y, x);
}

}  // namespace lora_kernels
