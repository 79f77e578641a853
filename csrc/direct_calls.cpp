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
// way). The packed products (linear_packed_direct, swiglu_packed_direct) also
// take the weights the panels were packed from, for the gradient check; a
// call their own checks refuse returns None (the face then raises its error).

#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu/norms.h"
#include "cpu/packed_linear.h"
#include "direct_call_checks.h"
#include "direct_calls.h"

namespace py = pybind11;

namespace pyllm {
namespace {

using namespace direct;

// Elements from which a call releases the GIL while the kernel runs.
constexpr int64_t kReleaseGilElements = 1 << 16;

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
  if (!eps_arg(eps_h, rms, x->scalar_type(), eps)) return py::none();
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

// Weight elements from which a packed product releases the GIL.
constexpr int64_t kReleaseGilWeightElements = 1 << 18;

// x, the weights and biases: plain CPU tensors, none requiring grad in grad
// mode, in a bare context; x of a kernel dtype.
bool packed_call_ok(py::handle x_h, std::initializer_list<py::handle> others,
                    std::optional<at::Tensor>& x, std::vector<std::optional<at::Tensor>>& rest) {
  if (!bare_context()) return false;
  bool ok = true;
  x = tensor_arg(x_h, ok);
  for (py::handle h : others) rest.push_back(tensor_arg(h, ok));
  if (!ok || !x.has_value() || !float_kernel_dtype(x->scalar_type())) return false;
  if (at::GradMode::is_enabled()) {
    if (x->requires_grad()) return false;
    for (const auto& t : rest) {
      if (requires_grad(t)) return false;
    }
  }
  return true;
}

template <typename Fn>
py::object run_packed(int64_t weight_elements, Fn fn) {
  try {
    at::Tensor out;
    if (weight_elements >= kReleaseGilWeightElements) {
      py::gil_scoped_release no_gil;
      out = fn();
    } else {
      out = fn();
    }
    return py::cast(out);  // (with the GIL held)
  } catch (const c10::Error&) {
    return py::none();  // the face's checks name what is wrong
  }
}

py::object linear_packed_direct(py::handle x_h, py::handle weight_h, py::handle bias_h,
                                py::handle packed_h, int64_t out_features,
                                const std::string& activation) {
  std::optional<at::Tensor> x;
  std::vector<std::optional<at::Tensor>> t;
  if (!packed_call_ok(x_h, {weight_h, bias_h, packed_h}, x, t) || !t[0] || !t[2]) {
    return py::none();
  }
  const at::Tensor packed = *t[2];
  const std::optional<at::Tensor> bias = t[1];
  return run_packed(packed.numel(), [&] {
    return cpu::linear_packed(*x, packed, out_features, bias, activation);
  });
}

py::object swiglu_packed_direct(py::handle x_h, py::handle weight_gate_h, py::handle weight_up_h,
                                py::handle bias_gate_h, py::handle bias_up_h,
                                py::handle packed_gate_h, py::handle packed_up_h,
                                int64_t out_features) {
  std::optional<at::Tensor> x;
  std::vector<std::optional<at::Tensor>> t;
  if (!packed_call_ok(x_h, {weight_gate_h, weight_up_h, bias_gate_h, bias_up_h, packed_gate_h,
                            packed_up_h},
                      x, t) ||
      !t[0] || !t[1] || !t[4] || !t[5]) {
    return py::none();
  }
  const at::Tensor packed_gate = *t[4], packed_up = *t[5];
  const std::optional<at::Tensor> b_gate = t[2], b_up = t[3];
  return run_packed(packed_gate.numel() + packed_up.numel(), [&] {
    return cpu::swiglu_packed(*x, packed_gate, packed_up, out_features, b_gate, b_up);
  });
}

}  // namespace

void bind_direct_calls(py::module& m) {
  m.def("norm_direct", &norm_direct, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("rms"),
        "rms_norm / layer_norm (add_* with a residual) of a plain eager CPU inference call "
        "without the dispatcher: y, or (y, x + residual); None when the call must go through "
        "torch.ops (see csrc/direct_calls.cpp).");
  m.def("linear_packed_direct", &linear_packed_direct, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("packed"), py::arg("out_features"), py::arg("activation"),
        "linear_packed of a plain eager CPU inference call without the dispatcher (weight: "
        "the tensor the panels were packed from, for the gradient check); None when the call "
        "must go through torch.ops (see csrc/direct_calls.cpp).");
  m.def("swiglu_packed_direct", &swiglu_packed_direct, py::arg("x"), py::arg("weight_gate"),
        py::arg("weight_up"), py::arg("bias_gate"), py::arg("bias_up"), py::arg("packed_gate"),
        py::arg("packed_up"), py::arg("out_features"),
        "swiglu_packed of a plain eager CPU inference call without the dispatcher; None when "
        "the call must go through torch.ops (see csrc/direct_calls.cpp).");
}

}  // namespace pyllm
