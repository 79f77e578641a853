// Argument helpers shared by the CPU and CUDA operator files (which include
// torch; the kernels don't): torch dtype -> kernel element type, and the
// memory-safety checks every norm kernel needs before it touches a pointer.
// The user-facing checks with friendlier messages live in pyllm/ops/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <vector>

#include "dtype.h"

namespace pyllm {

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK_TYPE(false, "pyllm kernels: ", name,
                       " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::f32;
}

inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

inline at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// (..., n) -> (rows, n) as a reshape (a view where possible); unlike
// reshape({-1, n}) it is defined for n = 0 too.
inline at::Tensor as_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return t.reshape({rows, t.size(-1)});
}

// x's shape without the last dimension: the shape of per-row statistics.
inline std::vector<int64_t> row_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

// A norm input: non-empty last dimension, a kernel dtype, on `device_type`.
inline void check_norm_input(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "pyllm::", op,
                    ": x must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().type() == device_type, "pyllm::", op, ": x must be a ",
                    c10::DeviceTypeName(device_type), " tensor for this kernel, got ", x.device());
  kernel_dtype(x, "x");
}

inline void check_like_x(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() &&
                        t.device() == x.device(),
                    "pyllm::", op, ": ", name, " must match x (", x.sizes(), ", ",
                    x.scalar_type(), ", ", x.device(), "), got ", t.sizes(), ", ",
                    t.scalar_type(), ", ", t.device());
}

// Norm weight and bias: shape [n] on x's device, x's dtype or float32, one
// dtype for both. Returns the parameters' kernel type.
inline DType check_norm_params(const char* op, const at::Tensor& x,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias) {
  c10::optional<at::ScalarType> type;
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = **p;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(-1) && t.device() == x.device(),
                      "pyllm::", op, ": weight and bias must have shape [", x.size(-1),
                      "] on the device of x, got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
                     "pyllm::", op, ": weight and bias must be ", x.scalar_type(),
                     " or float32, got ", t.scalar_type());
    TORCH_CHECK_TYPE(!type.has_value() || *type == t.scalar_type(), "pyllm::", op,
                     ": weight and bias must have one dtype");
    type = t.scalar_type();
  }
  return type.has_value() && *type == at::kFloat ? DType::f32 : kernel_dtype(x, "x");
}

// Saved statistics of a norm: float32, one value per row of x, on x's device.
inline void check_norm_stat(const char* op, const at::Tensor& stat, const at::Tensor& x) {
  TORCH_CHECK_VALUE(stat.scalar_type() == at::kFloat && stat.numel() * x.size(-1) == x.numel() &&
                        stat.device() == x.device(),
                    "pyllm::", op, ": mean and rstd must be float32 with one value per row of x");
}

// Every input of a norm backward (the gradients, the saved statistics, the
// weight) checked against x; returns the parameters' kernel type.
inline DType check_norm_backward_args(const char* op, c10::DeviceType device_type, bool rms,
                                      const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& grad_sum,
                                      const std::array<bool, 3>& mask) {
  check_norm_input(op, x, device_type);
  check_like_x(op, "grad_y", grad_y, x);
  if (grad_sum.has_value()) check_like_x(op, "grad_sum", *grad_sum, x);
  const DType param_type = check_norm_params(op, x, weight, c10::nullopt);
  check_norm_stat(op, rstd, x);
  if (!rms) check_norm_stat(op, mean, x);
  TORCH_CHECK_VALUE(!mask[1] || weight.has_value(), "pyllm::", op,
                    ": grad_weight requested without a weight");
  return param_type;
}

}  // namespace pyllm

#include "rotary_args.h"

