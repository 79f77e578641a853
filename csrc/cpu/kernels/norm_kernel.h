// LayerNorm / RMSNorm row kernels, written once over the SIMD layer and
// compiled per ISA (the including file defines PYLLM_ISA).
//
// Forward, per row: the first pass reads x (and the residual, writing the
// rounded sum) from memory and accumulates the statistics in fp32; later
// passes re-read the row from L1/L2 (rows up to 64 KiB). LayerNorm's variance
// is the mean of squared deviations (a second pass), not E[x^2] - E[x]^2.
//
// Backward, with xhat = (x - mean) * rstd and g = grad_y * weight:
//   grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))  [+ grad_sum]
// (RMSNorm: no mean(g) term, xhat = x * rstd); the weight and bias gradients
// are accumulated in fp32 by the caller's row chunks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "norm.h"
#include "simd.h"

namespace pyllm::cpu::PYLLM_ISA {
namespace {

using namespace simd;

// v = x (+ residual), rounded to T, the way the sum is stored.
template <typename T, bool kResidual>
inline V load_input(const T* x, const T* r, T* sum, int64_t i, int count) {
  if constexpr (!kResidual) {
    return count == kLanes ? load(x + i) : load(x + i, count);
  } else {
    if (count == kLanes) {
      const V s = add(load(x + i), load(r + i));
      store(sum + i, s);
      return std::is_same_v<T, float> ? s : load(sum + i);
    }
    const V s = add(load(x + i, count), load(r + i, count));
    store(sum + i, s, count);
    return std::is_same_v<T, float> ? s : load(sum + i, count);
  }
}

template <typename P>
inline V load_param(const P* p, int64_t i, int count, V fallback) {
  if (p == nullptr) return fallback;
  return count == kLanes ? load(p + i) : load(p + i, count);
}

template <typename T>
inline V load_row(const T* p, int64_t i, int count) {
  return count == kLanes ? load(p + i) : load(p + i, count);
}

template <typename T>
inline void store_row(T* p, int64_t i, int count, V v) {
  if (count == kLanes) {
    store(p + i, v);
  } else {
    store(p + i, v, count);
  }
}

// 1/sqrt(v) rounded once to float (the gradients' cancellation for tiny rows
// amplifies any error in rstd).
inline float inverse_sqrt(double v) { return static_cast<float>(1.0 / std::sqrt(v)); }

inline int lanes_left(int64_t n, int64_t i) {
  return n - i >= kLanes ? kLanes : static_cast<int>(n - i);
}

// The parameters as fp32, twice: the copies sit 2 KiB apart modulo 4 KiB, and
// each row reads the copy whose offset is farthest from its output row's. A
// load whose address matches a recent store's modulo 4 KiB ("4K aliasing")
// waits for that store; with weight, bias and output rows at unlucky offsets
// this halved LayerNorm's speed.
struct ParamCopies {
  float* copy[2];  // each: weight [n] then bias [n]
  float* data = nullptr;
  int64_t size = 0;

  template <typename P>
  void fill(const P* w, const P* b, int64_t n) {
    const int64_t per_copy = 2 * n;
    const int64_t need = 2 * per_copy + 2048;  // floats: two copies + room to shift
    if (need > size) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(4096, static_cast<size_t>(need) * 4 / 4096 * 4096 + 4096));
      size = need;
    }
    copy[0] = data;
    // The second copy: past the first, at +2 KiB modulo 4 KiB.
    const int64_t second = (per_copy + 1023) / 1024 * 1024 + 512;
    copy[1] = data + second;
    for (float* c : copy) {
      for (int64_t i = 0; i < n; ++i) c[i] = w != nullptr ? to_f32(w[i]) : 1.f;
      for (int64_t i = 0; i < n; ++i) c[n + i] = b != nullptr ? to_f32(b[i]) : 0.f;
    }
  }

  const float* for_row(const void* out_row) const {
    const auto offset = (reinterpret_cast<uintptr_t>(out_row) - reinterpret_cast<uintptr_t>(copy[0])) & 4095u;
    return offset < 1024 || offset >= 3072 ? copy[1] : copy[0];
  }

  ~ParamCopies() { std::free(data); }
};

ParamCopies& param_copies() {
  static thread_local ParamCopies copies;
  return copies;
}

