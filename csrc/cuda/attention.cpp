// pyllm::attention and pyllm::attention_backward for CUDA tensors (the
// `cuda` backend), on the kernels of attention_kernel.cu. float16 and
// bfloat16. Argument preparation is shared with the CPU operator
// (common/attention_prepare.h); the user-facing checks live in
// pyllm/ops/attention.py.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/attention_prepare.h"
#include "attention_kernel.h"
#include "tensor_core_checks.h"

namespace pyllm::cuda {
namespace {

std::tuple<Tensor, Tensor> attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                     const optional<Tensor>& cu_q, const optional<Tensor>& cu_k,
                                     int64_t max_q, int64_t max_k, const optional<Tensor>& bias,
                                     double scale, bool causal, int64_t window_left,
                                     int64_t window_right, double softcap,
                                     const optional<Tensor>& alibi,
                                     const optional<Tensor>& block_table) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  Prepared p = prepare("attention", c10::DeviceType::CUDA, q_in, k_in, v_in, cu_q, cu_k, max_q,
                       max_k, bias, scale, causal, window_left, window_right, softcap, alibi,
                       block_table);
  check_tensor_core_dtype("attention", "q, k, v", p.q);
  const AttentionGeometry& g = p.g;
  Tensor out = at::empty(p.q.sizes(), p.q.options());
  Tensor lse = new_lse(p, p.q);
  const AttentionForward a = forward_args(p, out, lse);
  const int64_t words = attention_forward_workspace(g);
  Tensor workspace = words > 0 ? at::empty({words}, p.q.options().dtype(at::kFloat)) : Tensor();
  C10_CUDA_CHECK(launch_attention_forward(
      a, workspace.defined() ? workspace.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, const optional<Tensor>& cu_q,
    const optional<Tensor>& cu_k, int64_t max_q, int64_t max_k, const optional<Tensor>& bias,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const optional<Tensor>& alibi) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  Prepared p = prepare("attention_backward", c10::DeviceType::CUDA, q_in, k_in, v_in, cu_q, cu_k,
                       max_q, max_k, bias, scale, causal, window_left, window_right, softcap, alibi);
  check_tensor_core_dtype("attention_backward", "q, k, v", p.q);
  PreparedBackward inputs = prepare_backward(p, q_in, grad_out_in, out_in, lse_in);
  inputs.delta = delta_like_lse(
      p, at::sum(at::mul(inputs.grad_out.to(at::kFloat), inputs.out.to(at::kFloat)), {-1}));
  Tensor grad_q = at::empty(p.q.sizes(), p.q.options());
  Tensor grad_k = at::empty(p.k.sizes(), p.k.options());
  Tensor grad_v = at::empty(p.v.sizes(), p.v.options());
  const AttentionBackward a = backward_args(p, inputs, grad_q, grad_k, grad_v);
  C10_CUDA_CHECK(launch_attention_backward(a, c10::cuda::getCurrentCUDAStream()));
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) {
  m.impl("attention", &attention);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace pyllm::cuda
