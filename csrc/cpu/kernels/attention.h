// Attention CPU kernels: the interface between the operator
// (csrc/cpu/attention.cpp) and the per-ISA variants of attention_kernel.h
// (setup.py compiles one per instruction set). Raw pointers, sizes and
// strides only; the caller has checked shapes.
//
// The argument structs are shared with the CUDA kernels (common/attention_args.h).
#pragma once

#include <cstdint>

#include "../../common/attention_args.h"
#include "scalar.h"

namespace pyllm::cpu {

using pyllm::AttentionBackward;
using pyllm::AttentionForward;
using pyllm::AttentionGeometry;
using pyllm::BiasLayout;
using pyllm::LseLayout;
using pyllm::TokenLayout;

// One task of the forward: queries [q_begin, q_end) of sequence s, head h.
using AttentionForwardFn = void (*)(const AttentionForward&, int64_t s, int64_t h, int64_t q_begin,
                                    int64_t q_end);

// One task of the decode path (few queries, long keys): the query rows of
// sequence s of kv heads [hk_begin, hk_end) (each kv head's group of query
// heads x the queries) against keys [k_begin, k_end), so that the task reads
// its keys' K and V rows in memory order. Writes the unnormalised partial
// result of each of those rows, its accumulator o[head_dim], running max m
// and sum l, at partial + ((hk * group + head_in_group) * len_q + query) *
// (head_dim + 2). A row's result does not depend on the kv heads range.
using AttentionDecodeFn = void (*)(const AttentionForward&, int64_t s, int64_t hk_begin,
                                   int64_t hk_end, int64_t k_begin, int64_t k_end,
                                   float* partial);

// The backward in two passes so that no two tasks write one gradient:
// dk/dv for keys [k_begin, k_end) of sequence s and kv head hk (summing over
// the query heads of its group), then dq for queries [q_begin, q_end) of
// sequence s and head h.
using AttentionBackwardKvFn = void (*)(const AttentionBackward&, int64_t s, int64_t hk,
                                       int64_t k_begin, int64_t k_end);
using AttentionBackwardQFn = void (*)(const AttentionBackward&, int64_t s, int64_t h,
                                      int64_t q_begin, int64_t q_end);

// delta[r] = rowsum(x[r] * y[r]) for rows [begin, end) of D floats, summed
// in kAttentionBackwardChunk chunks as the kernels sum dP (see below).
using AttentionDeltaFn = void (*)(const float* x, const float* y, int64_t begin, int64_t end,
                                  int64_t D, float* out);

// A sequence of at most kAttentionFusedKeys keys whose every query sees every
// key through plain scores (no mask, window, bias, ALiBi or softcap) takes
// the backward in one pass: one key-pass task covers all its keys of a kv
// head, and, owning every dQ row of the heads of its group, adds dQ += dS K
// from the dS it has made; the query pass skips the sequence. That saves the
// query pass's recomputed S and dP (2 of 7 products) and its packing. Where a
// key may go unseen, the passes keep their own handling of a NaN behind a
// mask, so the two passes stay.
constexpr int64_t kAttentionFusedKeys = 256;

inline bool attention_backward_fused(const AttentionBackward& a, int64_t s) {
  const AttentionGeometry& g = a.g;
  return a.bias.data == nullptr && g.alibi == nullptr && !(g.softcap > 0.f) && !g.causal &&
         g.window_left < 0 && g.window_right < 0 && !g.paged && g.len_k(s) > 0 &&
         g.len_k(s) <= kAttentionFusedKeys;
}

// Block sizes the tasks are cut to.
constexpr int64_t kAttentionBlockQ = 64;
constexpr int64_t kAttentionBlockK = 64;

// The backward's dot products over the head dimension (S and dP) are summed
// in chunks of this many terms, each from zero, each chunk's sum then added
// to the running total: with one running sum of 64 terms the rounding error of
// dP alone put an fp32 dQ past 3x PyTorch's error. delta = rowsum(dO * O)
// (attention.cpp) is summed in the same chunks, so that dP - delta is exactly
// zero where a query sees one key.
constexpr int64_t kAttentionBackwardChunk = 8;

#define PYLLM_DECLARE_ATTENTION(isa)                                                       \
  namespace isa {                                                                          \
  void attention_forward(const AttentionForward&, int64_t, int64_t, int64_t, int64_t);     \
  void attention_decode(const AttentionForward&, int64_t, int64_t, int64_t, int64_t,        \
                        int64_t, float*);                                                  \
  void attention_backward_kv(const AttentionBackward&, int64_t, int64_t, int64_t, int64_t); \
  void attention_backward_q(const AttentionBackward&, int64_t, int64_t, int64_t, int64_t);  \
  void attention_delta(const float*, const float*, int64_t, int64_t, int64_t, float*);      \
  }
PYLLM_DECLARE_ATTENTION(generic)
PYLLM_DECLARE_ATTENTION(avx2)
PYLLM_DECLARE_ATTENTION(avx512)
PYLLM_DECLARE_ATTENTION(avx512_bf16)
#undef PYLLM_DECLARE_ATTENTION

}  // namespace pyllm::cpu
