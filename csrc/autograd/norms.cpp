// Autograd of the norm ops, for both names of each (pyllm::<op> and
// pyllm::<op>_triton): the forward runs the op below autograd, saves what the
// backward op needs, and the backward calls the paired backward op
// (pyllm::<norm>_backward[_triton]) through the dispatcher.
//
// This lives in C++ rather than in Python (torch.library.register_autograd)
// because a Python autograd kernel costs ~4 us on every call, grad or not,
// which is most of the time of a decode-sized norm.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <type_traits>

#include "helpers.h"

namespace pyllm::autograd {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// -- RMSNorm ------------------------------------------------------------------

using RmsNormSig = std::tuple<Tensor, Tensor>(const Tensor&, const optional<Tensor>&, double);
using AddRmsNormSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const optional<Tensor>&, double);
using RmsNormBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const optional<Tensor>&,
                                                      const optional<Tensor>&, std::array<bool, 2>);

template <bool kTriton>
std::tuple<Tensor, Tensor> rms_norm_grads(AutogradContext* ctx, const Tensor& grad_y,
                                          const Tensor& grad_sum, bool want_x, bool want_w) {
  static const auto backward =
      typed_op<RmsNormBackwardSig>(op_name<kTriton>("rms_norm_backward"));
  const variable_list saved = ctx->get_saved_variables();
  const Tensor& normalised = saved[0];
  require_kernel(backward, normalised);
  return backward.call(grad_y, normalised, saved[2], absent_if_undefined(saved[1]),
                       absent_if_undefined(grad_sum), {want_x, want_w});
}

template <bool kTriton>
struct RmsNorm : torch::autograd::Function<RmsNorm<kTriton>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                               double eps) {
    static const auto op = typed_op<RmsNormSig>(op_name<kTriton>("rms_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = op.call(x, weight, eps);
    ctx->save_for_backward({x, undefined_if_absent(weight), rstd});
    ctx->mark_non_differentiable({rstd});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool want_w = ctx->get_saved_variables()[1].defined() && ctx->needs_input_grad(1);
    auto [gx, gw] = rms_norm_grads<kTriton>(ctx, grads[0], Tensor(), ctx->needs_input_grad(0), want_w);
    return {gx, gw, Tensor()};
  }
};

// The fused-residual norms' two differentiable outputs (y, sum): autograd
// leaves the gradient of an unused one undefined (materialising it would make
// a plain zeros tensor even for a tensor subclass such as DTensor). The
// backward op takes grad_sum as optional, but needs grad_y: zeros like the
// other one (same subclass and layout). False: neither was used.
inline bool present_grads(variable_list& grads) {
  if (!grads[0].defined() && !grads[1].defined()) return false;
  if (!grads[0].defined()) grads[0] = at::zeros_like(grads[1]);
  return true;
}

template <bool kTriton>
struct AddRmsNorm : torch::autograd::Function<AddRmsNorm<kTriton>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual,
                               const optional<Tensor>& weight, double eps) {
    static const auto op = typed_op<AddRmsNormSig>(op_name<kTriton>("add_rms_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, sum, rstd] = op.call(x, residual, weight, eps);
    ctx->save_for_backward({sum, undefined_if_absent(weight), rstd});
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);  // an unused output's gradient: see present_grads
    return {y, sum, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!present_grads(grads)) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const bool want_x = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    const bool want_w = ctx->get_saved_variables()[1].defined() && ctx->needs_input_grad(2);
    auto [gx, gw] = rms_norm_grads<kTriton>(ctx, grads[0], grads[1], want_x, want_w);
    return {gx, gx, gw, Tensor()};
  }
};

template <bool kTriton>
std::tuple<Tensor, Tensor> rms_norm(const Tensor& x, const optional<Tensor>& weight, double eps) {
  if (!needs_grad(x, weight)) {
    static const auto op = typed_op<RmsNormSig>(op_name<kTriton>("rms_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, eps);
  }
  auto out = RmsNorm<kTriton>::apply(x, weight, eps);
  return {out[0], out[1]};
}

template <bool kTriton>
std::tuple<Tensor, Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& residual,
                                                const optional<Tensor>& weight, double eps) {
  if (!needs_grad(x, residual, weight)) {
    static const auto op = typed_op<AddRmsNormSig>(op_name<kTriton>("add_rms_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, residual, weight, eps);
  }
  auto out = AddRmsNorm<kTriton>::apply(x, residual, weight, eps);
  return {out[0], out[1], out[2]};
}

// -- LayerNorm ----------------------------------------------------------------

using LayerNormSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const optional<Tensor>&,
                                                        const optional<Tensor>&, double);
using AddLayerNormSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, double);
using LayerNormBackwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, std::array<bool, 3>);

