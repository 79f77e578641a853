// The arguments of the paged-KV append kernels (CPU: csrc/cpu/paged_kv.cpp,
// CUDA: csrc/cuda/paged_kv_kernel.cu): new tokens' keys and values written
// into their slots of a paged cache, the keys rotated on the way (rotary
// embedding) when cos is not null. Raw pointers and sizes, no torch: the
// operator files checked every shape, stride, type and slot
// (check_paged_kv_append_args in tensor_args.h).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyllm {

// A (rows, heads, head_dim) tensor, or the (pages * page_size) rows of a
// (pages, page_size, heads, head_dim) one: row r, head h at data + (r /
// per_page) * page_stride + (r % per_page) * row_stride + h * head_stride.
struct KvRows {
  void* data;
  int64_t page_stride, row_stride, head_stride;
  int64_t per_page;
  PYLLM_HOST_DEVICE int64_t offset(int64_t r, int64_t h) const {
    return (r / per_page) * page_stride + (r % per_page) * row_stride + h * head_stride;
  }
};

struct PagedKvAppend {
  KvRows k, v;              // the new tokens: (tokens, heads_kv, head_dim)
  KvRows k_pages, v_pages;  // the cache's rows: slot = page * page_size + row
  const int64_t* slots;     // [tokens]: the slot of each token; < 0: not written
  int64_t tokens, heads, head_dim;
  // Rotary embedding of the keys (cos null: none), as pyllm::rotary: pairs
  // (i, i + half) or interleaved (2i, 2i + 1) of the first 2 * half elements,
  // angle of position positions[t], fp32, rounded once.
  const float* cos;
  const float* sin;
  const int64_t* positions;
  int64_t half;
  int64_t max_positions;
  bool interleaved;
  DType type;
};

}  // namespace pyllm
