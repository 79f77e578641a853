// pyllm::rms_norm for CUDA tensors (the `cuda` backend).
//
// The user-facing argument checks live in pyllm/ops/rms_norm.py; the checks
// here only guard the memory the kernel touches.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "rms_norm_kernel.h"

namespace pyllm::cuda {
namespace {

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK_TYPE(false, "pyllm CUDA kernels: ", name,
                       " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::f32;
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_in,
                                            const c10::optional<at::Tensor>& weight_in,
                                            double eps) {
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) >= 1,
                    "pyllm::rms_norm: x must have a non-empty last dimension, got shape ",
                    x_in.sizes());
  TORCH_CHECK_VALUE(x_in.is_cuda(), "pyllm::rms_norm (CUDA kernel): x must be a CUDA tensor");
  if (weight_in.has_value()) {
    TORCH_CHECK_VALUE(weight_in->dim() == 1 && weight_in->size(0) == x_in.size(-1),
                      "pyllm::rms_norm: weight must have shape [", x_in.size(-1), "], got ",
                      weight_in->sizes());
    TORCH_CHECK_TYPE(weight_in->scalar_type() == x_in.scalar_type() ||
                         weight_in->scalar_type() == at::kFloat,
                     "pyllm::rms_norm: weight must be ", x_in.scalar_type(), " or float32");
    TORCH_CHECK_VALUE(weight_in->device() == x_in.device(),
                      "pyllm::rms_norm: weight must be on ", x_in.device());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const int64_t n = x.size(-1);
  at::Tensor y = at::empty(x.sizes(), x.options());
  std::vector<int64_t> rows_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor rstd = at::empty(rows_shape, x.options().dtype(at::kFloat));
  const RmsNormForward args{x.data_ptr(),
                            weight.defined() ? weight.data_ptr() : nullptr,
                            y.data_ptr(),
                            rstd.data_ptr<float>(),
                            x.numel() / n,
                            n,
                            static_cast<float>(eps),
                            kernel_dtype(x, "x"),
                            weight.defined() ? kernel_dtype(weight, "weight") : kernel_dtype(x, "x")};
  C10_CUDA_CHECK(launch_rms_norm_forward(args, c10::cuda::getCurrentCUDAStream()));
  return {y, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) { m.impl("rms_norm", &rms_norm); }

}  // namespace pyllm::cuda
