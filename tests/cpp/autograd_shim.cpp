// CPU test shim for csrc/lora_autograd.h and csrc/dora_autograd.h: the same autograd nodes and eager entries as the
// CUDA binding, with reference ATen math in place of the fused kernels. lora_linear's takes no dropout (the mask is
// not its tests' subject; a forward with p > 0 keeps its seed for last_seed(), so that the entry's seed draw can be
// checked); DoRA's at p > 0 applies the contract's mask (philox.cuh on the host), so that its node can be checked
// against the torch backend's Python path with the same seed. Registers
// torch.ops.lora_autograd_shim.lora_linear with CPU (forward only) and Autograd kernels, and linear_entry as a
// catch-all, like binding.cpp does.
// The device seed seed_t (optional) stands in for the mask so that its routing can be tested: given one, the shim's
// math uses scaling * (1 + seed_t), in forward and backward alike (a backward without it would give other grads).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <optional>
#include <tuple>

#include "dora_autograd.h"
#include "lora_autograd.h"
#include "philox.cuh"

namespace {

using at::Tensor;

double seeded(double scaling, const std::optional<Tensor>& seed_t) {
  return seed_t.has_value() ? scaling * (1.0 + (double)seed_t->item<int64_t>()) : scaling;
}

int64_t g_last_seed = -1;  // the seed of the last forward with p > 0 (its dropout is not applied: see the top)

struct ReferenceMath {
  static constexpr int64_t kMaxRank = 256;
  static bool on_device(const Tensor& x) { return x.is_cpu(); }
  static bool capturing(const Tensor&) { return false; }
  static std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                            const Tensor& lora_A, const Tensor& lora_B, double scaling, double p,
                                            int64_t seed, int64_t /*offset*/, const std::optional<Tensor>& seed_t) {
    if (p > 0.0) g_last_seed = seed;
    scaling = seeded(scaling, seed_t);
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor u = x.to(acc).mm(lora_A.to(acc).t()) * scaling;
    Tensor y = x.to(acc).mm(weight.to(acc).t()) + u.mm(lora_B.to(acc).t());
    if (bias.has_value() && bias->defined()) y = y + bias->to(acc);
    return {y.to(x.scalar_type()), u};
  }
  static Tensor forward_only(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& lora_A, const Tensor& lora_B, double scaling, double p, int64_t seed,
                             int64_t offset, const std::optional<Tensor>& seed_t) {
    return std::get<0>(forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t));
  }
  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                     const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                     double scaling, double /*p*/, int64_t /*seed*/,
                                                     int64_t /*offset*/, bool need_dx, bool need_dA, bool need_dB,
                                                     const std::optional<Tensor>& seed_t) {
    scaling = seeded(scaling, seed_t);
    const auto acc = u.scalar_type();
    Tensor g = dy.to(acc).mm(lora_B.to(acc));
    const Tensor none;  // a grad not asked for is undefined, as the CUDA binding's backward gives it to the node
    Tensor dx = need_dx ? (dy.to(acc).mm(weight.to(acc)) + g.mm(lora_A.to(acc)) * scaling).to(x.scalar_type()) : none;
    Tensor dA = need_dA ? (g.t().mm(x.to(acc)) * scaling).to(lora_A.scalar_type()) : none;
    Tensor dB = need_dB ? dy.to(acc).t().mm(u).to(lora_B.scalar_type()) : none;
    return {dx, dA, dB};
  }
};

// The contract's keep mask of an (M, K) input at (seed, offset) and p (lora_kernels/philox.py's dropout_mask).
Tensor keep_mask(int64_t M, int64_t K, double p, int64_t seed, int64_t offset) {
  Tensor keep = at::empty({M, K}, at::kBool);
  bool* k = keep.data_ptr<bool>();
  const uint32_t thr = lora_kernels::dropout_threshold((float)p);
  const int64_t K8 = lora_kernels::dropout_groups(K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k8 = 0; k8 < K8; ++k8) {
      bool kb[8];
      lora_kernels::dropout_keep8((uint64_t)seed, lora_kernels::dropout_counter((uint64_t)offset, m, K, k8), thr, kb);
      for (int64_t q = 0; q < 8 && 8 * k8 + q < K; ++q) k[m * K + 8 * k8 + q] = kb[q];
    }
  }
  return keep;
}

