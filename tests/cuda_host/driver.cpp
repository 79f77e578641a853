// C entry points into the host-model build of the CUDA kernels, for ctypes
// (tests/cuda_host_kernels.py). Each forwards to the same launch function
// the CUDA operators call, so launch configuration is tested too.

#include <cstdint>

#include "cuda/gemm_kernel.h"
#include "cuda/norm_kernel.h"

using namespace pyllm;
using namespace pyllm::cuda;

extern "C" {

int host_norm_forward(const void* x, const void* residual, const void* weight, const void* bias,
                      void* y, void* sum, float* mean, float* rstd, int64_t rows, int64_t n,
                      float eps, int x_type, int param_type, int rms) {
  const NormForward a{x,    residual, weight, bias, y, sum, mean, rstd, rows, n, eps,
                      static_cast<DType>(x_type), static_cast<DType>(param_type), rms != 0};
  return launch_norm_forward(a, nullptr);
}

int64_t host_norm_backward_chunks(int64_t rows, int64_t n) { return norm_backward_chunks(rows, n); }

int host_norm_backward(const void* grad_y, const void* x, const float* mean, const float* rstd,
                       const void* weight, const void* grad_sum, void* grad_x,
                       float* partial_weight, float* partial_bias, int64_t rows, int64_t n,
                       int x_type, int param_type, int rms) {
  const NormBackward a{grad_y, x, mean, rstd, weight, grad_sum, grad_x, partial_weight,
                       partial_bias, rows, n, static_cast<DType>(x_type),
                       static_cast<DType>(param_type), rms != 0};
  return launch_norm_backward(a, nullptr);
}

int host_column_sum(const float* partial, int64_t chunks, int64_t n, float* out) {
  return launch_column_sum(partial, chunks, n, out, nullptr);
}

int host_gemm(const void* a, const void* b, const void* b2, const float* bias, const float* bias2,
              const void* grad, void* out, void* out2, int64_t m, int64_t n, int64_t k,
              int64_t lda, int64_t ldb, int64_t ldc, int64_t ldg, int type, int activation, int epilogue) {
  const Gemm g{a, b, b2, bias, bias2, grad, out, out2, m, n, k, lda, ldb, ldc, ldg,
               static_cast<DType>(type), static_cast<Activation>(activation),
               static_cast<GemmEpilogue>(epilogue)};
  return launch_gemm(g, nullptr);
}

}  // extern "C"
