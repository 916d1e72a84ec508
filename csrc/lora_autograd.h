// The LoRA op's autograd node in C++ (eager mode), shared by the CUDA binding (binding.cpp, with the fused kernels)
// and a CPU test shim (tests/cpp/autograd_shim.cpp, with reference ATen math), so that this logic is tested in CI
// without a GPU.
//
//   y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ          saved for backward: x, W, A, B, u = s · dropout(x) Aᵀ (M×r, fp32)
//
// Impl provides the two fused passes, with the contract of lora_kernels/backends/__init__.py:
//   static std::tuple<Tensor, Tensor> forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t)
//                                                                                                   -> (y, u)
//   static std::tuple<Tensor, Tensor, Tensor> backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset,
//                                                      need_dx, need_dA, need_dB, seed_t)           -> (dx, dA, dB)
// A grad not asked for may come back undefined (the node reads only those it asked for): no empty tensor is made
// for it (each allocation costs host time).
// seed_t: std::optional<Tensor>, the dropout key as a device tensor (CUDA graphs) in place of the int `seed`; the
// backward gets the same one as its forward (saved with the other tensors), so both regenerate one mask.
// Why C++: Python's autograd.Function around forward / backward costs tens of microseconds of host time per
// fwd+bwd, which decides the speed of small-M calls and of whole training steps; with this node a training step's
// backward runs no Python for these layers. Same routing and math of (dx, dA, dB) as lora_kernels/ops.py's
// _backward (tests/test_contract.py checks that both give the same grads bit for bit).
// Scope: a frozen base weight and bias (LoRA's case, where the host time matters). A trainable weight or bias is
// refused in forward: lora_linear routes it to its Python autograd, which holds the one definition of dW and db
// (ops._base_grads), so this node does not repeat that math.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <cmath>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace lora_kernels {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Wraps a gradient computed under create_graph=True: the value passes through, and differentiating it again raises
// a clear error instead of giving silently incomplete second derivatives (the fused kernels record no graph). The
// extra inputs connect the node to everything the gradient depends on, as Python's once_differentiable does.
class NotTwiceDifferentiable : public torch::autograd::Function<NotTwiceDifferentiable> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& /*dy*/,
                            const at::Tensor& /*x*/, const at::Tensor& /*weight*/, const at::Tensor& /*lora_A*/,
                            const at::Tensor& /*lora_B*/) {
    return grad;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "lora_kernels: the backward of lora_linear is not differentiable (double backward through "
                "the fused LoRA op is not supported)");
    return {};
  }
};

// A node's grads, returned as they are, or under create_graph=True each wrapped in NotTwiceDifferentiable (their
// first-order values; a second order raises the clear error).
inline variable_list first_order(variable_list out, const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  if (at::GradMode::is_enabled()) {
    for (auto& g : out) {
      if (g.defined()) g = NotTwiceDifferentiable::apply(g, dy, x, weight, lora_A, lora_B);
    }
  }
  return out;
}

template <typename Impl>
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction<Impl>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scaling, double p, int64_t seed, int64_t offset,
                            const std::optional<at::Tensor>& seed_t) {
    TORCH_CHECK(!weight.requires_grad() && !(bias.has_value() && bias->defined() && bias->requires_grad()),
                "lora_kernels: the C++ autograd node of lora_linear covers a frozen weight and bias; lora_linear "
                "routes a trainable base weight or bias to its Python autograd (ops._backward)");
    auto out = Impl::forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t);
    // An undefined tensor saves as undefined: the backward then has no device seed either.
    ctx->save_for_backward({x, weight, lora_A, lora_B, std::get<1>(out), seed_t.value_or(at::Tensor())});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return std::get<0>(out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &u = saved[4];
    const std::optional<at::Tensor> seed_t = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor inputs only: x, weight, [bias], lora_A, lora_B. The weight and bias are frozen
    // (checked in forward): out[1] and out[2] stay undefined.
    const size_t a_edge = has_bias ? 3 : 2;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dA = ctx->needs_input_grad(a_edge), need_dB = ctx->needs_input_grad(a_edge + 1);
    const at::Tensor dy = grads[0].contiguous();  // materialized: defined even when y's grad is not
    variable_list out(10);  // one per forward argument; undefined = no gradient
    if (need_dx || need_dA || need_dB) {
      auto g = Impl::backward(dy, x, weight, lora_A, lora_B, u, ctx->saved_data["scaling"].toDouble(),
                              ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(),
                              ctx->saved_data["offset"].toInt(), need_dx, need_dA, need_dB, seed_t);
      if (need_dx) out[0] = std::get<0>(g);
      if (need_dA) out[3] = std::get<1>(g);
      if (need_dB) out[4] = std::get<2>(g);
    }
    return first_order(std::move(out), dy, x, weight, lora_A, lora_B);
  }
};

