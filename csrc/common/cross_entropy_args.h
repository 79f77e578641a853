// The arguments of the cross-entropy row kernels, the same for the CPU
// kernel (csrc/cpu/kernels/cross_entropy_kernel.h) and the CUDA one
// (csrc/cuda/cross_entropy_kernel.cu). Raw pointers and sizes, no torch: the
// operator files checked every shape, stride and type
// (check_cross_entropy_args in tensor_args.h).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyllm {

struct CrossEntropy {
  const void* logits;     // [rows, vocab], rows logits_stride apart, of type
  const int64_t* target;  // [rows]
  float* loss;            // [rows]
  float* lse;             // [rows]
  void* grad;             // [rows, vocab] contiguous, of type, or null
  int64_t rows, vocab, logits_stride;
  int64_t ignore_index;
  float label_smoothing, z_loss, softcap;
  DType type;
};

}  // namespace pyllm
