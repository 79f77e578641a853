// The arguments of the rotary-embedding kernels, the same for the CPU kernel
// (csrc/cpu/rotary.cpp) and the CUDA one (csrc/cuda/rotary_kernel.cu). Raw
// pointers and sizes, no torch: the operator files checked every shape,
// stride and type (check_rotary_args in tensor_args.h).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyllm {

// q or k: element (b, s, h, i) at data[b * batch_stride + s * seq_stride +
// h * head_stride + i].
struct RotaryTensor {
  void* data;
  int64_t batch_stride, seq_stride, head_stride;
  int64_t heads;
};

struct Rotary {
  RotaryTensor q, k;
  const float* cos;          // [max_positions, half]
  const float* sin;          // [max_positions, half]
  const int64_t* positions;  // [batch, seq], contiguous
  int64_t batch, seq, head_dim;
  int64_t half;  // rotary_dim / 2
  int64_t max_positions;
  DType type;
  bool interleaved;  // pairs (2i, 2i + 1), else (i, i + half)
  bool conjugate;    // rotate by minus the angle
};

// The indices of pair i of a head: (i, i + half), or (2i, 2i + 1) interleaved.
inline constexpr int64_t rotary_first(const Rotary& r, int64_t i) {
  return r.interleaved ? 2 * i : i;
}
inline constexpr int64_t rotary_second(const Rotary& r, int64_t i) {
  return r.interleaved ? 2 * i + 1 : i + r.half;
}

}  // namespace pyllm
