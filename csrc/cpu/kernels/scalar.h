// Element types of the CPU kernels and their conversions to and from float.
// Header-only, no torch: it is compiled into every ISA variant, so everything
// here has internal linkage (static inline) and never clashes across them.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../common/dtype.h"

namespace pyllm::cpu {

using pyllm::DType;

struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;

static inline float to_f32(float v) { return v; }
static inline float to_f32(f16 v) { return static_cast<float>(v); }
static inline float to_f32(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
static inline T from_f32(float v);

template <>
inline float from_f32<float>(float v) {
  return v;
}
template <>
inline f16 from_f32<f16>(float v) {
  return static_cast<f16>(v);
}
// Round to nearest even; NaN stays a (quiet) NaN.
template <>
inline bf16 from_f32<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}

}  // namespace pyllm::cpu
