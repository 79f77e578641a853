// A small SIMD layer for the CPU kernels, one implementation per ISA.
//
// Included by a kernel header that is compiled once per ISA (the including
// file defines PYLLM_ISA and is built with that ISA's flags, see setup.py), it
// defines pyllm::cpu::PYLLM_ISA::simd with:
//   V            a vector of kLanes floats (16 on AVX-512, 8 on AVX2 and the
//                portable fallback, which the compiler maps to SSE2);
//   load/store   from/to float, bf16 and f16 memory, converting to/from float
//                (bf16 stores round to nearest even; NaN stays NaN), with
//                `count` variants for the tail of a row (count < kLanes);
//   arithmetic   add, sub, mul, div, fma (a*b+c), fnma (c-a*b), max, abs,
//                select_negative, set1, zero,
//                exp2 (2^x; exactly 0 for very negative x and -inf),
//                exp (e^x with the argument reduced in two parts, for the
//                activations: exp2(x log2 e) would round x log2 e first and
//                lose |x| 2^-24 of relative accuracy);
//   reductions   reduce_add, reduce_max (NaN if any lane is NaN), and
//                reduce_add_lanes (kLanes sums at once).
// Everything has internal linkage, so the ISA variants never clash.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "scalar.h"

#ifndef PYLLM_ISA
#error "define PYLLM_ISA before including simd.h"
#endif

namespace pyllm::cpu::PYLLM_ISA::simd {

// Taylor coefficients of 2^f = e^(f ln 2): (ln 2)^k / k!.
constexpr float exp2_c1 = 0.6931471805599453f;
constexpr float exp2_c2 = 0.2402265069591007f;
constexpr float exp2_c3 = 0.05550410866482158f;
constexpr float exp2_c4 = 0.009618129107628477f;
constexpr float exp2_c5 = 0.0013333558146428443f;
constexpr float exp2_c6 = 0.00015403530393381606f;
constexpr float exp2_c7 = 1.525273380405984e-05f;
// e^x = 2^n e^r, x = n ln2 + r, |r| <= ln2 / 2: ln2 in two parts (Cody-Waite;
// n ln2_hi is exact for |n| < 2^15), and e^r by its degree-7 Taylor
// polynomial (truncation error 6e-9 relative).
constexpr float kExpLn2Hi = 0.693359375f;
constexpr float kExpLn2Lo = -2.12194440e-4f;
constexpr float kExpLog2e = 1.4426950408889634f;
constexpr float exp_c2 = 0.5f, exp_c3 = 1.f / 6, exp_c4 = 1.f / 24, exp_c5 = 1.f / 120,
                exp_c6 = 1.f / 720, exp_c7 = 1.f / 5040;

#if defined(__AVX512F__)

constexpr int kLanes = 16;
using V = __m512;

static inline V zero() { return _mm512_setzero_ps(); }
static inline V set1(float a) { return _mm512_set1_ps(a); }
static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
static inline V div(V a, V b) { return _mm512_div_ps(a, b); }
static inline V abs(V a) { return _mm512_abs_ps(a); }
// a where z < 0, else b.
static inline V select_negative(V z, V a, V b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
}
static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
static inline float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
static inline float reduce_max(V a) {
  if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q)) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(a);
}

// The pieces of exp2 and exp (written once, below): rounding to the nearest
// integer, p 2^n by scalef, and the clamps: below kExp2Min 2^x is exactly 0
// (scalef goes through the subnormals), at 128 it is +inf.
static inline V min(V a, V b) { return _mm512_min_ps(a, b); }
static inline V round_nearest(V x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline V times_pow2(V p, V n) { return _mm512_scalef_ps(p, n); }
constexpr float kExp2Min = -200.f;

// r[j] = reduce_add(x[j]) for the kLanes vectors x: sixteen horizontal sums
// at once through a transpose-and-add tree (about 3 instructions per sum).
static inline V reduce_add_lanes(const V* x) {
  V c[4];
  for (int g = 0; g < 4; ++g) {
    const V* y = x + 4 * g;
    const V a = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
    const V b = _mm512_add_ps(_mm512_unpacklo_ps(y[2], y[3]), _mm512_unpackhi_ps(y[2], y[3]));
    const __m512d ad = _mm512_castps_pd(a), bd = _mm512_castps_pd(b);
    // Each 128-bit lane L: (sum of lane L of y[0], ..., of y[3]).
    c[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ad, bd)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(ad, bd)));
  }
  const V e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const V e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// In place: r[j][i] <- r[i][j] for the 16 x 16 block r[0..15].
