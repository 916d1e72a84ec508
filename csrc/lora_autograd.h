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

#include <torch/autograd.h>

#include <optional>
#include <tuple>

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
    if (at::GradMode::is_enabled()) {  // create_graph=True: first-order values, second order a clear error
      for (auto& g : out) {
        if (g.defined()) g = NotTwiceDifferentiable::apply(g, dy, x, weight, lora_A, lora_B);
      }
    }
    return out;
  }
};

}  // namespace lora_kernels
