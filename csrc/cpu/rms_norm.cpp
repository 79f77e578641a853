// pyllm::rms_norm and pyllm::rms_norm_backward for CPU tensors.
//
// The user-facing argument checks live in pyllm/ops/rms_norm.py and run for
// every backend; the checks here only guard the memory the kernels touch, so
// that a direct torch.ops.pyllm call can never read or write out of bounds.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "isa.h"
#include "kernels/rms_norm.h"
#include "tensor_types.h"

namespace pyllm::cpu {
namespace {

// Rows per parallel task: at least ~16K elements, so that a decode-sized call
// runs inline on the calling thread.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

void check_common(const at::Tensor& x, const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1,
                    "pyllm::rms_norm: x must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "pyllm::rms_norm (CPU kernel): x must be on the CPU");
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == x.size(-1),
                      "pyllm::rms_norm: weight must have shape [", x.size(-1), "], got ",
                      weight->sizes());
    TORCH_CHECK_TYPE(weight->scalar_type() == x.scalar_type() || weight->scalar_type() == at::kFloat,
                     "pyllm::rms_norm: weight must be ", x.scalar_type(), " or float32, got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->device().is_cpu(), "pyllm::rms_norm (CPU kernel): weight must be on the CPU");
  }
}

std::vector<int64_t> row_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_in,
                                            const c10::optional<at::Tensor>& weight_in,
                                            double eps) {
  check_common(x_in, weight_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(at::kFloat));

  RmsNormForward args{x.data_ptr(),
                      weight.defined() ? weight.data_ptr() : nullptr,
                      y.data_ptr(),
                      rstd.data_ptr<float>(),
                      n,
                      static_cast<float>(eps),
                      kernel_dtype(x, "x"),
                      weight.defined() ? kernel_dtype(weight, "weight") : kernel_dtype(x, "x")};
  const RmsNormForwardFn kernel =
      pick_isa<RmsNormForwardFn>(generic::rms_norm_forward, avx2::rms_norm_forward,
                                 avx512::rms_norm_forward);
  at::parallel_for(0, rows, grain_rows(n),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y_in,
                                                     const at::Tensor& x_in,
                                                     const at::Tensor& rstd_in,
                                                     const c10::optional<at::Tensor>& weight_in,
                                                     std::array<bool, 2> output_mask) {
  check_common(x_in, weight_in);
  TORCH_CHECK_VALUE(grad_y_in.sizes() == x_in.sizes() && grad_y_in.scalar_type() == x_in.scalar_type(),
                    "pyllm::rms_norm_backward: grad_y must match x (", x_in.sizes(), ", ",
                    x_in.scalar_type(), "), got ", grad_y_in.sizes(), ", ", grad_y_in.scalar_type());
  TORCH_CHECK_VALUE(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() * x_in.size(-1) == x_in.numel(),
                    "pyllm::rms_norm_backward: rstd must be float32 with one value per row of x");
  TORCH_CHECK_VALUE(!output_mask[1] || weight_in.has_value(),
                    "pyllm::rms_norm_backward: grad_weight requested without a weight");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;

  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options()) : at::Tensor();
  RmsNormBackward args{grad_y.data_ptr(),
                       x.data_ptr(),
                       rstd.data_ptr<float>(),
                       weight.defined() ? weight.data_ptr() : nullptr,
                       grad_x.defined() ? grad_x.data_ptr() : nullptr,
                       n,
                       kernel_dtype(x, "x"),
                       weight.defined() ? kernel_dtype(weight, "weight") : kernel_dtype(x, "x")};
  const RmsNormBackwardFn kernel =
      pick_isa<RmsNormBackwardFn>(generic::rms_norm_backward, avx2::rms_norm_backward,
                                  avx512::rms_norm_backward);

  if (!output_mask[1]) {
    at::parallel_for(0, rows, grain_rows(n),
                     [&](int64_t begin, int64_t end) { kernel(args, begin, end, nullptr); });
    return {grad_x, at::Tensor()};
  }
  // grad_weight: each of a fixed number of row chunks sums into its own fp32
  // row, and the chunks are added in order, so the result does not depend on
  // the number of threads.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  at::Tensor partial = at::zeros({chunks, n}, x.options().dtype(at::kFloat));
  float* partial_ptr = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * chunk_rows;
      const int64_t end = std::min(rows, begin + chunk_rows);
      if (begin < end) kernel(args, begin, end, partial_ptr + c * n);
    }
  });
  at::Tensor grad_weight32 = at::empty({n}, x.options().dtype(at::kFloat));
  float* gw = grad_weight32.data_ptr<float>();
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) gw[i] = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = partial_ptr + c * n;
      for (int64_t i = i0; i < i1; ++i) gw[i] += p[i];
    }
  });
  return {grad_x, grad_weight32.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace pyllm::cpu