static inline void transpose16(V* r) {
  V t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane L: rows 4i..4i+3 of column 4L + c.
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const V a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const V b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const V e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const V f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(a, e, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xDD);
  }
}

static inline __mmask16 tail_mask(int count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

static inline V load(const float* p) { return _mm512_loadu_ps(p); }
static inline V load(const float* p, int count) { return _mm512_maskz_loadu_ps(tail_mask(count), p); }
static inline V widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline V load(const bf16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline V load(const bf16* p, int count) {
  return widen_bf16(_mm256_maskz_loadu_epi16(tail_mask(count), p));
}
static inline V load(const f16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline V load(const f16* p, int count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(count), p));
}

static inline __m256i narrow_bf16(V v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
#endif
}
static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
static inline void store(float* p, V v, int count) { _mm512_mask_storeu_ps(p, tail_mask(count), v); }
static inline void store(bf16* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v));
}
static inline void store(bf16* p, V v, int count) {
  _mm256_mask_storeu_epi16(p, tail_mask(count), narrow_bf16(v));
}
static inline void store(f16* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline void store(f16* p, V v, int count) {
  _mm256_mask_storeu_epi16(p, tail_mask(count), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

#elif defined(__AVX2__)

constexpr int kLanes = 8;
using V = __m256;

static inline V zero() { return _mm256_setzero_ps(); }
static inline V set1(float a) { return _mm256_set1_ps(a); }
static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
static inline V div(V a, V b) { return _mm256_div_ps(a, b); }
static inline V abs(V a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
static inline V select_negative(V z, V a, V b) {
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
}
static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
static inline float reduce_add(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float reduce_max(V a) {
  if (_mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)))
    return std::numeric_limits<float>::quiet_NaN();
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The pieces of exp2 and exp (written once, below), 2^n built in the
// exponent bits: n is kept in [-127, 128], where n = -127 makes exactly 0 and
// n = 128 makes +inf.
static inline V min(V a, V b) { return _mm256_min_ps(a, b); }
static inline V round_nearest(V x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline V times_pow2(V p, V n) {
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
constexpr float kExp2Min = -127.f;

// r[j] = reduce_add(x[j]) for the 8 vectors x, through horizontal adds.
static inline V reduce_add_lanes(const V* x) {
  const V a = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
  const V b = _mm256_hadd_ps(_mm256_hadd_ps(x[4], x[5]), _mm256_hadd_ps(x[6], x[7]));
  // a = (x0..x3 low-half sums | x0..x3 high-half sums), b likewise for x4..x7.
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

static inline V load(const float* p) { return _mm256_loadu_ps(p); }
static inline V load(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline V load(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
static inline void store(bf16* p, V v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i bits = _mm256_blendv_epi8(rounded, quiet, nan);
  // 32 -> 16 bits per lane (values fit, so unsigned saturation is exact).
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
static inline void store(f16* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

#else  // portable: 8 floats the compiler keeps in SSE2 registers

constexpr int kLanes = 8;
struct V {
  float v[8];
};

static inline V zero() { return V{}; }
static inline V set1(float a) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = a;
  return r;
}
#define PYLLM_SIMD_BINARY(name, expr)        \
  static inline V name(V a, V b) {           \
    V r;                                     \
    for (int i = 0; i < 8; ++i) r.v[i] = expr; \
    return r;                                \
  }
PYLLM_SIMD_BINARY(add, a.v[i] + b.v[i])
PYLLM_SIMD_BINARY(sub, a.v[i] - b.v[i])
PYLLM_SIMD_BINARY(mul, a.v[i] * b.v[i])
PYLLM_SIMD_BINARY(max, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
PYLLM_SIMD_BINARY(div, a.v[i] / b.v[i])
#undef PYLLM_SIMD_BINARY
static inline V fma(V a, V b, V c) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
static inline V fnma(V a, V b, V c) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::fma(-a.v[i], b.v[i], c.v[i]);
  return r;
}
static inline V exp2(V x) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::exp2(x.v[i]);
  return r;
}
static inline V exp(V x) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::exp(x.v[i]);
  return r;
}
static inline V abs(V a) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::fabs(a.v[i]);
  return r;
}
static inline V select_negative(V z, V a, V b) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = z.v[i] < 0.f ? a.v[i] : b.v[i];
  return r;
}
static inline float reduce_add(V a);
static inline V reduce_add_lanes(const V* x) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = reduce_add(x[i]);
  return r;
}
static inline float reduce_add(V a) {
  return ((a.v[0] + a.v[4]) + (a.v[1] + a.v[5])) + ((a.v[2] + a.v[6]) + (a.v[3] + a.v[7]));
}
static inline float reduce_max(V a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = (a.v[i] > m || std::isnan(a.v[i])) && !std::isnan(m) ? a.v[i] : m;
  return m;
}
template <typename T>
static inline V load(const T* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = to_f32(p[i]);
  return r;
}
template <typename T>
static inline void store(T* p, V v) {
  for (int i = 0; i < 8; ++i) p[i] = from_f32<T>(v.v[i]);
}

#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// Clamps keep NaN: max and min return their second operand when either is
// NaN, so x goes second.

// 2^x: x = n + f with n = round(x), |f| <= 1/2, 2^f by its degree-7 Taylor
// polynomial (truncation error 5e-9). Below kExp2Min (and -inf) exactly 0,
// +inf gives +inf, NaN stays NaN.
static inline V exp2(V x) {
  x = min(set1(128.f), max(set1(kExp2Min), x));
  const V n = round_nearest(x);
  const V f = sub(x, n);
  V p = set1(exp2_c7);
  for (float c : {exp2_c6, exp2_c5, exp2_c4, exp2_c3, exp2_c2, exp2_c1, 1.f}) p = fma(p, f, set1(c));
  return times_pow2(p, n);
}

// e^x (see kExpLn2Hi): the argument reduced in two parts, so that x log2 e is
// never rounded as a whole. Clamped to where n = round(x log2 e) stays in
// [kExp2Min, 128] (0 below, +inf above); NaN stays NaN.
static inline V exp(V x) {
  x = min(set1(88.7f), max(set1(kExp2Min * kExpLn2Hi), x));
  const V n = round_nearest(mul(x, set1(kExpLog2e)));
  const V r = fnma(n, set1(kExpLn2Lo), fnma(n, set1(kExpLn2Hi), x));
  V p = set1(exp_c7);
  for (float c : {exp_c6, exp_c5, exp_c4, exp_c3, exp_c2, 1.f, 1.f}) p = fma(p, r, set1(c));
  return times_pow2(p, n);
}
#endif

#if !defined(__AVX512F__)
// Tails through a stack buffer (AVX2 and portable).
template <typename T>
static inline V load(const T* p, int count) {
  T buffer[kLanes];
  std::memset(static_cast<void*>(buffer), 0, sizeof buffer);
  std::memcpy(static_cast<void*>(buffer), p, sizeof(T) * count);
  return load(static_cast<const T*>(buffer));
}
template <typename T>
static inline void store(T* p, V v, int count) {
  T buffer[kLanes];
  store(buffer, v);
  std::memcpy(static_cast<void*>(p), buffer, sizeof(T) * count);
}
#endif

}  // namespace pyllm::cpu::PYLLM_ISA::simd
