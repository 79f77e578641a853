// The arguments of the LayerNorm / RMSNorm row kernels, the same for the CPU
// kernels (csrc/cpu/kernels/norm.h) and the CUDA ones (csrc/cuda/norm_kernel.h).
// Raw pointers and sizes, no torch: rows are contiguous, the operator files
// checked shapes and types.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyllm {

struct NormForward {
  const void* x;         // [rows, n] of x_type
  const void* residual;  // [rows, n] of x_type, or null: normalise s = x + residual
  const void* weight;    // [n] of param_type, or null (ones)
  const void* bias;      // [n] of param_type, or null (zeros); LayerNorm only
  void* y;               // [rows, n] of x_type
  void* sum;             // [rows, n] of x_type: s, when residual is given
  float* mean;           // [rows], LayerNorm only (null: not kept; CPU kernels only)
  float* rstd;           // [rows] (null: not kept; CPU kernels only)
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
  // CUDA: [norm_backward_chunks(rows, n), n] float32 partial sums over row
  // chunks of grad_y * xhat and of grad_y, each or null; every element is
  // written. The CPU kernels take accumulators per call instead (null here).
  float* partial_weight;
  float* partial_bias;
  int64_t rows;
  int64_t n;
  DType x_type;
  DType param_type;
  bool rms;
};

}  // namespace pyllm
