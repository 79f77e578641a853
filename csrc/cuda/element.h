// Element types of pyllm's CUDA kernels: conversions to and from fp32, and
// vectors of N elements moved with one aligned load or store.
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "device.h"

namespace pyllm::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T, loaded and stored as one access of sizeof(T) * N bytes.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f with a value of the CUDA element type for `type` (float, __half,
// __nv_bfloat16).
template <class F>
cudaError_t with_element_type(DType type, F&& f) {
  switch (type) {
    case DType::f32: return f(float{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyllm::cuda
