// Dispatcher-free entry points of pyllm._C for small eager CPU inference calls.
//
// A call through torch.ops costs a few microseconds in Python and the
// dispatcher (boxing the arguments, the autograd kernel, allocating the
// statistics a backward would need): at a decode row (one token, 1x4096) that
// is more than the kernel itself. The Python faces (pyllm/ops/direct.py) try
// these entry points first; each returns None unless the call is one the
// dispatcher would send straight to the CPU kernel with nothing around it:
//   - every tensor argument a plain dense CPU tensor (no subclass key, no
//     functorch/functionalisation wrapper, no conjugate/negative bit);
//   - no gradient to record (grad mode off, or nothing requires grad);
//   - no mode on the thread's dispatch stack (TorchDispatchMode, FakeTensor,
//     vmap/grad transforms), CPU autocast off, and no RecordFunction observer
//     (the profiler sees every op it would otherwise see);
//   - arguments the kernels take (dtype, shapes, eps), so a bad call always
//     goes the checked way and gets the face's error message.
// The result is the one the operator computes (the same kernel, run the same
// way).

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "cpu/norms.h"
#include "direct_calls.h"

namespace py = pybind11;

namespace pyllm {
namespace {

// Elements from which a call releases the GIL while the kernel runs.
constexpr int64_t kReleaseGilElements = 1 << 16;

// Every CPU tensor carries the autograd, ADInplaceOrView and autocast keys
// (bare_context() checks that autograd and autocast have nothing to do).
bool plain_cpu(const at::Tensor& t) {
  return (t.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView -
          c10::autocast_dispatch_keyset) == c10::DispatchKeySet(c10::DispatchKey::CPU);
}

bool float_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Nothing around the kernel on this thread: no mode, no autocast, no observer.
// (BackendSelect and ADInplaceOrView are always on the included set.)
bool bare_context() {
  const c10::DispatchKeySet always{c10::DispatchKey::BackendSelect,
                                   c10::DispatchKey::ADInplaceOrView};
  return (c10::impl::tls_local_dispatch_key_set().included_ - always).empty() &&
         !at::autocast::is_autocast_enabled(at::kCPU) && !at::hasCallbacks();
}

// A tensor argument: nullopt for None; sets `ok` false for anything else that
// is not a plain CPU tensor.
std::optional<at::Tensor> tensor_arg(py::handle h, bool& ok) {
  if (h.is_none()) return std::nullopt;
  if (!THPVariable_Check(h.ptr())) {
    ok = false;
    return std::nullopt;
  }
  const at::Tensor& t = THPVariable_Unpack(h.ptr());
  if (!plain_cpu(t)) ok = false;
  return t;
}

// weight or bias: [n] of x's dtype or float32.
bool param_ok(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t n) {
  return !p.has_value() || (p->dim() == 1 && p->size(0) == n &&
                            (p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat));
}

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->requires_grad();
}

// torch.finfo(dtype).eps, the RMSNorm default.
double dtype_eps(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return 0.0078125;
    case at::kHalf: return 0.0009765625;
    default: return 1.1920928955078125e-07;
  }
}

py::object norm_direct(py::handle x_h, py::handle residual_h, py::handle weight_h,
                       py::handle bias_h, py::handle eps_h, bool rms) {
  if (!bare_context()) return py::none();
  bool ok = true;
  const std::optional<at::Tensor> x = tensor_arg(x_h, ok);
  const std::optional<at::Tensor> residual = tensor_arg(residual_h, ok);
  const std::optional<at::Tensor> weight = tensor_arg(weight_h, ok);
  const std::optional<at::Tensor> bias = tensor_arg(bias_h, ok);
  if (!ok || !x.has_value() || !float_kernel_dtype(x->scalar_type()) || x->dim() < 1) {
    return py::none();
  }
  const int64_t n = x->size(-1);
  if (n < 1 || n > INT32_MAX) return py::none();
  if (residual.has_value() &&
      (residual->scalar_type() != x->scalar_type() || residual->sizes() != x->sizes())) {
    return py::none();
  }
  if (!param_ok(weight, *x, n) || !param_ok(bias, *x, n) || (rms && bias.has_value()) ||
      (weight.has_value() && bias.has_value() && weight->scalar_type() != bias->scalar_type())) {
    return py::none();
  }
  if (at::GradMode::is_enabled() && (x->requires_grad() || requires_grad(residual) ||
                                     requires_grad(weight) || requires_grad(bias))) {
    return py::none();
  }
  double eps;
  if (eps_h.is_none() && rms) {
    eps = dtype_eps(x->scalar_type());
  } else if (PyFloat_Check(eps_h.ptr())) {
    eps = PyFloat_AS_DOUBLE(eps_h.ptr());
    if (!(eps >= 0.0 && std::isfinite(eps))) return py::none();
  } else {
    return py::none();
  }
  std::array<at::Tensor, 2> out;
  if (x->numel() >= kReleaseGilElements) {
    py::gil_scoped_release no_gil;
    out = cpu::norm_inference(rms, *x, residual, weight, bias, eps);
  } else {
    out = cpu::norm_inference(rms, *x, residual, weight, bias, eps);
  }
  if (!residual.has_value()) return py::cast(out[0]);
  return py::make_tuple(out[0], out[1]);
}

}  // namespace

void bind_direct_calls(py::module& m) {
  m.def("norm_direct", &norm_direct, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("rms"),
        "rms_norm / layer_norm (add_* with a residual) of a plain eager CPU inference call "
        "without the dispatcher: y, or (y, x + residual); None when the call must go through "
        "torch.ops (see csrc/direct_calls.cpp).");
}

}  // namespace pyllm
