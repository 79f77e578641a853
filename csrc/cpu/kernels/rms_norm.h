// RMSNorm CPU kernels: the interface between the operator (csrc/cpu/rms_norm.cpp)
// and its per-ISA variants (rms_norm_{generic,avx2,avx512}.cpp). Raw pointers
// and sizes only; the caller has checked shapes and made rows contiguous.
#pragma once

#include <cstdint>

#include "scalar.h"

namespace pyllm::cpu {

struct RmsNormForward {
  const void* x;       // [rows, n] of x_type
  const void* weight;  // [n] of weight_type, or null
  void* y;             // [rows, n] of x_type
  float* rstd;         // [rows]
  int64_t n;
  float eps;
  DType x_type;
  DType weight_type;
};

struct RmsNormBackward {
  const void* grad_y;  // [rows, n] of x_type
  const void* x;       // [rows, n] of x_type
  const float* rstd;   // [rows]
  const void* weight;  // [n] of weight_type, or null
  void* grad_x;        // [rows, n] of x_type, or null when not wanted
  int64_t n;
  DType x_type;
  DType weight_type;
};

// Normalises rows [row_begin, row_end).
using RmsNormForwardFn = void (*)(const RmsNormForward&, int64_t row_begin, int64_t row_end);
// Writes grad_x for rows [row_begin, row_end) and, when grad_weight_acc is not
// null, adds sum over those rows of grad_y * x * rstd to grad_weight_acc[n].
using RmsNormBackwardFn = void (*)(const RmsNormBackward&, int64_t row_begin, int64_t row_end,
                                   float* grad_weight_acc);

#define PYLLM_DECLARE_RMS_NORM(isa)                                                 \
  namespace isa {                                                                   \
  void rms_norm_forward(const RmsNormForward&, int64_t, int64_t);                   \
  void rms_norm_backward(const RmsNormBackward&, int64_t, int64_t, float*);         \
  }
PYLLM_DECLARE_RMS_NORM(generic)
PYLLM_DECLARE_RMS_NORM(avx2)
PYLLM_DECLARE_RMS_NORM(avx512)
#undef PYLLM_DECLARE_RMS_NORM

}  // namespace pyllm::cpu
