// What the dispatcher-free entry points of pyllm._C check before they run a
// kernel themselves (csrc/direct_calls.cpp, csrc/decoder_direct.cpp): plain
// CPU tensors, nothing around the kernel on this thread, arguments the
// kernels take.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <optional>

namespace pyllm::direct {

namespace py = pybind11;

// Every CPU tensor carries the autograd, ADInplaceOrView and autocast keys
// (bare_context() checks that autograd and autocast have nothing to do).
inline bool plain_cpu(const at::Tensor& t) {
  return (t.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView -
          c10::autocast_dispatch_keyset) == c10::DispatchKeySet(c10::DispatchKey::CPU);
}

inline bool float_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Nothing around the kernel on this thread: no mode, no autocast, no observer.
// (BackendSelect and ADInplaceOrView are always on the included set.)
inline bool bare_context() {
  const c10::DispatchKeySet always{c10::DispatchKey::BackendSelect,
                                   c10::DispatchKey::ADInplaceOrView};
  return (c10::impl::tls_local_dispatch_key_set().included_ - always).empty() &&
         !at::autocast::is_autocast_enabled(at::kCPU) && !at::hasCallbacks();
}

// A tensor argument: nullopt for None; sets `ok` false for anything else that
// is not a plain CPU tensor.
inline std::optional<at::Tensor> tensor_arg(py::handle h, bool& ok) {
  if (h.is_none()) return std::nullopt;
  if (!THPVariable_Check(h.ptr())) {
    ok = false;
    return std::nullopt;
  }
  const at::Tensor& t = THPVariable_Unpack(h.ptr());
  if (!plain_cpu(t)) ok = false;
  return t;
}

// weight or bias: [n] of the input's dtype or float32.
inline bool param_ok(const std::optional<at::Tensor>& p, at::ScalarType dtype, int64_t n) {
  return !p.has_value() || (p->dim() == 1 && p->size(0) == n &&
                            (p->scalar_type() == dtype || p->scalar_type() == at::kFloat));
}

inline bool param_ok(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t n) {
  return param_ok(p, x.scalar_type(), n);
}

inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->requires_grad();
}

// torch.finfo(dtype).eps, the RMSNorm default.
inline double dtype_eps(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return 0.0078125;
    case at::kHalf: return 0.0009765625;
    default: return 1.1920928955078125e-07;
  }
}

// A norm's eps: a Python float >= 0 and finite, or None for an RMSNorm
// (dtype_eps); false for anything else.
inline bool eps_arg(py::handle h, bool rms, at::ScalarType dtype, double& eps) {
  if (h.is_none() && rms) {
    eps = dtype_eps(dtype);
    return true;
  }
  if (!PyFloat_Check(h.ptr())) return false;
  eps = PyFloat_AS_DOUBLE(h.ptr());
  return eps >= 0.0 && std::isfinite(eps);
}

}  // namespace pyllm::direct
