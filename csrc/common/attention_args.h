// The arguments of pyllm's attention kernels, CPU and CUDA alike: raw
// pointers, sizes and strides; the operator files have checked shapes. No
// torch here.
//
// Geometry. A batch of `batch` sequences; sequence s has len_q(s) queries and
// len_k(s) keys. Dense layout: q[s][t][h][d] with batch stride and token
// stride; variable-length layout: tokens of all sequences packed, sequence s
// owning tokens cu_q[s] .. cu_q[s+1] (cu_q/cu_k not null), batch stride 0.
// The head dimension is contiguous (stride 1) in q, k, v and out.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyllm {

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
  // Sliding window, flash-attn's window_size (-1: unbounded on that side):
  // query t sees keys j with t + shift - window_left <= j <= t + shift +
  // window_right, shift = len_k - len_q. causal is window_right = 0 (the
  // operators set it so; the CUDA kernels still read causal).
  int64_t window_left = -1;
  int64_t window_right = -1;
  float softcap = 0.f;  // > 0: scores become softcap * tanh(scores / softcap)
  // ALiBi (flash-attn's alibi_slopes), null: none. Query t of sequence s,
  // head h, gets -slope * |t + shift - j| added to its score of key j (after
  // the softcap), slope = alibi[s * alibi_batch_stride + h] (stride 0: one
  // slope per head for every sequence).
  const float* alibi = nullptr;
  int64_t alibi_batch_stride = 0;
  // Keys and values in pages (their TokenLayouts hold the block table):
  // cu_k gives the key counts only, each sequence's keys start at token 0.
  bool paged = false;
  // Batch-invariant mode (common/batch_invariant.h): no split-KV decode, and
  // every walk over keys starts at a multiple of its block (walk_start).
  bool batch_invariant = false;

  PYLLM_HOST_DEVICE int64_t len_q(int64_t s) const { return cu_q ? cu_q[s + 1] - cu_q[s] : seq_q; }
  PYLLM_HOST_DEVICE int64_t len_k(int64_t s) const { return cu_k ? cu_k[s + 1] - cu_k[s] : seq_k; }
  PYLLM_HOST_DEVICE int64_t first_q(int64_t s) const { return cu_q ? cu_q[s] : 0; }
  PYLLM_HOST_DEVICE int64_t first_k(int64_t s) const { return cu_k && !paged ? cu_k[s] : 0; }
  PYLLM_HOST_DEVICE float alibi_slope(int64_t s, int64_t h) const {
    return alibi ? alibi[s * alibi_batch_stride + h] : 0.f;
  }
  // The keys query t may see, [key_lo, key_hi) (clamped to [0, len_k]; empty
  // when key_hi <= key_lo), shift = len_k - len_q of its sequence.
  PYLLM_HOST_DEVICE int64_t key_lo(int64_t t, int64_t shift) const {
    const int64_t lo = window_left < 0 ? 0 : t + shift - window_left;
    return lo < 0 ? 0 : lo;
  }
  // Where a walk over keys in blocks of `block` starts for a range beginning
  // at key `lo`: lo itself, or in batch-invariant mode the multiple of `block`
  // at or below it, so that a query's keys fall into the same blocks whichever
  // queries share its tile (the keys before lo are masked and add nothing).
  PYLLM_HOST_DEVICE int64_t walk_start(int64_t lo, int64_t block) const {
    return batch_invariant ? lo / block * block : lo;
  }
  PYLLM_HOST_DEVICE int64_t key_hi(int64_t t, int64_t shift, int64_t len_k) const {
    if (window_right < 0) return len_k;
    const int64_t hi = t + shift + window_right + 1;
    return hi < 0 ? 0 : (hi > len_k ? len_k : hi);
  }
  // The queries that see any of keys [k_begin, k_end): [query_lo, query_hi).
  PYLLM_HOST_DEVICE int64_t query_lo(int64_t k_begin, int64_t shift) const {
    const int64_t lo = window_right < 0 ? 0 : k_begin - shift - window_right;
    return lo < 0 ? 0 : lo;
  }
  PYLLM_HOST_DEVICE int64_t query_hi(int64_t k_end, int64_t shift, int64_t len_q) const {
    if (window_left < 0) return len_q;
    const int64_t hi = k_end - shift + window_left;
    return hi < 0 ? 0 : (hi > len_q ? len_q : hi);
  }
};

// Where a [token][head][dim] tensor's elements are. Paged (block_table not
// null; keys and values only): token i of sequence s is row i % page_size of
// page block_table[s * table_stride + i / page_size], pages batch_stride
// apart (a (pages, page_size, heads, head_dim) tensor); the kernels' `first`
// token of a paged sequence is 0.
struct TokenLayout {
  void* data;
  int64_t batch_stride;  // 0 for varlen; the page stride when paged
  int64_t token_stride;
  int64_t head_stride;
  const int32_t* block_table = nullptr;
  int64_t page_size = 0;
  int64_t table_stride = 0;

  // The offset (in elements) of token i of sequence s, head h.
  PYLLM_HOST_DEVICE int64_t offset(int64_t s, int64_t i, int64_t h) const {
    if (block_table == nullptr) return s * batch_stride + i * token_stride + h * head_stride;
    const int64_t page = block_table[s * table_stride + i / page_size];
    return page * batch_stride + (i % page_size) * token_stride + h * head_stride;
  }
  // Whether tokens [i, i + count) of a sequence lie token_stride apart.
  PYLLM_HOST_DEVICE bool contiguous(int64_t i, int64_t count) const {
    return block_table == nullptr || count <= 1 || i / page_size == (i + count - 1) / page_size;
  }
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

}  // namespace pyllm
