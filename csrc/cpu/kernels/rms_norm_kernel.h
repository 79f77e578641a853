// RMSNorm row kernels, written once and compiled per ISA: the including file
// defines PYLLM_ISA (generic, avx2, avx512) and is built with that ISA's flags,
// so the loops below vectorise to SSE2, AVX2 or AVX-512 code.
//
// Forward, per row: one read of x for the sum of squares (fp32), then x is
// read again from L1/L2 (a row of up to 64 KiB) and y written once.
#pragma once

#include <cmath>

#include "rms_norm.h"

#ifndef PYLLM_ISA
#error "define PYLLM_ISA before including rms_norm_kernel.h"
#endif

namespace pyllm::cpu::PYLLM_ISA {
namespace {

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f32(x[i]);
    acc += v * v;
  }
  return acc;
}

template <typename T, typename W>
void forward_rows(const RmsNormForward& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const W* w = static_cast<const W*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    T* y = static_cast<T*>(a.y) + r * n;
    const float rstd = 1.f / std::sqrt(sum_of_squares(x, n) / static_cast<float>(n) + a.eps);
    a.rstd[r] = rstd;
    if (w != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = from_f32<T>(to_f32(x[i]) * rstd * to_f32(w[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = from_f32<T>(to_f32(x[i]) * rstd);
    }
  }
}

// With g = grad_y * w and xhat = x * rstd:
//   grad_x = rstd * (g - xhat * mean(g * xhat)),  grad_w = sum_rows grad_y * xhat.
template <typename T, typename W>
void backward_rows(const RmsNormBackward& a, int64_t begin, int64_t end, float* gw) {
  const int64_t n = a.n;
  const W* w = static_cast<const W*>(a.weight);
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    const T* dy = static_cast<const T*>(a.grad_y) + r * n;
    const float rstd = a.rstd[r];
    if (a.grad_x != nullptr) {
      float dot = 0.f;  // sum(g * x)
      if (w != nullptr) {
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < n; ++i) dot += to_f32(dy[i]) * to_f32(w[i]) * to_f32(x[i]);
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < n; ++i) dot += to_f32(dy[i]) * to_f32(x[i]);
      }
      const float c = dot * rstd * rstd * inv_n;  // mean(g * xhat) * rstd
      T* dx = static_cast<T*>(a.grad_x) + r * n;
      if (w != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
          dx[i] = from_f32<T>(rstd * (to_f32(dy[i]) * to_f32(w[i]) - to_f32(x[i]) * c));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
          dx[i] = from_f32<T>(rstd * (to_f32(dy[i]) - to_f32(x[i]) * c));
      }
    }
    if (gw != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gw[i] += to_f32(dy[i]) * to_f32(x[i]) * rstd;
    }
  }
}

template <template <typename, typename> class K, typename... Args>
void dispatch_types(DType x_type, DType w_type, Args&&... args) {
  // The weight has the input's type or float32 (mixed precision).
  switch (x_type) {
    case DType::f32: return K<float, float>::run(args...);
    case DType::bf16:
      return w_type == DType::f32 ? K<bf16, float>::run(args...) : K<bf16, bf16>::run(args...);
    case DType::f16:
      return w_type == DType::f32 ? K<f16, float>::run(args...) : K<f16, f16>::run(args...);
  }
}

template <typename T, typename W>
struct Forward {
  static void run(const RmsNormForward& a, int64_t b, int64_t e) { forward_rows<T, W>(a, b, e); }
};
template <typename T, typename W>
struct Backward {
  static void run(const RmsNormBackward& a, int64_t b, int64_t e, float* gw) {
    backward_rows<T, W>(a, b, e, gw);
  }
};

}  // namespace

void rms_norm_forward(const RmsNormForward& a, int64_t begin, int64_t end) {
  dispatch_types<Forward>(a.x_type, a.weight_type, a, begin, end);
}

void rms_norm_backward(const RmsNormBackward& a, int64_t begin, int64_t end, float* gw) {
  dispatch_types<Backward>(a.x_type, a.weight_type, a, begin, end, gw);
}

}  // namespace pyllm::cpu::PYLLM_ISA
