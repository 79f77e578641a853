// The GEMM epilogue's activations and their derivatives, on the SIMD layer
// (compiled per ISA; the including file defines PYLLM_ISA).
//
// Written in forms without cancellation where the result is small:
//   silu(z)      = z * sigmoid(z),   sigmoid(z) = 1 / (1 + 2^(-z log2 e))
//   gelu_tanh(z) = z * sigmoid(2u),  u = sqrt(2/pi) (z + 0.044715 z^3)
//                  (0.5 (1 + tanh u) = sigmoid(2u), no 1 + tanh cancellation)
//   gelu(z)      = z * Phi(z),       Phi(z) = erfc(-z/sqrt 2) / 2, with erfc of
//                  a non-negative argument from its Chebyshev fit (relative
//                  error < 1.2e-7) and 1 - erfc/2 for z > 0.
#pragma once

#include "gemm.h"
#include "simd.h"

namespace pyllm::cpu::PYLLM_ISA {
namespace {

using namespace simd;

constexpr float kLog2eAct = 1.4426950408889634f;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// sigmoid(z) and 1 - sigmoid(z), both from e = e^-|z| <= 1 (no overflow,
// and no cancellation in 1 - s where s is near 1): with r = 1 / (1 + e) the
// pair is (r, e r) for z >= 0 and (e r, r) for z < 0.
inline void sigmoid_pair(V z, V& s, V& one_minus_s) {
  const V e = exp(sub(zero(), abs(z)));
  const V r = div(set1(1.f), add(set1(1.f), e));
  const V er = mul(e, r);
  s = select_negative(z, er, r);
  one_minus_s = select_negative(z, r, er);
}

inline V sigmoid(V z) {
  V s, t;
  sigmoid_pair(z, s, t);
  return s;
}

// erfc(x) for x >= 0 (Numerical Recipes' erfcc: t exp(-x^2 + P(t)), t = 1/(1 + x/2)).
inline V erfc_nonnegative(V x) {
  const V t = div(set1(1.f), fma(x, set1(0.5f), set1(1.f)));
  V p = set1(0.17087277f);
  p = fma(p, t, set1(-0.82215223f));
  p = fma(p, t, set1(1.48851587f));
  p = fma(p, t, set1(-1.13520398f));
  p = fma(p, t, set1(0.27886807f));
  p = fma(p, t, set1(-0.18628806f));
  p = fma(p, t, set1(0.09678418f));
  p = fma(p, t, set1(0.37409196f));
  p = fma(p, t, set1(1.00002368f));
  p = fma(p, t, set1(-1.26551223f));
  const V exponent = sub(p, mul(x, x));
  return mul(t, exp(exponent));
}

// Phi(z), the standard normal CDF.
inline V normal_cdf(V z) {
  const V x = mul(z, set1(kInvSqrt2));
  const V half_erfc = mul(erfc_nonnegative(abs(x)), set1(0.5f));  // tail mass
  return select_negative(z, half_erfc, sub(set1(1.f), half_erfc));
}

inline V gelu_tanh_u(V z) {  // u = sqrt(2/pi) (z + 0.044715 z^3)
  return mul(set1(kSqrt2OverPi), fma(mul(mul(z, z), z), set1(kGeluCubic), z));
}

inline V gelu_tanh_gate(V z) {  // sigmoid(2u)
  const V u = gelu_tanh_u(z);
  return sigmoid(add(u, u));
}

[[gnu::always_inline]] inline V activate(Activation act, V z) {
  switch (act) {
    case Activation::none: return z;
    case Activation::silu: return mul(z, sigmoid(z));
    case Activation::gelu_tanh: return mul(z, gelu_tanh_gate(z));
    case Activation::gelu: return mul(z, normal_cdf(z));
  }
  return z;
}

// silu(z) and d silu(z) / dz from one sigmoid: activate(silu, z) and
// activate_derivative(silu, z), the same values.
inline void silu_and_derivative(V z, V& silu, V& derivative) {
  V s, t;
  sigmoid_pair(z, s, t);
  silu = mul(z, s);
  derivative = mul(s, fma(z, t, set1(1.f)));
}

// d activate(z) / dz.
inline V activate_derivative(Activation act, V z) {
  switch (act) {
    case Activation::none: return set1(1.f);
    case Activation::silu: {  // s (1 + z (1 - s))
      V s, t;
      sigmoid_pair(z, s, t);
      return mul(s, fma(z, t, set1(1.f)));
    }
    case Activation::gelu_tanh: {  // s + 2 z s (1 - s) u'(z), s = sigmoid(2u)
      const V u = gelu_tanh_u(z);
      V s, t;
      sigmoid_pair(add(u, u), s, t);
      const V du = mul(set1(kSqrt2OverPi), fma(mul(z, z), set1(3.f * kGeluCubic), set1(1.f)));
      return fma(mul(add(z, z), mul(s, t)), du, s);
    }
    case Activation::gelu: {  // Phi(z) + z phi(z)
      const V phi = mul(set1(kInvSqrt2Pi), exp(mul(mul(z, z), set1(-0.5f))));
      return fma(z, phi, normal_cdf(z));
    }
  }
  return set1(1.f);
}

}  // namespace
}  // namespace pyllm::cpu::PYLLM_ISA
