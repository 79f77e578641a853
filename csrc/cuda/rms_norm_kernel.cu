// RMSNorm forward on CUDA: one CTA per row (grid-stride over rows), 16-byte
// vector loads when the row allows them, fp32 sum of squares reduced with warp
// shuffles then across warps through shared memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rms_norm_kernel.h"

namespace pyllm::cuda {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Sum over the CTA; every thread gets the total. blockDim.x is a multiple of 32.
__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? scratch[lane] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // scratch is reused by the next row
  return v;
}

// VEC elements per access; n % VEC == 0 and rows are VEC-aligned when VEC > 1.
template <typename T, typename W, int VEC>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight,
                                        T* __restrict__ y, float* __restrict__ rstd_out,
                                        int64_t rows, int64_t n, float eps) {
  __shared__ float scratch[32];
  using XPack = Pack<T, VEC>;
  using WPack = Pack<W, VEC>;
  const int64_t packs = n / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const XPack* xr = reinterpret_cast<const XPack*>(x + row * n);
    XPack* yr = reinterpret_cast<XPack*>(y + row * n);
    float ss = 0.f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const XPack xv = xr[p];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(xv.v[j]);
        ss += f * f;
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(n) + eps);
    if (threadIdx.x == 0) rstd_out[row] = rstd;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const XPack xv = xr[p];
      XPack out;
      if (weight != nullptr) {
        const WPack wv = reinterpret_cast<const WPack*>(weight)[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          out.v[j] = from_float<T>(to_float(xv.v[j]) * rstd * to_float(wv.v[j]));
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(to_float(xv.v[j]) * rstd);
      }
      yr[p] = out;
    }
  }
}

template <typename T, typename W>
cudaError_t launch_typed(const RmsNormForward& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T) < 16 / sizeof(W) ? 16 / sizeof(T) : 16 / sizeof(W);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vectorised = a.n % kVec == 0 && aligned(a.x) && aligned(a.y) &&
                          (a.weight == nullptr || aligned(a.weight));
  const int64_t packs = vectorised ? a.n / kVec : a.n;
  int threads = 32;
  while (threads < 1024 && threads < packs) threads *= 2;
  const int64_t grid = a.rows < 65535 * 8 ? a.rows : 65535 * 8;
  if (grid == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(a.x);
  const W* w = static_cast<const W*>(a.weight);
  T* y = static_cast<T*>(a.y);
  if (vectorised) {
    rms_norm_forward_kernel<T, W, kVec>
        <<<static_cast<unsigned>(grid), threads, 0, stream>>>(x, w, y, a.rstd, a.rows, a.n, a.eps);
  } else {
    rms_norm_forward_kernel<T, W, 1>
        <<<static_cast<unsigned>(grid), threads, 0, stream>>>(x, w, y, a.rstd, a.rows, a.n, a.eps);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm_forward(const RmsNormForward& a, cudaStream_t stream) {
  switch (a.x_type) {
    case DType::f32: return launch_typed<float, float>(a, stream);
    case DType::bf16:
      return a.weight_type == DType::f32 ? launch_typed<__nv_bfloat16, float>(a, stream)
                                         : launch_typed<__nv_bfloat16, __nv_bfloat16>(a, stream);
    case DType::f16:
      return a.weight_type == DType::f32 ? launch_typed<__half, float>(a, stream)
                                         : launch_typed<__half, __half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyllm::cuda