// ---------------------------------------------------------------------------------------------- the eager entry
// lora_linear's eager call, whole in C++: lora_kernels/ops.py's lora_linear hands its arguments here first (cuda
// backend, no backend or record_dropout block in the way, not under torch.compile), and this function either runs
// the call or returns an undefined tensor (None in Python), after which the Python path runs it. Why: the Python
// wrapper (autocast, checks, backend resolution, seed, reshapes, autograd routing) cost 12 us of the forward's host
// time and 30 us of a forward+backward's on the H200's host (fourteenth session, bench/dev/host_probe.py), more
// than the fused op itself adds to F.linear's.
// It takes a call only where the Python path would take the same route with the same result: plain dense tensors on
// Impl's device (no tensor subclass, functorch wrapper, dispatch mode or autocast), shapes and dtypes that the
// contract accepts (lora_kernels/ops.py: _check), a frozen weight and bias, a finite scaling, p in [0, 1], no
// empty problem, and no dropout under CUDA graph capture (the device seed is the Python path's). Every other call,
// valid or not, goes to the Python path, which holds the error messages: nothing is checked twice with different
// words. The seed is drawn as ops._draw_seed draws it (draw_seed), so that torch.manual_seed reproduces a run
// whichever path took the calls.
// Impl adds to the kernels of LoraLinearFunction:
//   static constexpr int64_t kMaxRank                the largest rank (ops.MAX_RANK)
//   static bool on_device(const at::Tensor& x)       x is on the device whose kernels Impl runs
//   static bool capturing(const at::Tensor& x)       a CUDA graph capture is under way on x's current stream
//   static at::Tensor forward_only(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t)
//                                                    y alone (u a temporary): the call with nothing to differentiate
// The dispatch keys of what the entry leaves to the Python path, on a tensor (a subclass, a functorch wrapper) or in
// the thread's included set (a dispatch mode, a functorch transform, functionalization).
constexpr c10::DispatchKeySet kForeignKeys =
    c10::python_ks | c10::functorch_transforms_ks |
    c10::DispatchKeySet({c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
                         c10::DispatchKey::FuncTorchDynamicLayerBackMode});

inline bool plain_tensor(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && !t.key_set().has_any(kForeignKeys);
}

inline bool contract_dtype(at::ScalarType x, at::ScalarType adapter) {
  return adapter == at::kFloat || adapter == x;
}

// ops._draw_seed's draw, torch.randint(0, 2^62, ()) on the default CPU generator, without a tensor: randint's CPU
// kernel for a range of 2^28 or more takes one random64() of the generator, under its lock, modulo the range
// (ATen/core/DistributionsHelper.h, uniform_int_from_to_distribution). tests/test_autograd_cpp.py checks that both
// give the same value and leave the same generator state.
inline int64_t draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return (int64_t)(at::check_generator<at::CPUGeneratorImpl>(gen)->random64() % (uint64_t(1) << 62));
}