namespace pyllm {

// pyllm::rotary's arguments checked for memory safety (the user-facing
// checks are in pyllm/ops/rotary.py) and turned into the kernels' Rotary.
// Positions outside [0, max_positions) are left to the kernels, which never
// read the tables there.
inline Rotary check_rotary_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& positions,
                                bool interleaved, bool conjugate, c10::DeviceType device_type) {
  const char* op = "pyllm::rotary";
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK_VALUE(t->dim() == 4 && t->device().type() == device_type, op,
                      ": q and k must be 4-D (batch, seq, heads, head_dim) on the kernel's device");
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1, op,
                      ": q and k must have a contiguous head_dim");
  }
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && k.device() == q.device() &&
                        k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    op, ": k must match q in dtype, device, batch, seq and head_dim");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                          t->device() == q.device() && t->sizes() == cos.sizes(),
                      op, ": cos and sin must be contiguous float32 (max_positions, half) on q's "
                      "device");
  }
  TORCH_CHECK_VALUE(cos.size(1) >= 1 && 2 * cos.size(1) <= q.size(3), op,
                    ": 2 x cos.size(1) must be between 2 and head_dim");
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.scalar_type() == at::kLong &&
                        positions.is_contiguous() && positions.device() == q.device() &&
                        positions.size(0) == q.size(0) && positions.size(1) == q.size(1),
                    op, ": positions must be contiguous int64 (batch, seq) on q's device");
  const auto tensor = [](const at::Tensor& t) {
    return RotaryTensor{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.size(2)};
  };
  return Rotary{tensor(q),          tensor(k),
                cos.data_ptr<float>(), sin.data_ptr<float>(),
                positions.data_ptr<int64_t>(),
                q.size(0),          q.size(1),
                q.size(3),          cos.size(1),
                cos.size(0),        kernel_dtype(q, "q"),
                interleaved,        conjugate};
}

}  // namespace pyllm

#include <ATen/ops/empty.h>

#include "cross_entropy_args.h"

namespace pyllm {

// pyllm::cross_entropy's arguments checked for memory safety (the user-facing
// checks are in pyllm/ops/cross_entropy.py), its outputs (loss, lse, grad)
// allocated, and the kernels' CrossEntropy. A target outside [0, vocab) other
// than ignore_index is left to the kernels: a NaN loss, nothing read there.
inline CrossEntropy check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                             int64_t ignore_index, double label_smoothing,
                                             double z_loss, double softcap, bool want_grad,
                                             c10::DeviceType device_type, at::Tensor& loss,
                                             at::Tensor& lse, at::Tensor& grad,
                                             at::Tensor (*allocate)(at::IntArrayRef,
                                                                    const at::TensorOptions&) =
                                                 nullptr) {
  // allocate: the gradient's allocator (the CPU output cache), else at::empty
  const auto empty = [allocate](std::vector<int64_t> shape, at::TensorOptions options) {
    return allocate != nullptr ? allocate(shape, options) : at::empty(shape, options);
  };
  const char* op = "pyllm::cross_entropy";
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.device().type() == device_type, op,
                    ": logits must be 2-D (rows, vocab) on the kernel's device");
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && (logits.size(1) == 1 || logits.stride(1) == 1), op,
                    ": logits must have a contiguous vocab dimension of at least 1");
  TORCH_CHECK_VALUE(target.dim() == 1 && target.scalar_type() == at::kLong &&
                        target.is_contiguous() && target.size(0) == logits.size(0) &&
                        target.device() == logits.device(),
                    op, ": target must be contiguous int64 (rows,) on logits' device");
  const auto stats = logits.options().dtype(at::kFloat);
  loss = empty(std::vector<int64_t>{logits.size(0)}, stats);
  lse = empty(std::vector<int64_t>{logits.size(0)}, stats);
  grad = want_grad ? empty(logits.sizes().vec(), logits.options())
                   : empty(std::vector<int64_t>{0}, logits.options());
  const int64_t stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  return CrossEntropy{logits.data_ptr(),
                      target.data_ptr<int64_t>(),
                      loss.data_ptr<float>(),
                      lse.data_ptr<float>(),
                      want_grad ? grad.data_ptr() : nullptr,
                      logits.size(0),
                      logits.size(1),
                      stride,
                      ignore_index,
                      static_cast<float>(label_smoothing),
                      static_cast<float>(z_loss),
                      static_cast<float>(softcap),
                      kernel_dtype(logits, "logits")};
}

}  // namespace pyllm

#include "paged_kv_args.h"

namespace pyllm {

// pyllm::paged_kv_append's arguments checked for memory safety, CPU and CUDA
// alike (the user-facing checks live in pyllm/ops/paged_kv.py): shapes,
// strides, dtypes, devices, and every slot and position on the host (a copy
// of two int64 per token for device tensors).
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
