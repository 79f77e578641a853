// Autograd of pyllm::linear and pyllm::swiglu (and their _triton twins): the
// forward saves its inputs; the backward calls the paired backward op, which
// recomputes the pre-activation with the derivative fused. On CPU tensors the
// forward keeps the pre-activation instead (float32, y's shape; twice the
// memory of the saved output in bf16) and the backward takes it: the CPU's
// products are compute-bound, and recomputing them made the backward one
// GEMM longer than PyTorch's (4 against 3 of the forward's size for a linear
// with an activation, 8 against 6 for swiglu). The gradients are the same
// bits: the forward's product is the one the backward would recompute.

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "helpers.h"

namespace pyllm::autograd {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, c10::string_view);
using LinearBackwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, c10::string_view,
    std::array<bool, 3>);
using SwigluSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                         const optional<Tensor>&);
using SwigluBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, std::array<bool, 5>);
using LinearPreactSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                   const optional<Tensor>&, c10::string_view);
using LinearBackwardPreactSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&,
    c10::string_view, std::array<bool, 3>);
using SwigluPreactSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                           const Tensor&, const optional<Tensor>&,
                                                           const optional<Tensor>&);
using SwigluBackwardPreactSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, const Tensor&, const Tensor&, std::array<bool, 5>);

// Whether the training forward keeps the pre-activation (see the top).
template <bool kTriton>
bool keeps_preact(const Tensor& x) {
  return !kTriton && x.is_cpu();
}

template <bool kTriton>
struct Linear : torch::autograd::Function<Linear<kTriton>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const optional<Tensor>& bias, c10::string_view activation) {
    static const auto op = typed_op<LinearSig>(op_name<kTriton>("linear"));
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["activation"] = std::string(activation);
    if (activation != "none" && keeps_preact<kTriton>(x)) {
      static const auto keep = typed_op<LinearPreactSig>("pyllm::linear_with_preact");
      auto [y, preact] = keep.call(x, weight, bias, activation);
      ctx->save_for_backward({x, weight, bias.value_or(Tensor()), preact});
      return y;
    }
    ctx->save_for_backward({x, weight, bias.value_or(Tensor())});
    return op.call(x, weight, bias, activation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<LinearBackwardSig>(op_name<kTriton>("linear_backward"));
    const variable_list s = ctx->get_saved_variables();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      s[2].defined() && ctx->needs_input_grad(2)};
    if (s.size() == 4) {
      static const auto from =
          typed_op<LinearBackwardPreactSig>("pyllm::linear_backward_from_preact");
      auto [dx, dw, db] =
          from.call(grads[0], s[0], s[1], absent_if_undefined(s[2]), s[3], activation, mask);
      return {dx, dw, db, Tensor()};
    }
    require_kernel(op, s[0]);
    auto [dx, dw, db] =
        op.call(grads[0], s[0], s[1], absent_if_undefined(s[2]), activation, mask);
    return {dx, dw, db, Tensor()};
  }
};

template <bool kTriton>
struct Swiglu : torch::autograd::Function<Swiglu<kTriton>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_gate,
                        const Tensor& w_up, const optional<Tensor>& b_gate,
                        const optional<Tensor>& b_up) {
    static const auto op = typed_op<SwigluSig>(op_name<kTriton>("swiglu"));
    at::AutoDispatchBelowADInplaceOrView guard;
    if (keeps_preact<kTriton>(x)) {
      static const auto keep = typed_op<SwigluPreactSig>("pyllm::swiglu_with_preact");
      auto [y, gate, up] = keep.call(x, w_gate, w_up, b_gate, b_up);
      ctx->save_for_backward(
          {x, w_gate, w_up, b_gate.value_or(Tensor()), b_up.value_or(Tensor()), gate, up});
      return y;
    }
    ctx->save_for_backward({x, w_gate, w_up, b_gate.value_or(Tensor()), b_up.value_or(Tensor())});
    return op.call(x, w_gate, w_up, b_gate, b_up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<SwigluBackwardSig>(op_name<kTriton>("swiglu_backward"));
    const variable_list s = ctx->get_saved_variables();
    const std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2),
                                      s[3].defined() && ctx->needs_input_grad(3),
                                      s[4].defined() && ctx->needs_input_grad(4)};
    if (s.size() == 7) {
      static const auto from =
          typed_op<SwigluBackwardPreactSig>("pyllm::swiglu_backward_from_preact");
      auto [dx, dwg, dwu, dbg, dbu] =
          from.call(grads[0], s[0], s[1], s[2], absent_if_undefined(s[3]),
                    absent_if_undefined(s[4]), s[5], s[6], mask);
      return {dx, dwg, dwu, dbg, dbu};
    }
    require_kernel(op, s[0]);
    auto [dx, dwg, dwu, dbg, dbu] = op.call(grads[0], s[0], s[1], s[2], absent_if_undefined(s[3]),
                                            absent_if_undefined(s[4]), mask);
    return {dx, dwg, dwu, dbg, dbu};
  }
};

template <bool kTriton>
Tensor linear(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
              c10::string_view activation) {
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || weight.requires_grad() || wants_grad(bias))) {
    static const auto op = typed_op<LinearSig>(op_name<kTriton>("linear"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, bias, activation);
  }
  return Linear<kTriton>::apply(x, weight, bias, activation);
}

template <bool kTriton>
Tensor swiglu(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
              const optional<Tensor>& b_gate, const optional<Tensor>& b_up) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || w_gate.requires_grad() ||
                                       w_up.requires_grad() || wants_grad(b_gate) || wants_grad(b_up))) {
    static const auto op = typed_op<SwigluSig>(op_name<kTriton>("swiglu"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, w_gate, w_up, b_gate, b_up);
  }
  return Swiglu<kTriton>::apply(x, w_gate, w_up, b_gate, b_up);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, Autograd, m) {
  m.impl("linear", &linear<false>);
  m.impl("linear_triton", &linear<true>);
  m.impl("swiglu", &swiglu<false>);
  m.impl("swiglu_triton", &swiglu<true>);
}

}  // namespace pyllm::autograd
