// Rotary position embedding on CUDA, in place on q and k: a CTA per token
// (a grid-stride loop past the grid's limit) reads its position and rotates
// every (head, pair) of q and then of k, one pair per thread, in fp32,
// rounding once. A position outside the tables rotates by NaN; nothing is
// read outside them.

#include "rotary_kernel.h"

#include <limits>

#include "element.h"

namespace pyllm::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 1 << 20;

template <class T>
__device__ __forceinline__ void rotate_pairs(const Rotary& r, const RotaryTensor& x, int64_t b,
                                             int64_t s, const float* cos, const float* sin,
                                             bool in_table) {
  T* base = static_cast<T*>(x.data) + b * x.batch_stride + s * x.seq_stride;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t w = threadIdx.x; w < x.heads * r.half; w += blockDim.x) {
    const int64_t h = w / r.half, i = w - h * r.half;
    const float c = in_table ? cos[i] : nan;
    const float sn = in_table ? (r.conjugate ? -sin[i] : sin[i]) : nan;
    T* head = base + h * x.head_stride;
    T* p1 = head + rotary_first(r, i);
    T* p2 = head + rotary_second(r, i);
    const float x1 = to_float(*p1), x2 = to_float(*p2);
    *p1 = from_float<T>(x1 * c - x2 * sn);
    *p2 = from_float<T>(x2 * c + x1 * sn);
  }
}

template <class T>
__global__ void rotary_kernel(Rotary r) {
  for (int64_t t = blockIdx.x; t < r.batch * r.seq; t += gridDim.x) {
    const int64_t b = t / r.seq, s = t - b * r.seq;
    const int64_t pos = r.positions[t];
    const bool in_table = pos >= 0 && pos < r.max_positions;
    const float* cos = r.cos + (in_table ? pos : 0) * r.half;
    const float* sin = r.sin + (in_table ? pos : 0) * r.half;
    rotate_pairs<T>(r, r.q, b, s, cos, sin, in_table);
    rotate_pairs<T>(r, r.k, b, s, cos, sin, in_table);
  }
}

}  // namespace

cudaError_t launch_rotary(const Rotary& r, cudaStream_t stream) {
  const int64_t tokens = r.batch * r.seq;
  if (tokens == 0 || r.half == 0) return cudaSuccess;
  return with_element_type(r.type, [&](auto zero) {
    using T = decltype(zero);
    auto kernel = &rotary_kernel<T>;
    const unsigned grid = static_cast<unsigned>(tokens < kMaxGrid ? tokens : kMaxGrid);
    return PYLLM_LAUNCH(kernel, dim3(grid), dim3(kThreads), 0, stream, r);
  });
}

}  // namespace pyllm::cuda
