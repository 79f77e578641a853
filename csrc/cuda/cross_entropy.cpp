// pyllm::cross_entropy for CUDA tensors: the arguments checked
// (tensor_args.h), the outputs allocated, the kernel (cross_entropy_kernel.cu)
// launched on the current stream.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../common/tensor_args.h"
#include "cross_entropy_kernel.h"

namespace pyllm::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, bool want_grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss, lse, grad;
  const CrossEntropy a =
      check_cross_entropy_args(logits, target, ignore_index, label_smoothing, z_loss, softcap,
                               want_grad, c10::DeviceType::CUDA, loss, lse, grad);
  C10_CUDA_CHECK(launch_cross_entropy(a, c10::cuda::getCurrentCUDAStream()));
  return {loss, lse, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) { m.impl("cross_entropy", &cross_entropy); }

}  // namespace pyllm::cuda
