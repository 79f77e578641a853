// The CPU norms' entry for inference calls made outside the dispatcher
// (csrc/direct_calls.cpp); the operators themselves register in norms.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

namespace pyllm::cpu {

// The forward of rms_norm / layer_norm (add_* with a residual) without the
// statistics a backward would need. x: [..., n] float32/bfloat16/float16 CPU;
// residual like x; weight, bias: [n] of x's dtype or float32 (bias: LayerNorm
// only). Returns {y, sum} (sum undefined without residual). Checks its
// arguments as the operators do (throws on bad ones).
std::array<at::Tensor, 2> norm_inference(bool rms, const at::Tensor& x,
                                         const c10::optional<at::Tensor>& residual,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias, double eps);

}  // namespace pyllm::cpu
