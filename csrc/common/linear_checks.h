// Memory-safety checks of the linear/swiglu operators and their bias
// gradient, shared by the CPU and CUDA operator files (the user-facing checks
// live in pyllm/ops/linear.py).
// x itself is checked by each device's file (device, and the dtypes its
// kernels take); the others must match x.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/ops/sum.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "activation.h"

namespace pyllm {

inline Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::none;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "silu") return Activation::silu;
  TORCH_CHECK_VALUE(false, "pyllm::linear: activation must be none, gelu, gelu_tanh or silu, got '",
                    std::string(name), "'");
  return Activation::none;
}


// x's shape with the last dimension replaced by n.
inline std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

inline void check_linear_weight(const char* op, const char* name, const at::Tensor& x,
                                const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == x.size(-1) && w.device() == x.device(), "pyllm::",
                    op, ": ", name, " must have shape (out_features, ", x.size(-1), ") on ",
                    x.device(), ", got ", w.sizes(), " on ", w.device());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "pyllm::", op, ": ", name, " must be ",
                   x.scalar_type(), ", got ", w.scalar_type());
}

inline void check_linear_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t n,
                              const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n && bias->device() == x.device(),
                    "pyllm::", op, ": bias must have shape (", n, ") on ", x.device());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat,
                   "pyllm::", op, ": bias must have x's dtype or float32");
}

// SwiGLU's two biases: each as check_linear_bias, and one dtype (the kernels
// read both as one type).
inline void check_swiglu_biases(const char* op, const c10::optional<at::Tensor>& b_gate,
                                const c10::optional<at::Tensor>& b_up, int64_t n,
                                const at::Tensor& x) {
  check_linear_bias(op, b_gate, n, x);
  check_linear_bias(op, b_up, n, x);
  TORCH_CHECK_TYPE(!b_gate.has_value() || !b_up.has_value() ||
                       b_gate->scalar_type() == b_up->scalar_type(),
                   "pyllm::", op, ": bias_gate and bias_up must have one dtype");
}

inline void check_swiglu_params(const char* op, const at::Tensor& x, const at::Tensor& w_gate,
                                const at::Tensor& w_up, const c10::optional<at::Tensor>& b_gate,
                                const c10::optional<at::Tensor>& b_up) {
  check_linear_weight(op, "weight_gate", x, w_gate);
  check_linear_weight(op, "weight_up", x, w_up);
  TORCH_CHECK_VALUE(w_gate.sizes() == w_up.sizes(), "pyllm::", op,
                    ": the two weights must have one shape");
  check_swiglu_biases(op, b_gate, b_up, w_gate.size(0), x);
}

inline void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                         int64_t n) {
  TORCH_CHECK_VALUE(grad_y.sizes() == c10::IntArrayRef(with_last(x, n)) &&
                        grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
                    "pyllm::", op, ": grad_y must have the output's shape, dtype and device");
}

// weight (out, in) and bias (out,) of linear against x; with grad_y too for
// the backward (grad_y given).
inline void check_linear_params(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor* grad_y = nullptr) {
  check_linear_weight(op, "weight", x, weight);
  check_linear_bias(op, bias, weight.size(0), x);
  if (grad_y != nullptr) check_grad_y(op, *grad_y, x, weight.size(0));
}

// The bias gradient: dz [rows, out] summed over rows in fp32, in the bias's dtype.
inline at::Tensor linear_bias_grad(const at::Tensor& dz, const at::Tensor& bias) {
  return at::sum(dz.to(at::kFloat), {0}).to(bias.scalar_type());
}

}  // namespace pyllm
