// The paged-KV append on CUDA: a CTA per token (a grid-stride loop past the
// grid's limit) writes every (head, element) of its key, rotated in fp32 and
// rounded once when cos is given, and of its value into the token's slot. A
// slot < 0 writes nothing. Each thread reads the input and writes the pages
// (no element is read after another thread wrote it).

#include "paged_kv_kernel.h"

#include "element.h"

namespace pyllm::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 1 << 20;

template <class T>
__global__ void paged_kv_append_kernel(PagedKvAppend a) {
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    const int64_t slot = a.slots[t];
    if (slot < 0) continue;
    const float* cos = a.cos != nullptr ? a.cos + a.positions[t] * a.half : nullptr;
    const float* sin = a.cos != nullptr ? a.sin + a.positions[t] * a.half : nullptr;
    for (int64_t w = threadIdx.x; w < a.heads * a.head_dim; w += blockDim.x) {
      const int64_t h = w / a.head_dim, i = w - h * a.head_dim;
      const T* k = static_cast<const T*>(a.k.data) + a.k.offset(t, h);
      const T* v = static_cast<const T*>(a.v.data) + a.v.offset(t, h);
      T* kd = static_cast<T*>(a.k_pages.data) + a.k_pages.offset(slot, h);
      T* vd = static_cast<T*>(a.v_pages.data) + a.v_pages.offset(slot, h);
      vd[i] = v[i];
      if (cos == nullptr || i >= 2 * a.half) {
        kd[i] = k[i];
        continue;
      }
      // Element i is the first or the second of pair p.
      const bool second = a.interleaved ? (i % 2 == 1) : (i >= a.half);
      const int64_t p = a.interleaved ? i / 2 : (second ? i - a.half : i);
      const int64_t partner = a.interleaved ? (second ? i - 1 : i + 1) : (second ? p : i + a.half);
      const float x = to_float(k[i]), y = to_float(k[partner]);
      // first: x1 c - x2 s; second: x2 c + x1 s (x is this element, y its partner)
      kd[i] = from_float<T>(second ? x * cos[p] + y * sin[p] : x * cos[p] - y * sin[p]);
    }
  }
}

}  // namespace

cudaError_t launch_paged_kv_append(const PagedKvAppend& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.heads == 0 || a.head_dim == 0) return cudaSuccess;
  return with_element_type(a.type, [&](auto zero) {
    using T = decltype(zero);
    auto kernel = &paged_kv_append_kernel<T>;
    const unsigned grid = static_cast<unsigned>(a.tokens < kMaxGrid ? a.tokens : kMaxGrid);
    return PYLLM_LAUNCH(kernel, dim3(grid), dim3(kThreads), 0, stream, a);
  });
}

}  // namespace pyllm::cuda
