// Cross-entropy on CUDA: a CTA per row (a grid-stride loop past the grid's
// limit), three strided passes over the vocabulary with CTA-wide reductions:
// the max and the sum of z, the sum of exp(z - max), then the gradient
// p (1 + 2 z_loss lse) - eps / V - (1 - eps) onehot (times the softcap's
// derivative). All in fp32; a NaN or +inf logit, or a target outside the
// vocabulary, gives a NaN row (nothing is read outside it).

#include "cross_entropy_kernel.h"

#include <limits>

#include "element.h"

namespace pyllm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;
constexpr unsigned kFullMask = 0xffffffffu;

// A CTA-wide reduction (sum or max); every thread gets the result. scratch:
// 32 floats; two barriers, so it can be reused at once.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float o = __shfl_xor_sync(kFullMask, v, offset);
    v = kMax ? (o > v || o != o ? o : v) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const float identity = kMax ? -std::numeric_limits<float>::infinity() : 0.f;
  v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : identity;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float o = __shfl_xor_sync(kFullMask, v, offset);
    v = kMax ? (o > v || o != o ? o : v) : v + o;
  }
  __syncthreads();
  return v;
}

__device__ __forceinline__ float softcapped(float x, float softcap) {
  return softcap > 0.f ? softcap * tanhf(x / softcap) : x;
}

template <class T>
__global__ void cross_entropy_kernel(CrossEntropy a) {
  __shared__ float scratch[32];
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t target = a.target[row];
    const T* x = static_cast<const T*>(a.logits) + row * a.logits_stride;
    T* grad = a.grad ? static_cast<T*>(a.grad) + row * a.vocab : nullptr;
    if (target == a.ignore_index) {
      if (threadIdx.x == 0) a.loss[row] = a.lse[row] = 0.f;
      if (grad)
        for (int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) grad[j] = from_float<T>(0.f);
      continue;
    }
    float m = -inf, sum_z = 0.f;
    for (int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
      const float z = softcapped(to_float(x[j]), a.softcap);
      m = (z > m || z != z) ? z : m;
      sum_z += z;
    }
    m = block_reduce<true>(m, scratch);
    sum_z = block_reduce<false>(sum_z, scratch);
    const bool valid = target >= 0 && target < a.vocab;
    const bool bad = !valid || sum_z != sum_z || m == inf || m == -inf || m != m;
    float s = 0.f;
    if (!bad)
      for (int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x)
        s += expf(softcapped(to_float(x[j]), a.softcap) - m);
    s = block_reduce<false>(s, scratch);
    const float lse = m + logf(s);
    const float eps = a.label_smoothing;
    const float zt = softcapped(to_float(x[valid ? target : 0]), a.softcap);
    if (threadIdx.x == 0) {
      a.loss[row] = bad ? nan
                        : (1.f - eps) * (lse - zt) +
                              (eps > 0.f ? eps * (lse - sum_z / static_cast<float>(a.vocab))
                                         : 0.f) +
                              a.z_loss * lse * lse;
      a.lse[row] = bad ? nan : lse;
    }
    if (!grad) continue;
    const float zscale = 2.f * a.z_loss * lse;  // the z-loss's share, added apart
    const float smooth = eps / static_cast<float>(a.vocab);
    for (int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
      const float z = softcapped(to_float(x[j]), a.softcap);
      const float p = expf(z - lse);
      float g = (p - smooth - (j == target ? 1.f - eps : 0.f)) + zscale * p;
      if (a.softcap > 0.f) {
        const float t = z / a.softcap;
        g *= 1.f - t * t;
      }
      grad[j] = from_float<T>(bad ? nan : g);
    }
  }
}

}  // namespace

cudaError_t launch_cross_entropy(const CrossEntropy& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return with_element_type(a.type, [&](auto zero) {
    using T = decltype(zero);
    auto kernel = &cross_entropy_kernel<T>;
    const unsigned grid = static_cast<unsigned>(a.rows < kMaxGrid ? a.rows : kMaxGrid);
    return PYLLM_LAUNCH(kernel, dim3(grid), dim3(kThreads), 0, stream, a);
  });
}

}  // namespace pyllm::cuda
