// Mapping torch dtypes onto the CPU kernels' element types, for the operator
// files (which include torch; the kernels don't).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels/scalar.h"

namespace pyllm::cpu {

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK_TYPE(false, "pyllm CPU kernels: ", name,
                       " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::f32;
}

}  // namespace pyllm::cpu
