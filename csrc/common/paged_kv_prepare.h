// pyllm::paged_kv_append's arguments checked for memory safety, CPU and CUDA
// alike (the user-facing checks live in pyllm/ops/paged_kv.py): shapes,
// strides, dtypes, devices, and every slot and position on the host (a copy
// of two int64 per token for device tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "paged_kv_args.h"
#include "tensor_args.h"

namespace pyllm {

inline KvRows kv_rows(const at::Tensor& t) {
  if (t.dim() == 4) return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.size(1)};
  // (tokens, heads, head_dim): one "page" holding every row.
  return {t.data_ptr(), 0, t.stride(0), t.stride(1), std::max<int64_t>(1, t.size(0))};
}

inline PagedKvAppend check_paged_kv_append_args(
    const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& slots, const c10::optional<at::Tensor>& cos,
    const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& positions,
    bool interleaved, c10::DeviceType device_type) {
  const char* op = "pyllm::paged_kv_append";
  TORCH_CHECK_VALUE(k_pages.dim() == 4 && k_pages.sizes() == v_pages.sizes() &&
                        k_pages.device().type() == device_type &&
                        v_pages.device() == k_pages.device(),
                    op, ": k_pages and v_pages must be (pages, page_size, heads_kv, head_dim) "
                    "tensors of one shape on the kernel's device");
  TORCH_CHECK_VALUE(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_pages.size(2) &&
                        k.size(2) == k_pages.size(3) && k.device() == k_pages.device() &&
                        v.device() == k_pages.device(),
                    op, ": k and v must be (tokens, heads_kv, head_dim) matching the pages, on "
                    "their device");
  for (const at::Tensor* t : {&k_pages, &v_pages, &k, &v}) {
    TORCH_CHECK_TYPE(t->scalar_type() == k_pages.scalar_type(), op,
                     ": k, v and the pages must have one dtype");
    TORCH_CHECK_VALUE(t->size(-1) <= 1 || t->stride(-1) == 1, op,
                      ": k, v and the pages must have a contiguous head_dim");
  }
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong &&
                        slots.size(0) == k.size(0) && slots.is_contiguous() &&
                        slots.device() == k.device(),
                    op, ": slots must be contiguous int64 (tokens,) on k's device");
  const int64_t capacity = k_pages.size(0) * k_pages.size(1);
  const at::Tensor host_slots = slots.cpu();
  const int64_t* s = host_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t) {
    TORCH_CHECK_VALUE(s[t] < capacity, op, ": slots[", t, "] = ", s[t],
                      " is past the cache's pages x page_size = ", capacity, " rows");
  }
  PagedKvAppend a{kv_rows(k), kv_rows(v), kv_rows(k_pages), kv_rows(v_pages),
                  slots.data_ptr<int64_t>(), k.size(0), k.size(1), k.size(2),
                  nullptr, nullptr, nullptr, 0, 0, interleaved, kernel_dtype(k, "k")};
  TORCH_CHECK_VALUE(cos.has_value() == sin.has_value() && cos.has_value() == positions.has_value(),
                    op, ": give cos, sin and positions together, or none");
  if (cos.has_value()) {
    for (const at::Tensor* t : {&*cos, &*sin}) {
      TORCH_CHECK_VALUE(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                            t->device() == k.device() && t->sizes() == cos->sizes(),
                        op, ": cos and sin must be contiguous float32 (max_positions, half) on "
                        "k's device");
    }
    TORCH_CHECK_VALUE(cos->size(1) >= 1 && 2 * cos->size(1) <= k.size(2), op,
                      ": 2 x cos.size(1) must be between 2 and head_dim");
    TORCH_CHECK_VALUE(positions->dim() == 1 && positions->scalar_type() == at::kLong &&
                          positions->is_contiguous() && positions->size(0) == k.size(0) &&
                          positions->device() == k.device(),
                      op, ": positions must be contiguous int64 (tokens,) on k's device");
    const at::Tensor host_positions = positions->cpu();
    const int64_t* p = host_positions.data_ptr<int64_t>();
    for (int64_t t = 0; t < k.size(0); ++t) {
      TORCH_CHECK_VALUE(p[t] >= 0 && p[t] < cos->size(0), op, ": positions must lie in [0, ",
                        cos->size(0), ") (the rows of cos/sin), got ", p[t]);
    }
    a.cos = cos->data_ptr<float>();
    a.sin = sin->data_ptr<float>();
    a.positions = positions->data_ptr<int64_t>();
    a.half = cos->size(1);
    a.max_positions = cos->size(0);
  }
  return a;
}

}  // namespace pyllm
