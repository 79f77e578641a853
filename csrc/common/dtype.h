// The element types pyllm's C++ and CUDA kernels take, shared by both so that
// the operator files map a torch dtype once. No torch here.
#pragma once

namespace pyllm {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

}  // namespace pyllm
