// The CPU rotary embedding for calls made outside the dispatcher
// (csrc/decoder_direct.cpp); the operator pyllm::rotary registers this same
// function in rotary.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyllm::cpu {

// Rotates q (batch, seq, heads, head_dim) and k (batch, seq, heads_kv,
// head_dim) in place by the angles of cos/sin (rows, rotary_dim / 2) float32
// at positions (batch, seq) int64. Checks its arguments and every position
// against the tables' rows (throws on bad ones).
void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
            const at::Tensor& sin, const at::Tensor& positions, bool interleaved, bool conjugate);

}  // namespace pyllm::cpu
