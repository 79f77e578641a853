// pyllm::{rms_norm, add_rms_norm, layer_norm, add_layer_norm} and their
// backward ops for CPU tensors.
//
// The user-facing argument checks live in pyllm/ops/{rms_norm,layer_norm}.py
// and run for every backend; the checks here only guard the memory the
// kernels touch, so that a direct torch.ops.pyllm call can never read or write
// out of bounds.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "isa.h"
#include "norms.h"
#include "kernels/norm.h"
#include "output.h"
#include "../common/norm_ops.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {
namespace {

// Rows per parallel task: at least ~16K elements, so that a decode-sized call
// runs inline on the calling thread.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

NormForwardFn forward_kernel() {
  return pick_isa<NormForwardFn>(generic::norm_forward, avx2::norm_forward, avx512::norm_forward,
                                 avx512_bf16::norm_forward);
}

NormBackwardFn backward_kernel() {
  return pick_isa<NormBackwardFn>(generic::norm_backward, avx2::norm_backward,
                                  avx512::norm_backward, avx512_bf16::norm_backward);
}

// The forward of all four ops, with or without the statistics the backward
// needs. Returns y, sum (undefined without residual), mean (undefined for
// RMSNorm or without statistics), rstd (undefined without statistics).
std::array<at::Tensor, 4> run_forward(const char* op, bool rms, bool keep_stats,
                                      const at::Tensor& x_in,
                                      const c10::optional<at::Tensor>& residual_in,
                                      const c10::optional<at::Tensor>& weight_in,
                                      const c10::optional<at::Tensor>& bias_in, double eps) {
  check_norm_input(op, x_in, c10::DeviceType::CPU);
  if (residual_in.has_value()) check_like_x(op, "residual", *residual_in, x_in);
  const DType param_type = check_norm_params(op, x_in, weight_in, bias_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = contiguous_or_undefined(residual_in);
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const auto stats = x.options().dtype(at::kFloat);
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor sum = residual.defined() ? empty_output(x.sizes(), x.options()) : at::Tensor();
  at::Tensor mean = rms || !keep_stats ? at::Tensor() : at::empty(row_shape(x), stats);
  at::Tensor rstd = keep_stats ? at::empty(row_shape(x), stats) : at::Tensor();
  const NormForward args{x.data_ptr(),
                         data_or_null(residual),
                         data_or_null(weight),
                         data_or_null(bias),
                         y.data_ptr(),
                         sum.defined() ? sum.data_ptr() : nullptr,
                         mean.defined() ? mean.data_ptr<float>() : nullptr,
                         rstd.defined() ? rstd.data_ptr<float>() : nullptr,
                         rows,
                         n,
                         static_cast<float>(eps),
                         kernel_dtype(x, "x"),
                         param_type,
                         rms};
  const NormForwardFn kernel = forward_kernel();
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) { kernel(args, b, e); });
  return {y, sum, mean, rstd};
}

std::array<at::Tensor, 4> norm_forward(const char* op, bool rms, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& residual,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps) {
  return run_forward(op, rms, /*keep_stats=*/true, x, residual, weight, bias, eps);
}

// The backward of all four ops: grad_x, grad_weight, grad_bias (each undefined
// unless asked for).
std::array<at::Tensor, 3> norm_backward(const char* op, bool rms, const at::Tensor& grad_y_in,
                                        const at::Tensor& x_in, const at::Tensor& mean_in,
                                        const at::Tensor& rstd_in,
                                        const c10::optional<at::Tensor>& weight_in,
                                        const c10::optional<at::Tensor>& grad_sum_in,
                                        std::array<bool, 3> mask) {
  const DType param_type =
      check_norm_backward_args(op, c10::DeviceType::CPU, rms, grad_y_in, x_in, mean_in, rstd_in,
                               weight_in, grad_sum_in, mask);
  const int64_t n = x_in.size(-1);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor mean = rms ? at::Tensor() : mean_in.contiguous();
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor grad_sum = contiguous_or_undefined(grad_sum_in);
  const int64_t rows = x.numel() / n;

  at::Tensor grad_x = mask[0] ? empty_output(x.sizes(), x.options()) : at::Tensor();
  const NormBackward args{grad_y.data_ptr(),
                          x.data_ptr(),
                          mean.defined() ? mean.data_ptr<float>() : nullptr,
                          rstd.data_ptr<float>(),
                          data_or_null(weight),
                          data_or_null(grad_sum),
                          grad_x.defined() ? grad_x.data_ptr() : nullptr,
                          nullptr,
                          nullptr,
                          rows,
                          n,
                          kernel_dtype(x, "x"),
                          param_type,
                          rms};
  const NormBackwardFn kernel = backward_kernel();
  if (!mask[1] && !mask[2]) {
    at::parallel_for(0, rows, grain_rows(n),
                     [&](int64_t b, int64_t e) { kernel(args, b, e, nullptr, nullptr); });
    return {grad_x, at::Tensor(), at::Tensor()};
  }
  // Parameter gradients: each of a fixed number of row chunks sums into its
  // own fp32 row, and the chunks are added in order, so the result does not
  // depend on the number of threads.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  constexpr int64_t kinds = 2;  // weight, bias
  at::Tensor partial = at::zeros({kinds, chunks, n}, x.options().dtype(at::kFloat));
  float* partial_ptr = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * chunk_rows;
      const int64_t end = std::min(rows, begin + chunk_rows);
      if (begin < end) {
        kernel(args, begin, end, mask[1] ? partial_ptr + c * n : nullptr,
               mask[2] ? partial_ptr + (chunks + c) * n : nullptr);
      }
    }
  });
  // One tensor per gradient (slices of one buffer would alias each other).
  std::array<at::Tensor, kinds> totals;
  std::array<float*, kinds> total_ptr;
  for (int64_t k = 0; k < kinds; ++k) {
    totals[k] = at::empty({n}, x.options().dtype(at::kFloat));
    total_ptr[k] = totals[k].data_ptr<float>();
  }
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t k = 0; k < kinds; ++k) {
      float* out = total_ptr[k];
      for (int64_t i = i0; i < i1; ++i) out[i] = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = partial_ptr + (k * chunks + c) * n;
        for (int64_t i = i0; i < i1; ++i) out[i] += p[i];
      }
    }
  });
  const at::ScalarType param = param_type == DType::f32 ? at::kFloat : x.scalar_type();
  return {grad_x, mask[1] ? totals[0].to(param) : at::Tensor(),
          mask[2] ? totals[1].to(param) : at::Tensor()};
}

}  // namespace

std::array<at::Tensor, 2> norm_inference(bool rms, const at::Tensor& x,
                                         const c10::optional<at::Tensor>& residual,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias, double eps) {
  const char* op = rms ? (residual.has_value() ? "add_rms_norm" : "rms_norm")
                       : (residual.has_value() ? "add_layer_norm" : "layer_norm");
  auto out = run_forward(op, rms, /*keep_stats=*/false, x, residual, weight, bias, eps);
  return {out[0], out[1]};
}

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { NormOps<norm_forward, norm_backward>::register_all(m); }

}  // namespace pyllm::cpu
