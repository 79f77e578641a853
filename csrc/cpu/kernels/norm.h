// LayerNorm / RMSNorm CPU kernels: the interface between the operators
// (csrc/cpu/norms.cpp) and the per-ISA variants (norm_{generic,avx2,avx512}.cpp).
// Raw pointers and sizes only; rows are contiguous, the caller checked shapes.
#pragma once

#include <cstdint>

#include "scalar.h"

namespace pyllm::cpu {

struct NormForward {
  const void* x;         // [rows, n] of x_type
  const void* residual;  // [rows, n] of x_type, or null: normalise x + residual
  const void* weight;    // [n] of param_type, or null (ones)
  const void* bias;      // [n] of param_type, or null (zeros); LayerNorm only
  void* y;               // [rows, n] of x_type
  void* sum;             // [rows, n] of x_type: x + residual, when residual is given
  float* mean;           // [rows], LayerNorm only
  float* rstd;           // [rows]
  int64_t n;
  float eps;
  DType x_type;
  DType param_type;
  bool rms;  // RMSNorm (no mean, no bias) or LayerNorm
};

struct NormBackward {
  const void* grad_y;    // [rows, n] of x_type
  const void* x;         // [rows, n] of x_type: the normalised input (the sum, if fused)
  const float* mean;     // [rows], LayerNorm only
  const float* rstd;     // [rows]
  const void* weight;    // [n] of param_type, or null
  const void* grad_sum;  // [rows, n] of x_type, or null: added to grad_x
  void* grad_x;          // [rows, n] of x_type, or null when not wanted
  int64_t n;
  DType x_type;
  DType param_type;
  bool rms;
};

// Normalises rows [begin, end).
using NormForwardFn = void (*)(const NormForward&, int64_t begin, int64_t end);
// Writes grad_x for rows [begin, end) and adds, over those rows,
// grad_y * xhat to grad_weight_acc[n] and grad_y to grad_bias_acc[n] (each
// when not null).
using NormBackwardFn = void (*)(const NormBackward&, int64_t begin, int64_t end,
                                float* grad_weight_acc, float* grad_bias_acc);

#define PYLLM_DECLARE_NORM(isa)                                                \
  namespace isa {                                                              \
  void norm_forward(const NormForward&, int64_t, int64_t);                     \
  void norm_backward(const NormBackward&, int64_t, int64_t, float*, float*);   \
  }
PYLLM_DECLARE_NORM(generic)
PYLLM_DECLARE_NORM(avx2)
PYLLM_DECLARE_NORM(avx512)
#undef PYLLM_DECLARE_NORM

}  // namespace pyllm::cpu
