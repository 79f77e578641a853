// The dtype check of the CUDA operators that run on tensor cores (GEMM,
// attention): float16 or bfloat16, and bfloat16 only from compute capability
// 8.0 on (the kernels' bf16 mma.sync does not exist on sm_75).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace pyllm::cuda {

inline void check_tensor_core_dtype(const char* op, const char* names, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "pyllm::", op,
                   " (CUDA kernel): ", names, " must be float16 or bfloat16 (tensor cores), got ",
                   t.scalar_type(), "; backend='triton' also takes float32");
  if (t.scalar_type() != at::kBFloat16) return;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  TORCH_CHECK_TYPE(major >= 8, "pyllm::", op,
                   " (CUDA kernel): bfloat16 needs compute capability 8.0 or newer, this device is ",
                   major, ".x; use float16");
}

}  // namespace pyllm::cuda
