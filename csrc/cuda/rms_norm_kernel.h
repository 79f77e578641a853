// RMSNorm CUDA kernels: the interface between the operator
// (csrc/cuda/rms_norm.cpp, which includes torch) and the kernels
// (rms_norm_kernel.cu, which does not, so it compiles in seconds).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace pyllm::cuda {

struct RmsNormForward {
  const void* x;       // [rows, n] of x_type, rows contiguous
  const void* weight;  // [n] of weight_type, or null
  void* y;             // [rows, n] of x_type
  float* rstd;         // [rows]
  int64_t rows;
  int64_t n;
  float eps;
  DType x_type;
  DType weight_type;
};

// Launches on `stream`; returns the launch's error code.
cudaError_t launch_rms_norm_forward(const RmsNormForward& args, cudaStream_t stream);

}  // namespace pyllm::cuda
