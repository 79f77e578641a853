// Autograd of pyllm::attention and pyllm::attention_triton: the forward saves
// q, k, v, out and lse; the backward calls pyllm::attention_backward[_triton].
// The bias is a constant: asking for its gradient is an error (raised by the
// Python face before the forward; the formula here returns none).

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "helpers.h"

namespace pyllm::autograd {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AttentionSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const optional<Tensor>&, const optional<Tensor>&,
                                                int64_t, int64_t, const optional<Tensor>&, double,
                                                bool, int64_t, int64_t, double,
                                                const optional<Tensor>&, const optional<Tensor>&);
using AttentionBackwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, int64_t, int64_t, const optional<Tensor>&,
    double, bool, int64_t, int64_t, double, const optional<Tensor>&);

template <bool kTriton>
struct Attention : torch::autograd::Function<Attention<kTriton>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const optional<Tensor>& cu_q,
                               const optional<Tensor>& cu_k, int64_t max_q, int64_t max_k,
                               const optional<Tensor>& bias, double scale, bool causal,
                               int64_t window_left, int64_t window_right, double softcap,
                               const optional<Tensor>& alibi) {
    static const auto op = typed_op<AttentionSig>(op_name<kTriton>("attention"));
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal,
                              window_left, window_right, softcap, alibi, c10::nullopt);
    ctx->save_for_backward({q, k, v, out, lse, cu_q.value_or(Tensor()), cu_k.value_or(Tensor()),
                            bias.value_or(Tensor()), alibi.value_or(Tensor())});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["softcap"] = softcap;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<AttentionBackwardSig>(op_name<kTriton>("attention_backward"));
    const variable_list s = ctx->get_saved_variables();
    require_kernel(op, s[0]);
    auto [dq, dk, dv] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], absent_if_undefined(s[5]),
                                absent_if_undefined(s[6]), ctx->saved_data["max_q"].toInt(),
                                ctx->saved_data["max_k"].toInt(), absent_if_undefined(s[7]),
                                ctx->saved_data["scale"].toDouble(),
                                ctx->saved_data["causal"].toBool(),
                                ctx->saved_data["window_left"].toInt(),
                                ctx->saved_data["window_right"].toInt(),
                                ctx->saved_data["softcap"].toDouble(), absent_if_undefined(s[8]));
    return {dq,       dk,       dv,       Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

template <bool kTriton>
std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const optional<Tensor>& cu_q, const optional<Tensor>& cu_k,
                                     int64_t max_q, int64_t max_k, const optional<Tensor>& bias,
                                     double scale, bool causal, int64_t window_left,
                                     int64_t window_right, double softcap,
                                     const optional<Tensor>& alibi,
                                     const optional<Tensor>& block_table) {
  if (!at::GradMode::is_enabled() ||
      !(q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    static const auto op = typed_op<AttentionSig>(op_name<kTriton>("attention"));
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, window_left,
                   window_right, softcap, alibi, block_table);
  }
  TORCH_CHECK_VALUE(!block_table.has_value(), "pyllm::attention: no gradient through a paged "
                    "KV cache (block_table given); run it under torch.no_grad() or detach q, k, v");
  auto out = Attention<kTriton>::apply(q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal,
                                       window_left, window_right, softcap, alibi);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, Autograd, m) {
  m.impl("attention", &attention<false>);
  m.impl("attention_triton", &attention<true>);
}

}  // namespace pyllm::autograd
