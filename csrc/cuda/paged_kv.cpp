// pyllm::paged_kv_append for CUDA tensors: the arguments checked
// (common/tensor_args.h), the kernel (paged_kv_kernel.cu) launched on
// the current stream.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/tensor_args.h"
#include "paged_kv_kernel.h"

namespace pyllm::cuda {
namespace {

void paged_kv_append(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& slots,
                     const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                     const c10::optional<at::Tensor>& positions, bool interleaved) {
  const c10::cuda::CUDAGuard guard(k_pages.device());
  const PagedKvAppend a = check_paged_kv_append_args(k_pages, v_pages, k, v, slots, cos, sin,
                                                     positions, interleaved,
                                                     c10::DeviceType::CUDA);
  C10_CUDA_CHECK(launch_paged_kv_append(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) { m.impl("paged_kv_append", &paged_kv_append); }

}  // namespace pyllm::cuda
