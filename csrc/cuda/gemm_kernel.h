// GEMM with a fused epilogue on CUDA tensor cores: the interface between the
// operators (csrc/cuda/linear.cpp, which includes torch) and the kernel
// (gemm_kernel.cu, which does not).
//
//   acc  = a @ b^T (+ bias)        a [m, k], b [n, k], both k-contiguous
//   acc2 = a @ b2^T (+ bias2)      only for the SwiGLU epilogues
// and the epilogue writes, per element of [m, n]:
//   forward       out = act(acc)
//   swiglu        out = silu(acc) * acc2
//   act_grad      out = grad * act'(acc)                (the pre-activation gradient)
//   swiglu_grad   out = grad * acc2 * silu'(acc), out2 = grad * silu(acc)
// fp16/bf16 operands and outputs, fp32 accumulation and bias.
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "activation.h"
#include "device.h"

namespace pyllm::cuda {

enum class GemmEpilogue : int { forward = 0, swiglu = 1, act_grad = 2, swiglu_grad = 3 };

struct Gemm {
  const void* a;       // [m, k] rows lda apart
  const void* b;       // [n, k] rows ldb apart
  const void* b2;      // [n, k] rows ldb apart, SwiGLU epilogues only
  const float* bias;   // [n] or null
  const float* bias2;  // [n] or null, SwiGLU epilogues only
  const void* grad;    // [m, n] rows ldg apart, gradient epilogues only
  void* out;           // [m, n] rows ldc apart
  void* out2;          // [m, n] rows ldc apart, swiglu_grad only
  int64_t m, n, k;
  int64_t lda, ldb, ldc, ldg;
  DType type;  // f16 or bf16: a, b, b2, grad, out, out2
  Activation activation;
  GemmEpilogue epilogue;
};

// Launches on `stream`; cudaErrorInvalidValue for an fp32 type.
cudaError_t launch_gemm(const Gemm& args, cudaStream_t stream);

}  // namespace pyllm::cuda
