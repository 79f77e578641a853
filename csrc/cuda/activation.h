// The activations pyllm's CUDA GEMM epilogues apply, and their derivatives,
// in fp32. Names as in the linear op: none, gelu (erf), gelu_tanh, silu.
#pragma once

#include "../common/activation.h"
#include "device.h"

namespace pyllm::cuda {

using pyllm::Activation;

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kGeluCubic = 0.044715f;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float activate(Activation act, float x) {
  switch (act) {
    case Activation::gelu: return 0.5f * x * (1.f + erff(x * kSqrtHalf));
    case Activation::gelu_tanh:
      return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x)));
    case Activation::silu: return x * sigmoid(x);
    case Activation::none: break;
  }
  return x;
}

// d activate(x) / dx.
__device__ __forceinline__ float activate_derivative(Activation act, float x) {
  switch (act) {
    case Activation::gelu:
      return 0.5f * (1.f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    case Activation::gelu_tanh: {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x));
      return 0.5f * (1.f + t) +
             0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluCubic * x * x);
    }
    case Activation::silu: {
      const float s = sigmoid(x);
      return s * (1.f + x * (1.f - s));
    }
    case Activation::none: break;
  }
  return 1.f;
}

}  // namespace pyllm::cuda
