// pyllm::{linear, swiglu} and their backward ops for CUDA tensors (the `cuda`
// backend), on the tensor-core GEMM of gemm_kernel.cu. float16 and bfloat16.
//
// Backward: the pre-activation gradient comes from the forward GEMM again
// with a gradient epilogue; dx and dW are the same NT kernel on transposed
// copies (dx = dz @ W: b = W^T; dW = dz^T @ x: a = dz^T, b = x^T); SwiGLU's
// two products share one GEMM over the concatenated [dgate, dup] and
// [W_gate; W_up]. The user-facing checks live in pyllm/ops/linear.py; the
// checks here guard the memory the kernel touches.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../common/linear_checks.h"
#include "../common/tensor_args.h"
#include "gemm_kernel.h"
#include "tensor_core_checks.h"

namespace pyllm::cuda {
namespace {

using at::Tensor;
using c10::optional;

void check_input(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.is_cuda(), "pyllm::", op,
                    " (CUDA kernel): x must be a CUDA tensor with at least one dimension");
  check_tensor_core_dtype(op, "x", x);
}

// [rows, last] with the last dimension contiguous (the kernel takes row strides).
Tensor rows_of(const Tensor& t) {
  Tensor r = as_rows(t);
  return r.stride(1) == 1 && r.stride(0) % 8 == 0 ? r : r.contiguous();
}

Tensor float_bias(const optional<Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
}

const float* float_ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// out [m, n] = epilogue(a [m, k] @ b [n, k]^T); a and b have unit column stride.
void gemm(const Tensor& a, const Tensor& b, Tensor& out, Gemm g) {
  g.a = a.data_ptr();
  g.b = b.data_ptr();
  g.out = out.data_ptr();
  g.m = a.size(0);
  g.n = b.size(0);
  g.k = a.size(1);
  g.lda = a.stride(0);
  g.ldb = b.stride(0);
  g.ldc = out.stride(0);
  g.type = kernel_dtype(a, "x");
  C10_CUDA_CHECK(launch_gemm(g, c10::cuda::getCurrentCUDAStream()));
}

Gemm plain() {
  return Gemm{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, 0,
              0,       0,       0,       0,       DType::f16, Activation::none,
              GemmEpilogue::forward};
}

Tensor linear(const Tensor& x, const Tensor& weight_in, const optional<Tensor>& bias_in,
              c10::string_view activation) {
  check_input("linear", x);
  check_linear_params("linear", x, weight_in, bias_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows_of(x), weight = rows_of(weight_in), bias = float_bias(bias_in);
  Tensor y = at::empty({x2.size(0), weight.size(0)}, x.options());
  Gemm g = plain();
  g.bias = float_ptr(bias);
  g.activation = parse_activation(activation);
  gemm(x2, weight, y, g);
  return y.view(with_last(x, weight.size(0)));
}

Tensor swiglu(const Tensor& x, const Tensor& w_gate_in, const Tensor& w_up_in,
              const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in) {
  check_input("swiglu", x);
  check_swiglu_params("swiglu", x, w_gate_in, w_up_in, b_gate_in, b_up_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows_of(x);
  // One row stride for both weights.
  const Tensor w_gate = w_gate_in.contiguous(), w_up = w_up_in.contiguous();
  const Tensor b_gate = float_bias(b_gate_in), b_up = float_bias(b_up_in);
  Tensor y = at::empty({x2.size(0), w_gate.size(0)}, x.options());
  Gemm g = plain();
  g.b2 = w_up.data_ptr();
  g.bias = float_ptr(b_gate);
  g.bias2 = float_ptr(b_up);
  g.epilogue = GemmEpilogue::swiglu;
  gemm(x2, w_gate, y, g);
  return y.view(with_last(x, w_gate.size(0)));
}

// dx [M, K] = dz [M, N] @ w [N, K];  dW [N, K] = dz^T @ x2.
Tensor input_grad(const Tensor& dz, const Tensor& w) {
  const Tensor w_t = w.t().contiguous();
  Tensor dx = at::empty({dz.size(0), w.size(1)}, dz.options());
  gemm(dz, w_t, dx, plain());
  return dx;
}

Tensor weight_grad(const Tensor& dz, const Tensor& x2) {
  const Tensor dz_t = dz.t().contiguous(), x_t = x2.t().contiguous();
  Tensor dw = at::empty({dz.size(1), x2.size(1)}, dz.options());
  gemm(dz_t, x_t, dw, plain());
  return dw;
}

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_y, const Tensor& x,
                                                   const Tensor& weight_in,
                                                   const optional<Tensor>& bias_in,
                                                   c10::string_view activation,
                                                   std::array<bool, 3> mask) {
  check_input("linear_backward", x);
  check_linear_params("linear_backward", x, weight_in, bias_in, &grad_y);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows_of(x), weight = rows_of(weight_in), bias = float_bias(bias_in);
  const Tensor gy = as_rows(grad_y).contiguous();
  const Activation act = parse_activation(activation);
  Tensor dz = gy;
  if (act != Activation::none) {  // dz = grad_y * act'(x W^T + b)
    dz = at::empty(gy.sizes(), gy.options());
    Gemm g = plain();
    g.bias = float_ptr(bias);
    g.activation = act;
    g.epilogue = GemmEpilogue::act_grad;
    g.grad = gy.data_ptr();
    g.ldg = gy.stride(0);
    gemm(x2, weight, dz, g);
  }
  Tensor dx, dw, db;
  if (mask[0]) dx = input_grad(dz, weight).view(x.sizes());
  if (mask[1]) dw = weight_grad(dz, x2);
  if (mask[2] && bias_in.has_value()) db = linear_bias_grad(dz, *bias_in);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> swiglu_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& w_gate_in, const Tensor& w_up_in,
    const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in, std::array<bool, 5> mask) {
  check_input("swiglu_backward", x);
  check_swiglu_params("swiglu_backward", x, w_gate_in, w_up_in, b_gate_in, b_up_in);
  check_grad_y("swiglu_backward", grad_y, x, w_gate_in.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows_of(x);
  const Tensor w_gate = w_gate_in.contiguous(), w_up = w_up_in.contiguous();
  const Tensor b_gate = float_bias(b_gate_in), b_up = float_bias(b_up_in);
  const int64_t n = w_gate.size(0);
  const Tensor gy = as_rows(grad_y).contiguous();
  // [dgate | dup] side by side, from the recomputed products.
  Tensor dz = at::empty({x2.size(0), 2 * n}, x.options());
  Gemm g = plain();
  g.b2 = w_up.data_ptr();
  g.bias = float_ptr(b_gate);
  g.bias2 = float_ptr(b_up);
  g.epilogue = GemmEpilogue::swiglu_grad;
  g.grad = gy.data_ptr();
  g.ldg = gy.stride(0);
  g.out2 = static_cast<char*>(dz.data_ptr()) + n * dz.element_size();
  Tensor dgate_view = dz.narrow(1, 0, n);
  gemm(x2, w_gate, dgate_view, g);
  const Tensor dgate = dz.narrow(1, 0, n), dup = dz.narrow(1, n, n);
  Tensor dx, dwg, dwu, dbg, dbu;
  if (mask[0]) dx = input_grad(rows_of(dz), at::cat({w_gate, w_up}, 0)).view(x.sizes());
  if (mask[1]) dwg = weight_grad(dgate, x2);
  if (mask[2]) dwu = weight_grad(dup, x2);
  if (mask[3] && b_gate_in.has_value()) dbg = linear_bias_grad(dgate, *b_gate_in);
  if (mask[4] && b_up_in.has_value()) dbu = linear_bias_grad(dup, *b_up_in);
  return {dx, dwg, dwu, dbg, dbu};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) {
  m.impl("linear", &linear);
  m.impl("swiglu", &swiglu);
  m.impl("linear_backward", &linear_backward);
  m.impl("swiglu_backward", &swiglu_backward);
}

}  // namespace pyllm::cuda
