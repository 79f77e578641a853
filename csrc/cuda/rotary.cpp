// pyllm::rotary for CUDA tensors: the arguments checked (tensor_args.h), the
// kernel (rotary_kernel.cu) launched on the current stream.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/tensor_args.h"
#include "rotary_kernel.h"

namespace pyllm::cuda {
namespace {

void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& positions, bool interleaved, bool conjugate) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Rotary r = check_rotary_args(q, k, cos, sin, positions, interleaved, conjugate,
                                     c10::DeviceType::CUDA);
  C10_CUDA_CHECK(launch_rotary(r, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) { m.impl("rotary", &rotary); }

}  // namespace pyllm::cuda
