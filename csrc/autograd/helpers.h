// What every autograd formula of csrc/autograd/ shares: the op names of a
// backend, the dispatcher handles, optional <-> undefined tensors, and whether
// a call needs an autograd node at all.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include <string>
#include <type_traits>

namespace pyllm::autograd {

// The qualified name of an op for one backend: pyllm::<op> (C++ kernels) or
// pyllm::<op>_triton.
template <bool kTriton>
std::string op_name(const char* op) {
  return std::string("pyllm::") + op + (kTriton ? "_triton" : "");
}

// The typed handle of an op, e.g. typed_op<Sig>("pyllm::rms_norm_backward").
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const std::string& qualname) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualname.c_str(), "").typed<Sig>();
}

// A backend may ship a forward kernel before its backward one: say so plainly
// instead of the dispatcher's "could not run ... with arguments from the CUDA
// backend".
inline void require_kernel(const c10::OperatorHandle& op, const at::Tensor& t) {
  if (!t.is_cpu() && !t.is_cuda()) return;  // meta/fake tensors while tracing
  const bool cuda = t.is_cuda();
  TORCH_CHECK(op.hasKernelForDispatchKey(cuda ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU),
              op.schema().name(), " has no ", cuda ? "CUDA" : "CPU",
              " kernel in this install, so this backend can't compute the gradient here; choose "
              "another backend for training (pyllm.backends() lists them)");
}

inline c10::optional<at::Tensor> absent_if_undefined(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

inline at::Tensor undefined_if_absent(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

inline bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

inline bool wants_grad(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->requires_grad();
}

// Whether the call needs an autograd node at all; when it doesn't, the ops
// skip torch::autograd::Function (its bookkeeping costs about a microsecond,
// a fifth of a decode-sized norm).
template <typename... Ts>
bool needs_grad(const Ts&... ts) {
  return at::GradMode::is_enabled() && (wants_grad(ts) || ...);
}

}  // namespace pyllm::autograd
