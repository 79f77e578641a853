// pyllm::{rms_norm, add_rms_norm, layer_norm, add_layer_norm} and their
// backward ops for CUDA tensors (the `cuda` backend).
//
// The user-facing argument checks live in pyllm/ops/{rms_norm,layer_norm}.py
// and run for every backend; the checks here only guard the memory the
// kernels touch.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>

#include "../common/norm_ops.h"
#include "../common/tensor_args.h"
#include "norm_kernel.h"

namespace pyllm::cuda {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

float* float_data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The forward of all four ops: y, sum (undefined without residual), mean
// (undefined for RMSNorm), rstd.
std::array<at::Tensor, 4> norm_forward(const char* op, bool rms, const at::Tensor& x_in,
                                       const c10::optional<at::Tensor>& residual_in,
                                       const c10::optional<at::Tensor>& weight_in,
                                       const c10::optional<at::Tensor>& bias_in, double eps) {
  check_norm_input(op, x_in, c10::DeviceType::CUDA);
  if (residual_in.has_value()) check_like_x(op, "residual", *residual_in, x_in);
  const DType param_type = check_norm_params(op, x_in, weight_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = contiguous_or_undefined(residual_in);
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  const int64_t n = x.size(-1);
  const auto stats = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor sum = residual.defined() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor mean = rms ? at::Tensor() : at::empty(row_shape(x), stats);
  at::Tensor rstd = at::empty(row_shape(x), stats);
  const NormForward args{x.data_ptr(),      data_or_null(residual),
                         data_or_null(weight), data_or_null(bias),
                         y.data_ptr(),      sum.defined() ? sum.data_ptr() : nullptr,
                         float_data_or_null(mean), rstd.data_ptr<float>(),
                         x.numel() / n,     n,
                         static_cast<float>(eps), kernel_dtype(x, "x"),
                         param_type,        rms};
  C10_CUDA_CHECK(launch_norm_forward(args, current_stream()));
  return {y, sum, mean, rstd};
}

// The backward of all four ops: grad_x, grad_weight, grad_bias (each
// undefined unless asked for).
std::array<at::Tensor, 3> norm_backward(const char* op, bool rms, const at::Tensor& grad_y_in,
                                        const at::Tensor& x_in, const at::Tensor& mean_in,
                                        const at::Tensor& rstd_in,
                                        const c10::optional<at::Tensor>& weight_in,
                                        const c10::optional<at::Tensor>& grad_sum_in,
                                        std::array<bool, 3> mask) {
  const DType param_type =
      check_norm_backward_args(op, c10::DeviceType::CUDA, rms, grad_y_in, x_in, mean_in, rstd_in,
                               weight_in, grad_sum_in, mask);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor mean = rms ? at::Tensor() : mean_in.contiguous();
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor grad_sum = contiguous_or_undefined(grad_sum_in);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t chunks = norm_backward_chunks(rows, n);
  at::Tensor grad_x = mask[0] ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor partial_w = mask[1] ? at::empty({chunks, n}, f32) : at::Tensor();
  at::Tensor partial_b = mask[2] ? at::empty({chunks, n}, f32) : at::Tensor();
  const NormBackward args{grad_y.data_ptr(),        x.data_ptr(),
                          float_data_or_null(mean), rstd.data_ptr<float>(),
                          data_or_null(weight),     data_or_null(grad_sum),
                          grad_x.defined() ? grad_x.data_ptr() : nullptr,
                          float_data_or_null(partial_w), float_data_or_null(partial_b),
                          rows,                     n,
                          kernel_dtype(x, "x"),     param_type,
                          rms};
  C10_CUDA_CHECK(launch_norm_backward(args, current_stream()));
  const at::ScalarType param = param_type == DType::f32 ? at::kFloat : x.scalar_type();
  std::array<at::Tensor, 3> out{grad_x, at::Tensor(), at::Tensor()};
  for (int k = 1; k <= 2; ++k) {
    if (!mask[k]) continue;
    at::Tensor total = at::empty({n}, f32);
    if (rows == 0) {
      total.zero_();
    } else {
      C10_CUDA_CHECK(launch_column_sum((k == 1 ? partial_w : partial_b).data_ptr<float>(), chunks,
                                       n, total.data_ptr<float>(), current_stream()));
    }
    out[k] = total.to(param);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) { NormOps<norm_forward, norm_backward>::register_all(m); }

}  // namespace pyllm::cuda