// dora_autograd.h's Impl with reference ATen math (the formulas of lora_kernels/dora.py, and at p > 0 those of the
// torch backend's backward: lora_kernels/backends/torch_ref.py).
struct ReferenceDora : ReferenceMath {
  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                     const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                     double scaling, double p, int64_t seed, int64_t offset,
                                                     bool need_dx, bool need_dA, bool need_dB,
                                                     const std::optional<Tensor>& seed_t) {
    if (p == 0.0)
      return ReferenceMath::backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA,
                                     need_dB, seed_t);
    const auto acc = u.scalar_type();
    const Tensor keep = keep_mask(x.size(0), x.size(1), p, seed, offset).to(acc);
    const Tensor g = dy.to(acc).mm(lora_B.to(acc));
    const Tensor none;
    Tensor dx = need_dx ? (dy.to(acc).mm(weight.to(acc)) + g.mm(lora_A.to(acc)) * scaling * keep / (1.0 - p))
                              .to(x.scalar_type())
                        : none;
    Tensor dA = need_dA ? (g.t().mm(x.to(acc) * keep / (1.0 - p)) * scaling).to(lora_A.scalar_type()) : none;
    Tensor dB = need_dB ? dy.to(acc).t().mm(u).to(lora_B.scalar_type()) : none;
    return {dx, dA, dB};
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> dora_norm(const Tensor& weight, const Tensor& lora_A,
                                                              const Tensor& lora_B, const Tensor& magnitude,
                                                              double scaling, const Tensor& wsq) {
    // csrc/dora_norm.cu's math: the expansion from the cached ‖W_n‖², and the rows that cancel summed directly
    const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor A = lora_A.to(acc), B = lora_B.to(acc), w2 = wsq.to(acc);
    const Tensor wa = weight.to(acc).mm(A.t()), aat = A.mm(A.t());
    const Tensor lin = 2.0 * scaling * (B * wa).sum(1);
    const Tensor quad = (scaling * scaling) * (B * B.mm(aat)).sum(1);
    const Tensor sizes = w2 + 2.0 * std::abs(scaling) * (B * wa).abs().sum(1) +
                         (scaling * scaling) * (B.abs() * B.abs().mm(aat.abs())).sum(1);
    const Tensor sq = w2 + lin + quad;
    const Tensor direct = at::addmm(weight.to(acc), B, A, 1.0, scaling).square().sum(1);
    const Tensor norm = at::where(sq < 0.5 * sizes, direct, sq).clamp_min(0.0).sqrt();
    const Tensor g = magnitude.to(acc) / norm;
    const Tensor big = quad > 0.25 * w2;  // ‖s·(B A)_n‖ > ‖W_n‖ / 2: z recomputed there at p = 0 (dora_recompute_z)
    return {g, norm, (B * g.unsqueeze(1)).to(lora_B.scalar_type()), big};
  }
  static std::tuple<Tensor, Tensor> forward_scaled(const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                   const Tensor& lora_B, const Tensor& g, double scaling) {
    auto [z, u] = forward(x, weight, std::nullopt, lora_A, lora_B, scaling, 0.0, 0, 0, std::nullopt);
    Tensor y = z.to(g.scalar_type()) * g;
    if (bias.has_value() && bias->defined()) y = y + bias->to(g.scalar_type());
    return {y.to(x.scalar_type()), u};
  }
  static std::tuple<Tensor, Tensor> dora_dy(const Tensor& dy, const Tensor& y, const Tensor& g, const Tensor& norm,
                                            const Tensor& big, const Tensor& bias, const Tensor& x,
                                            const Tensor& weight, const Tensor& u, const Tensor& lora_B, bool need_dyc,
                                            bool need_dm, at::ScalarType m_dtype, bool in_place) {
    const auto acc = g.scalar_type();
    const Tensor d = dy.to(acc);
    Tensor dyc, dm;
    if (need_dm) {
      Tensor yb = y.to(acc);
      if (bias.defined()) yb = yb - bias.to(acc);
      // z from y, except where g = 0, (with a bias) |g| < 1/2, or big: there z recomputed (dora_recompute_z)
      Tensor lost = (g == 0).logical_or(big);
      if (bias.defined()) lost = lost.logical_or(bias.to(acc).ne(0).logical_and(g.abs() < 0.5));
      const Tensor nz = g != 0;
      Tensor dg = at::where(nz, (d * yb).sum(0) / at::where(nz, g, at::ones_like(g)), at::zeros_like(g));
      const Tensor z = x.to(acc).mm(weight.to(acc).t()) + u.to(acc).mm(lora_B.to(acc).t());
      dg = at::where(lost, (d * z).sum(0), dg);
      dm = (dg / norm).to(m_dtype);
    }
    if (need_dyc) dyc = in_place ? dy.copy_(d * g) : (d * g).to(dy.scalar_type());  // in place: after dm's read
    return {dyc, dm};
  }
  static std::tuple<Tensor, Tensor, Tensor> backward_dx_from(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                             const Tensor& lora_A, const Tensor& lora_B,
                                                             const Tensor& u, const Tensor& dx_from, double scaling,
                                                             bool need_dx, bool need_dA, bool need_dB,
                                                             const std::function<void()>& before_dx) {
    auto out = backward(dy, x, weight, lora_A, lora_B, u, scaling, 0.0, 0, 0, false, need_dA, need_dB, std::nullopt);
    if (need_dx) {  // dx = dx_from W + s (dy B) A (dx_from undefined: dy); dy is read before before_dx
      const auto acc = u.scalar_type();
      const Tensor lora = dy.to(acc).mm(lora_B.to(acc)).mm(lora_A.to(acc)) * scaling;
      if (before_dx) before_dx();
      const Tensor& d = dx_from.defined() ? dx_from : dy;
      std::get<0>(out) = (d.to(acc).mm(weight.to(acc)) + lora).to(x.scalar_type());
    } else if (before_dx) {
      before_dx();
    }
    return out;
  }
  static Tensor dora_masked(const Tensor& t, double p, int64_t seed, int64_t offset, double a_keep, double a_drop,
                            const Tensor& base, const Tensor& out) {
    const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor keep = keep_mask(t.size(0), t.size(1), p, seed, offset);
    const Tensor t32 = t.to(acc);
    Tensor r = at::where(keep, t32 * a_keep, t32 * a_drop);
    if (base.defined()) r = r + base.to(acc);
    return out.defined() ? out.copy_(r) : r.to(t.scalar_type());
  }
  static std::tuple<Tensor, Tensor> dora_colsum_z(const Tensor& dy, const Tensor& z, const Tensor& c, bool need_dyc,
                                                  bool need_part, const Tensor& dyc_out) {
    const Tensor d = dy.to(c.scalar_type());
    Tensor part = need_part ? (d * z.to(c.scalar_type())).sum(0).unsqueeze(0) : Tensor();  // before dy_c over z
    Tensor dyc;
    if (need_dyc) dyc = dyc_out.defined() ? dyc_out.copy_(d * c) : (d * c).to(dy.scalar_type());
    return {dyc, part};
  }
  static Tensor dora_dmag_sum(const Tensor& part, const Tensor& norm, double q, at::ScalarType m_dtype) {
    return (part.sum(0) / q / norm).to(m_dtype);
  }
};

