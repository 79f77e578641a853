// The CPU attention forward for calls made outside the dispatcher
// (csrc/decoder_direct.cpp); the operator pyllm::attention registers this
// same function in attention.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace pyllm::cpu {

// pyllm::attention's CPU forward: (out, lse). Dense q (batch, seq_q, heads,
// head_dim) and k, v (batch, seq_k, heads_kv, head_dim), any strides, or
// variable-length with cu_q/cu_k; the arguments as the operator's schema.
// Checks what guards memory (throws on bad arguments).
std::tuple<at::Tensor, at::Tensor> attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, const c10::optional<at::Tensor>& bias, double scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& block_table);

}  // namespace pyllm::cpu
