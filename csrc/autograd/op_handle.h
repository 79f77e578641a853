// Calling pyllm ops through the dispatcher from the autograd formulas.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace pyllm::autograd {

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

}  // namespace pyllm::autograd
