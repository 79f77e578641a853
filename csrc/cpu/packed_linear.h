// The CPU packed-weight products for calls made outside the dispatcher
// (csrc/direct_calls.cpp); the operators pyllm::linear_packed and
// pyllm::swiglu_packed register these same functions in linear.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace pyllm::cpu {

// act(x @ W^T + bias) with W as pyllm::pack_linear_weight's panels of an
// (out_features, K) weight of x's dtype. x: [..., K] float32/bfloat16/float16
// CPU, any strides; bias: [out_features] of x's dtype or float32. Returns
// [..., out_features] in x's dtype. Checks its arguments (throws on bad ones).
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, c10::string_view activation);

// silu(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up), both weights packed as
// above. Returns [..., out_features] in x's dtype. Checks its arguments.
at::Tensor swiglu_packed(const at::Tensor& x, const at::Tensor& packed_gate,
                         const at::Tensor& packed_up, int64_t out_features,
                         const c10::optional<at::Tensor>& b_gate,
                         const c10::optional<at::Tensor>& b_up);

// Whether `packed` is pyllm::pack_linear_weight's panels of an
// (out_features, in_features) weight of `dtype` under this instruction set
// (what linear_packed and swiglu_packed check of it).
bool packed_fits(const at::Tensor& packed, int64_t out_features, int64_t in_features,
                 at::ScalarType dtype);

}  // namespace pyllm::cpu
