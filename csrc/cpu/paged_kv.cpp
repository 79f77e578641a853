// pyllm::paged_kv_append on the CPU: the arguments checked
// (common/tensor_args.h), then the tokens spread over threads; each
// token's key rows are rotated in float32 (when cos is given) and written to
// its slot, its value rows copied there.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kernels/scalar.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {
namespace {

// One head row of head_dim elements, rotated from src into dst (which may
// not overlap it).
template <typename T>
void rotate_row(const T* src, T* dst, const PagedKvAppend& a, const float* cos, const float* sin,
                float* scratch) {
  const int64_t D = a.head_dim, half = a.half;
  for (int64_t i = 0; i < D; ++i) scratch[i] = to_f32(src[i]);
  for (int64_t i = 0; i < half; ++i) {
    const int64_t i1 = a.interleaved ? 2 * i : i, i2 = a.interleaved ? 2 * i + 1 : i + half;
    const float x1 = scratch[i1], x2 = scratch[i2];
    dst[i1] = from_f32<T>(x1 * cos[i] - x2 * sin[i]);
    dst[i2] = from_f32<T>(x2 * cos[i] + x1 * sin[i]);
  }
  for (int64_t i = 2 * half; i < D; ++i) dst[i] = src[i];
}

template <typename T>
void append(const PagedKvAppend& a) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.heads * a.head_dim));
  at::parallel_for(0, a.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(a.head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = a.slots[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < a.heads; ++h) {
        const T* k = static_cast<const T*>(a.k.data) + a.k.offset(t, h);
        const T* v = static_cast<const T*>(a.v.data) + a.v.offset(t, h);
        T* kd = static_cast<T*>(a.k_pages.data) + a.k_pages.offset(slot, h);
        T* vd = static_cast<T*>(a.v_pages.data) + a.v_pages.offset(slot, h);
        if (a.cos != nullptr) {
          const int64_t pos = a.positions[t];
          rotate_row(k, kd, a, a.cos + pos * a.half, a.sin + pos * a.half, scratch.data());
        } else {
          std::memmove(kd, k, sizeof(T) * a.head_dim);
        }
        std::memmove(vd, v, sizeof(T) * a.head_dim);
      }
    }
  });
}

void paged_kv_append(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& slots,
                     const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                     const c10::optional<at::Tensor>& positions, bool interleaved) {
  const PagedKvAppend a = check_paged_kv_append_args(k_pages, v_pages, k, v, slots, cos, sin,
                                                     positions, interleaved, c10::DeviceType::CPU);
  switch (a.type) {
    case DType::f32: return append<float>(a);
    case DType::bf16: return append<bf16>(a);
    case DType::f16: return append<f16>(a);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("paged_kv_append", &paged_kv_append); }

}  // namespace pyllm::cpu
