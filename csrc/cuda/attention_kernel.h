// Attention CUDA kernels (FlashAttention-2 structure on mma.sync): the
// interface between the operators (csrc/cuda/attention.cpp, which includes
// torch) and the kernels (attention_kernel.cu, which does not). The argument
// structs are the CPU kernels' (common/attention_args.h); the cu_seqlens
// pointers are device pointers here. float16 and bfloat16; head_dim <= 256.
#pragma once

#include <cstdint>

#include "../common/attention_args.h"
#include "device.h"

namespace pyllm::cuda {

// fp32 scratch the forward needs (the split-KV decode path's partial
// results); 0 when the call takes the prefill path.
int64_t attention_forward_workspace(const AttentionGeometry& g);

// Writes out and lse. `workspace` holds attention_forward_workspace(g) floats.
cudaError_t launch_attention_forward(const AttentionForward& a, float* workspace,
                                     cudaStream_t stream);

// Writes grad_q, grad_k, grad_v; a.delta = rowsum(grad_out * out), laid out
// like lse, computed by the caller. Two kernels, each output element written
// by one CTA (dK/dV per key block summing over the query heads of its group,
// then dQ per query block): no atomics, the same bits on every run.
cudaError_t launch_attention_backward(const AttentionBackward& a, cudaStream_t stream);

}  // namespace pyllm::cuda
