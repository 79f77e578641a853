// LayerNorm / RMSNorm CUDA kernels: the interface between the operators
// (csrc/cuda/norms.cpp, which includes torch) and the kernels
// (norm_kernel.cu, which does not, so it compiles in seconds). Raw pointers
// and sizes; rows are contiguous, the caller checked shapes and types.
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "device.h"

namespace pyllm::cuda {

struct NormForward {
  const void* x;         // [rows, n] of x_type
  const void* residual;  // [rows, n] of x_type, or null: normalise s = x + residual
  const void* weight;    // [n] of param_type, or null (ones)
  const void* bias;      // [n] of param_type, or null (zeros); LayerNorm only
  void* y;               // [rows, n] of x_type
  void* sum;             // [rows, n] of x_type: s, when residual is given
  float* mean;           // [rows], LayerNorm only
  float* rstd;           // [rows]
  int64_t rows;
  int64_t n;
  float eps;
  DType x_type;
  DType param_type;
  bool rms;  // RMSNorm (no mean, no bias) or LayerNorm
};

struct NormBackward {
  const void* grad_y;    // [rows, n] of x_type
  const void* x;         // [rows, n] of x_type: the normalised input (s, if fused)
  const float* mean;     // [rows], LayerNorm only
  const float* rstd;     // [rows]
  const void* weight;    // [n] of param_type, or null
  const void* grad_sum;  // [rows, n] of x_type, or null: added to grad_x
  void* grad_x;          // [rows, n] of x_type, or null when not wanted
  // [norm_backward_chunks(rows, n), n] float32 partial sums over row chunks of
  // grad_y * xhat and of grad_y, each or null; every element is written.
  float* partial_weight;
  float* partial_bias;
  int64_t rows;
  int64_t n;
  DType x_type;
  DType param_type;
  bool rms;
};

cudaError_t launch_norm_forward(const NormForward& args, cudaStream_t stream);
cudaError_t launch_norm_backward(const NormBackward& args, cudaStream_t stream);
// Rows of the backward's partial-sum buffers; depends on the shape only, so
// the parameter gradients are bit-for-bit the same from run to run.
int64_t norm_backward_chunks(int64_t rows, int64_t n);
// out[j] = sum over c of partial[c * n + j], in order of c.
cudaError_t launch_column_sum(const float* partial, int64_t chunks, int64_t n, float* out,
                              cudaStream_t stream);

}  // namespace pyllm::cuda