// Saved: normalised input, weight, mean, rstd; the bias's dtype in saved_data.
template <bool kTriton>
std::tuple<Tensor, Tensor, Tensor> layer_norm_grads(AutogradContext* ctx, const Tensor& grad_y,
                                                    const Tensor& grad_sum,
                                                    std::array<bool, 3> mask) {
  static const auto backward =
      typed_op<LayerNormBackwardSig>(op_name<kTriton>("layer_norm_backward"));
  const variable_list saved = ctx->get_saved_variables();
  require_kernel(backward, saved[0]);
  auto [gx, gw, gb] = backward.call(grad_y, saved[0], saved[2], saved[3],
                                    absent_if_undefined(saved[1]), absent_if_undefined(grad_sum),
                                    mask);
  if (gb.defined()) gb = gb.to(ctx->saved_data["bias_dtype"].toScalarType());
  return {gx, gw, gb};
}

void save_bias_dtype(AutogradContext* ctx, const optional<Tensor>& bias) {
  if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
}

bool has_bias(AutogradContext* ctx) { return ctx->saved_data.count("bias_dtype") > 0; }

template <bool kTriton>
struct LayerNorm : torch::autograd::Function<LayerNorm<kTriton>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps) {
    static const auto op = typed_op<LayerNormSig>(op_name<kTriton>("layer_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = op.call(x, weight, bias, eps);
    ctx->save_for_backward({x, undefined_if_absent(weight), mean, rstd});
    save_bias_dtype(ctx, bias);
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_weight = ctx->get_saved_variables()[1].defined();
    auto [gx, gw, gb] = layer_norm_grads<kTriton>(
        ctx, grads[0], Tensor(),
        {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
         has_bias(ctx) && ctx->needs_input_grad(2)});
    return {gx, gw, gb, Tensor()};
  }
};

template <bool kTriton>
struct AddLayerNorm : torch::autograd::Function<AddLayerNorm<kTriton>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               double eps) {
    static const auto op = typed_op<AddLayerNormSig>(op_name<kTriton>("add_layer_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, sum, mean, rstd] = op.call(x, residual, weight, bias, eps);
    ctx->save_for_backward({sum, undefined_if_absent(weight), mean, rstd});
    save_bias_dtype(ctx, bias);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // an unused output's gradient: see present_grads
    return {y, sum, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!present_grads(grads)) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const bool has_weight = ctx->get_saved_variables()[1].defined();
    auto [gx, gw, gb] = layer_norm_grads<kTriton>(
        ctx, grads[0], grads[1],
        {ctx->needs_input_grad(0) || ctx->needs_input_grad(1),
         has_weight && ctx->needs_input_grad(2), has_bias(ctx) && ctx->needs_input_grad(3)});
    return {gx, gx, gw, gb, Tensor()};
  }
};

template <bool kTriton>
std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& x, const optional<Tensor>& weight,
                                              const optional<Tensor>& bias, double eps) {
  if (!needs_grad(x, weight, bias)) {
    static const auto op = typed_op<LayerNormSig>(op_name<kTriton>("layer_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, bias, eps);
  }
  auto out = LayerNorm<kTriton>::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

template <bool kTriton>
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm(const Tensor& x, const Tensor& residual,
                                                          const optional<Tensor>& weight,
                                                          const optional<Tensor>& bias, double eps) {
  if (!needs_grad(x, residual, weight, bias)) {
    static const auto op = typed_op<AddLayerNormSig>(op_name<kTriton>("add_layer_norm"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, residual, weight, bias, eps);
  }
  auto out = AddLayerNorm<kTriton>::apply(x, residual, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, Autograd, m) {
  m.impl("rms_norm", &rms_norm<false>);
  m.impl("rms_norm_triton", &rms_norm<true>);
  m.impl("add_rms_norm", &add_rms_norm<false>);
  m.impl("add_rms_norm_triton", &add_rms_norm<true>);
  m.impl("layer_norm", &layer_norm<false>);
  m.impl("layer_norm_triton", &layer_norm<true>);
  m.impl("add_layer_norm", &add_layer_norm<false>);
  m.impl("add_layer_norm_triton", &add_layer_norm<true>);
}

}  // namespace pyllm::autograd
