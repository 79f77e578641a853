// LayerNorm / RMSNorm CPU kernels: the interface between the operators
// (csrc/cpu/norms.cpp) and the per-ISA variants of norm_kernel.h (setup.py
// compiles one per instruction set).
// Raw pointers and sizes only; rows are contiguous, the caller checked shapes.
#pragma once

#include <cstdint>

#include "../../common/norm_args.h"
#include "scalar.h"

namespace pyllm::cpu {

using pyllm::NormBackward;
using pyllm::NormForward;

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
PYLLM_DECLARE_NORM(avx512_bf16)
#undef PYLLM_DECLARE_NORM

}  // namespace pyllm::cpu
