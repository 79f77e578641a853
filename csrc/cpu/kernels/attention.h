// Attention CPU kernels: the interface between the operator
// (csrc/cpu/attention.cpp) and the per-ISA variants
// (attention_{generic,avx2,avx512,avx512bf16}.cpp). Raw pointers, sizes and
// strides only; the caller has checked shapes.
//
// Geometry. A batch of `batch` sequences; sequence s has len_q(s) queries and
// len_k(s) keys. Dense layout: q[s][t][h][d] with batch stride and token
// stride; variable-length layout: tokens of all sequences packed, sequence s
// owning tokens cu_q[s] .. cu_q[s+1] (cu_q/cu_k not null), batch stride 0.
// The head dimension is contiguous (stride 1) in q, k, v and out.
#pragma once

#include <cstdint>

#include "scalar.h"

namespace pyllm::cpu {

struct AttentionGeometry {
  int64_t batch;
  int64_t heads;     // query heads
  int64_t heads_kv;  // key/value heads; divides heads (GQA/MQA)
  int64_t head_dim;
  int64_t seq_q;  // dense: the query length; varlen: the longest
  int64_t seq_k;
  const int32_t* cu_q;  // varlen: [batch + 1] cumulative lengths, else null
  const int32_t* cu_k;
  float scale;
  bool causal;  // bottom-right aligned: query t sees keys j <= t + len_k - len_q

  int64_t len_q(int64_t s) const { return cu_q ? cu_q[s + 1] - cu_q[s] : seq_q; }
  int64_t len_k(int64_t s) const { return cu_k ? cu_k[s + 1] - cu_k[s] : seq_k; }
  int64_t first_q(int64_t s) const { return cu_q ? cu_q[s] : 0; }
  int64_t first_k(int64_t s) const { return cu_k ? cu_k[s] : 0; }
};

// Where a [token][head][dim] tensor's elements are.
struct TokenLayout {
  void* data;
  int64_t batch_stride;  // 0 for varlen
  int64_t token_stride;
  int64_t head_stride;
};

// Where an additive bias broadcast to (batch, heads, seq_q, seq_k) is; a
// broadcast dimension has stride 0. Varlen sequence s uses the top-left
// (len_q(s), len_k(s)) corner of its (seq_q, seq_k) slice.
struct BiasLayout {
  const void* data;  // null: no bias
  int64_t batch_stride, head_stride, q_stride, k_stride;
  DType type;
};

// The log-sum-exp output: dense (batch, heads, seq_q), varlen (heads, total_q).
struct LseLayout {
  float* data;
  int64_t batch_stride;  // 0 for varlen
  int64_t head_stride;
};

struct AttentionForward {
  AttentionGeometry g;
  TokenLayout q, k, v, out;
  BiasLayout bias;
  LseLayout lse;
  DType type;  // of q, k, v and out
};

struct AttentionBackward {
  AttentionGeometry g;
  TokenLayout q, k, v, out, grad_out, grad_q, grad_k, grad_v;
  BiasLayout bias;
  LseLayout lse;
  const float* delta;  // rowsum(grad_out * out), laid out like lse
  DType type;
};

// One task of the forward: queries [q_begin, q_end) of sequence s, head h.
using AttentionForwardFn = void (*)(const AttentionForward&, int64_t s, int64_t h, int64_t q_begin,
                                    int64_t q_end);

// One task of the decode path (few queries, long keys): every query row of
// sequence s (each kv head's group of query heads x the queries) against keys
// [k_begin, k_end) of every kv head, so that the task reads its keys' K and V
// rows in memory order. Writes the unnormalised partial result of each row,
// its accumulator o[head_dim], running max m and sum l, at
// partial + ((hk * group + head_in_group) * len_q + query) * (head_dim + 2).
using AttentionDecodeFn = void (*)(const AttentionForward&, int64_t s, int64_t k_begin,
                                   int64_t k_end, float* partial);

// The backward in two passes so that no two tasks write one gradient:
// dk/dv for keys [k_begin, k_end) of sequence s and kv head hk (summing over
// the query heads of its group), then dq for queries [q_begin, q_end) of
// sequence s and head h.
using AttentionBackwardKvFn = void (*)(const AttentionBackward&, int64_t s, int64_t hk,
                                       int64_t k_begin, int64_t k_end);
using AttentionBackwardQFn = void (*)(const AttentionBackward&, int64_t s, int64_t h,
                                      int64_t q_begin, int64_t q_end);

// Block sizes the tasks are cut to.
constexpr int64_t kAttentionBlockQ = 64;
constexpr int64_t kAttentionBlockK = 64;

#define PYLLM_DECLARE_ATTENTION(isa)                                                       \
  namespace isa {                                                                          \
  void attention_forward(const AttentionForward&, int64_t, int64_t, int64_t, int64_t);     \
  void attention_decode(const AttentionForward&, int64_t, int64_t, int64_t, float*);       \
  void attention_backward_kv(const AttentionBackward&, int64_t, int64_t, int64_t, int64_t); \
  void attention_backward_q(const AttentionBackward&, int64_t, int64_t, int64_t, int64_t);  \
  }
PYLLM_DECLARE_ATTENTION(generic)
PYLLM_DECLARE_ATTENTION(avx2)
PYLLM_DECLARE_ATTENTION(avx512)
PYLLM_DECLARE_ATTENTION(avx512_bf16)
#undef PYLLM_DECLARE_ATTENTION

}  // namespace pyllm::cpu