template <typename T, typename P, bool kRms, bool kResidual>
void forward_rows(const NormForward& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  ParamCopies& params = param_copies();
  params.fill(static_cast<const P*>(a.weight), static_cast<const P*>(a.bias), n);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    const T* res = kResidual ? static_cast<const T*>(a.residual) + r * n : nullptr;
    T* sum = kResidual ? static_cast<T*>(a.sum) + r * n : nullptr;
    T* y = static_cast<T*>(a.y) + r * n;
    const T* src = kResidual ? sum : x;  // what later passes re-read
    const float* w = params.for_row(y);
    const float* b = w + n;

    // Pass 1: sum (LayerNorm) or sum of squares (RMSNorm); two accumulators.
    V acc0 = zero(), acc1 = zero();
    int64_t i = 0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const V v0 = load_input<T, kResidual>(x, res, sum, i, kLanes);
      const V v1 = load_input<T, kResidual>(x, res, sum, i + kLanes, kLanes);
      acc0 = kRms ? fma(v0, v0, acc0) : add(acc0, v0);
      acc1 = kRms ? fma(v1, v1, acc1) : add(acc1, v1);
    }
    for (; i < n; i += kLanes) {
      const int c = lanes_left(n, i);
      const V v = load_input<T, kResidual>(x, res, sum, i, c);
      acc0 = kRms ? fma(v, v, acc0) : add(acc0, v);
    }
    const float total = reduce_add(add(acc0, acc1));
    float mean = 0.f, rstd;
    if constexpr (kRms) {
      rstd = inverse_sqrt(total / static_cast<double>(n) + a.eps);
    } else {
      mean = total / static_cast<float>(n);
      // Pass 2: variance as the mean of squared deviations.
      const V m = set1(mean);
      V var0 = zero(), var1 = zero();
      i = 0;
      for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
        const V d0 = sub(load(src + i), m), d1 = sub(load(src + i + kLanes), m);
        var0 = fma(d0, d0, var0);
        var1 = fma(d1, d1, var1);
      }
      float tail = 0.f;  // the last < 2 * kLanes elements, one at a time
      for (; i < n; ++i) {
        const float d = to_f32(src[i]) - mean;
        tail += d * d;
      }
      rstd = inverse_sqrt((reduce_add(add(var0, var1)) + tail) / static_cast<double>(n) + a.eps);
      if (a.mean != nullptr) a.mean[r] = mean;
    }
    if (a.rstd != nullptr) a.rstd[r] = rstd;  // null: an inference call keeps no statistics

    // Last pass: y = (x - mean) * rstd * w + b.
    const V m = set1(mean), s = set1(rstd);
    for (i = 0; i < n; i += kLanes) {
      const int c = lanes_left(n, i);
      const V xhat = mul(sub(load_row(src, i, c), m), s);
      store_row(y, i, c, fma(xhat, load_row(w, i, c), load_row(b, i, c)));
    }
  }
}

template <typename T, typename P, bool kRms>
void backward_rows(const NormBackward& a, int64_t begin, int64_t end, float* gw, float* gb) {
  const int64_t n = a.n;
  const P* w = static_cast<const P*>(a.weight);
  const V one = set1(1.f);
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    const T* dy = static_cast<const T*>(a.grad_y) + r * n;
    const float mean = kRms ? 0.f : a.mean[r];
    const V m = set1(mean), s = set1(a.rstd[r]);
    if (a.grad_x != nullptr) {
      // Pass 1: sum(g) and sum(g * xhat).
      V sum_g = zero(), sum_gx = zero();
      for (int64_t i = 0; i < n; i += kLanes) {
        const int c = lanes_left(n, i);
        const V xhat = mul(sub(load_row(x, i, c), m), s);
        const V g = mul(load_row(dy, i, c), load_param(w, i, c, one));
        sum_g = add(sum_g, g);
        sum_gx = fma(g, xhat, sum_gx);
      }
      // Masked-off lanes loaded zeros: g = 0 there, so they add nothing.
      const V c1 = set1(kRms ? 0.f : reduce_add(sum_g) * inv_n);
      const V c2 = set1(reduce_add(sum_gx) * inv_n);
      // Pass 2: grad_x.
      T* dx = static_cast<T*>(a.grad_x) + r * n;
      const T* extra = static_cast<const T*>(a.grad_sum);
      for (int64_t i = 0; i < n; i += kLanes) {
        const int c = lanes_left(n, i);
        const V xhat = mul(sub(load_row(x, i, c), m), s);
        const V g = mul(load_row(dy, i, c), load_param(w, i, c, one));
        V d = mul(s, fnma(xhat, c2, sub(g, c1)));  // one rounding where g and xhat*c2 cancel
        if (extra != nullptr) d = add(d, load_row(extra + r * n, i, c));
        store_row(dx, i, c, d);
      }
    }
    if (gw != nullptr || gb != nullptr) {
      for (int64_t i = 0; i < n; i += kLanes) {
        const int c = lanes_left(n, i);
        const V g = load_row(dy, i, c);
        if (gw != nullptr) {
          const V xhat = mul(sub(load_row(x, i, c), m), s);
          store_row(gw, i, c, fma(g, xhat, load_row(gw, i, c)));
        }
        if (gb != nullptr) store_row(gb, i, c, add(load_row(gb, i, c), g));
      }
    }
  }
}

// Runs K<T, P> for the element types: parameters have the input's type or
// float32 (mixed precision).
template <template <typename, typename> class K, typename... Args>
void dispatch_types(DType x_type, DType param_type, Args&&... args) {
  switch (x_type) {
    case DType::f32: return K<float, float>::run(args...);
    case DType::bf16:
      return param_type == DType::f32 ? K<bf16, float>::run(args...) : K<bf16, bf16>::run(args...);
    case DType::f16:
      return param_type == DType::f32 ? K<f16, float>::run(args...) : K<f16, f16>::run(args...);
  }
}

template <typename T, typename P>
struct Forward {
  static void run(const NormForward& a, int64_t b, int64_t e) {
    const bool residual = a.residual != nullptr;
    if (a.rms) {
      residual ? forward_rows<T, P, true, true>(a, b, e) : forward_rows<T, P, true, false>(a, b, e);
    } else {
      residual ? forward_rows<T, P, false, true>(a, b, e) : forward_rows<T, P, false, false>(a, b, e);
    }
  }
};

template <typename T, typename P>
struct Backward {
  static void run(const NormBackward& a, int64_t b, int64_t e, float* gw, float* gb) {
    a.rms ? backward_rows<T, P, true>(a, b, e, gw, gb) : backward_rows<T, P, false>(a, b, e, gw, gb);
  }
};

}  // namespace

void norm_forward(const NormForward& a, int64_t begin, int64_t end) {
  dispatch_types<Forward>(a.x_type, a.param_type, a, begin, end);
}

void norm_backward(const NormBackward& a, int64_t begin, int64_t end, float* gw, float* gb) {
  dispatch_types<Backward>(a.x_type, a.param_type, a, begin, end, gw, gb);
}

}  // namespace pyllm::cpu::PYLLM_ISA
