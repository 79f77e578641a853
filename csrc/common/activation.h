// The activations of pyllm::linear's epilogue, shared by the CPU and CUDA
// kernels (plain C++: the ISA kernels and the device code include it).
// Names as in the op: none, gelu (erf), gelu_tanh, silu.
#pragma once

namespace pyllm {

enum class Activation : int { none = 0, gelu = 1, gelu_tanh = 2, silu = 3 };

}  // namespace pyllm