// The calls that every eager entry (this file's, and dora_autograd.h's dora_linear_entry) leaves to the Python path,
// whatever the op: anything but plain dense tensors on Impl's device (a tensor subclass, a functorch wrapper, a
// dispatch mode, autocast), shapes and dtypes that the contract does not accept (lora_kernels/ops.py: _check), a
// trainable weight or bias, a scaling that is not finite, and the empty problems.
template <typename Impl>
bool entry_declines(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  if (c10::impl::tls_local_dispatch_key_set().included_.has_any(kForeignKeys)) return true;
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  if (!plain_tensor(x) || !plain_tensor(weight) || !plain_tensor(lora_A) || !plain_tensor(lora_B) ||
      (has_bias && !plain_tensor(*bias_opt)) || !Impl::on_device(x))
    return true;
  const c10::Device dev = x.device();
  if (weight.device() != dev || lora_A.device() != dev || lora_B.device() != dev ||
      (has_bias && bias_opt->device() != dev))
    return true;
  if (x.dim() < 1 || weight.dim() != 2 || lora_A.dim() != 2 || lora_B.dim() != 2) return true;
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0);
  if (x.size(-1) != K || lora_A.size(1) != K || r < 1 || r > Impl::kMaxRank || lora_B.size(0) != N ||
      lora_B.size(1) != r || (has_bias && (bias_opt->dim() != 1 || bias_opt->size(0) != N)))
    return true;
  const at::ScalarType dt = x.scalar_type();
  if ((dt != at::kHalf && dt != at::kBFloat16 && dt != at::kFloat) || weight.scalar_type() != dt ||
      (has_bias && bias_opt->scalar_type() != dt) || !contract_dtype(dt, lora_A.scalar_type()) ||
      !contract_dtype(dt, lora_B.scalar_type()))
    return true;
  if (weight.requires_grad() || (has_bias && bias_opt->requires_grad())) return true;  // ops._base_grads' case
  if (!std::isfinite(scaling)) return true;
  if (at::autocast::is_autocast_enabled(dev.type())) return true;
  return K == 0 || x.numel() == 0;  // the empty problems (ops._fwd_impl)
}

// x (..., K) as the contiguous (M, K) the kernels take, and a given bias contiguous (else none).
inline at::Tensor as_rows(const at::Tensor& x, int64_t K) {
  return (x.dim() == 2 ? x : x.reshape({-1, K})).contiguous();
}
inline std::optional<at::Tensor> contiguous_bias(const std::optional<at::Tensor>& bias_opt) {
  if (!bias_opt.has_value() || !bias_opt->defined()) return std::nullopt;
  return bias_opt->contiguous();
}

// y (M, N) of the flattened x back to x's leading dims.
inline at::Tensor with_leading_dims(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.reshape(shape);
}

template <typename Impl>
at::Tensor lora_linear_entry(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                             bool training) {
  if (entry_declines<Impl>(x, weight, bias_opt, lora_A, lora_B, scaling) || !(dropout_p >= 0.0 && dropout_p <= 1.0))
    return at::Tensor();
  double p = training ? dropout_p : 0.0;
  if (p == 1.0) scaling = 0.0, p = 0.0;  // everything dropped: the LoRA path and its grads are zero
  if (p > 0.0 && Impl::capturing(x)) return at::Tensor();  // the graph-safe device seed: ops.lora_linear
  const int64_t seed = p > 0.0 ? draw_seed() : 0;
  const at::Tensor x2 = as_rows(x, weight.size(1));
  const at::Tensor w = weight.contiguous(), A = lora_A.contiguous(), B = lora_B.contiguous();
  const std::optional<at::Tensor> bias = contiguous_bias(bias_opt);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad());
  at::Tensor y = grad ? LoraLinearFunction<Impl>::apply(x2, w, bias, A, B, scaling, p, seed, 0, std::nullopt)
                      : Impl::forward_only(x2, w, bias, A, B, scaling, p, seed, 0, std::nullopt);
  return with_leading_dims(y, x);
}

}  // namespace lora_kernels