Tensor dora_entry(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, const Tensor& magnitude, double dropout_p, bool training,
                  int64_t chunk_bytes) {
  return lora_kernels::dora_linear_entry<ReferenceDora>(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_p,
                                                        training, chunk_bytes);
}

void dora_clear_cache() { lora_kernels::clear_weight_sq_cache(); }

std::vector<int64_t> dora_row_chunks(int64_t M, int64_t row_bytes, int64_t chunk_bytes) {
  std::vector<int64_t> out;
  for (const auto& [m0, m1] : lora_kernels::dora_row_chunks(M, row_bytes, chunk_bytes)) {
    out.push_back(m0);
    out.push_back(m1);
  }
  return out;
}

Tensor with_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                     const Tensor& lora_B, double scaling, double p, int64_t seed, int64_t offset,
                     const std::optional<Tensor>& seed_t) {
  return lora_kernels::LoraLinearFunction<ReferenceMath>::apply(x, weight, bias, lora_A, lora_B, scaling, p, seed,
                                                                offset, seed_t);
}

Tensor forward_only(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                    const Tensor& lora_B, double scaling, double p, int64_t seed, int64_t offset,
                    const std::optional<Tensor>& seed_t) {
  return std::get<0>(ReferenceMath::forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, seed_t));
}

Tensor entry(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
             const Tensor& lora_B, double scaling, double dropout_p, bool training) {
  return lora_kernels::lora_linear_entry<ReferenceMath>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training);
}

int64_t last_seed() { return g_last_seed; }

int64_t dora_last_dyc_in_place() { return lora_kernels::dora_last_dyc_in_place().load(); }

}  // namespace

TORCH_LIBRARY(lora_autograd_shim, m) {
  m.def("linear_entry(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, bool training) -> Tensor", &entry);
  m.def("last_seed() -> int", &last_seed);
  m.def("dora_entry(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor magnitude, float dropout_p, bool training, int chunk_bytes=67108864) -> Tensor", &dora_entry);
  m.def("dora_clear_cache() -> ()", &dora_clear_cache);
  m.def("dora_row_chunks(int M, int row_bytes, int chunk_bytes) -> int[]", &dora_row_chunks);
  m.def("dora_last_dyc_in_place() -> int", &dora_last_dyc_in_place);
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float p, "
        "int seed, int offset, Tensor? seed_t=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(lora_autograd_shim, CPU, m) { m.impl("lora_linear", &forward_only); }
TORCH_LIBRARY_IMPL(lora_autograd_shim, Autograd, m) { m.impl("lora_linear", &with_autograd); }
