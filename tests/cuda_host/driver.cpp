// C entry points into the host-model build of the CUDA kernels, for ctypes
// (tests/cuda_host_kernels.py). Each forwards to the same launch function
// the CUDA operators call, so launch configuration is tested too.

#include <cstdint>

#include "cuda/attention_kernel.h"
#include "cuda/cross_entropy_kernel.h"
#include "cuda/gemm_kernel.h"
#include "cuda/norm_kernel.h"
#include "cuda/paged_kv_kernel.h"
#include "cuda/rotary_kernel.h"

using namespace pyllm;
using namespace pyllm::cuda;

extern "C" {

int host_norm_forward(const void* x, const void* residual, const void* weight, const void* bias,
                      void* y, void* sum, float* mean, float* rstd, int64_t rows, int64_t n,
                      float eps, int x_type, int param_type, int rms) {
  const NormForward a{x,    residual, weight, bias, y, sum, mean, rstd, rows, n, eps,
                      static_cast<DType>(x_type), static_cast<DType>(param_type), rms != 0};
  return launch_norm_forward(a, nullptr);
}

int64_t host_norm_backward_chunks(int64_t rows, int64_t n) { return norm_backward_chunks(rows, n); }

int host_norm_backward(const void* grad_y, const void* x, const float* mean, const float* rstd,
                       const void* weight, const void* grad_sum, void* grad_x,
                       float* partial_weight, float* partial_bias, int64_t rows, int64_t n,
                       int x_type, int param_type, int rms) {
  const NormBackward a{grad_y, x, mean, rstd, weight, grad_sum, grad_x, partial_weight,
                       partial_bias, rows, n, static_cast<DType>(x_type),
                       static_cast<DType>(param_type), rms != 0};
  return launch_norm_backward(a, nullptr);
}

int host_column_sum(const float* partial, int64_t chunks, int64_t n, float* out) {
  return launch_column_sum(partial, chunks, n, out, nullptr);
}

int host_gemm(const void* a, const void* b, const void* b2, const float* bias, const float* bias2,
              const void* grad, void* out, void* out2, int64_t m, int64_t n, int64_t k,
              int64_t lda, int64_t ldb, int64_t ldc, int64_t ldg, int type, int activation, int epilogue) {
  const Gemm g{a, b, b2, bias, bias2, grad, out, out2, m, n, k, lda, ldb, ldc, ldg,
               static_cast<DType>(type), static_cast<Activation>(activation),
               static_cast<GemmEpilogue>(epilogue)};
  return launch_gemm(g, nullptr);
}

// Attention. geometry: batch, heads, heads_kv, head_dim, seq_q, seq_k,
// window_left, window_right (-1: unbounded; causal sets the right one to 0,
// as the operators do), the ALiBi slopes' batch stride (0 or heads; alibi
// null: none), batch-invariant mode (0 or 1); token_strides: (batch, token, head) strides of q, k,
// v, out (and for the backward grad_out, grad_q, grad_k, grad_v);
// lse_strides: (batch, head); bias_strides: (batch, head, q, k).
static AttentionGeometry geometry(const int64_t* g, const int32_t* cu_q, const int32_t* cu_k,
                                  float scale, float softcap, int causal,
                                  const float* alibi = nullptr) {
  AttentionGeometry out{g[0], g[1], g[2], g[3], g[4], g[5], cu_q, cu_k, scale, causal != 0};
  out.window_left = g[6];
  out.window_right = causal != 0 ? 0 : g[7];
  out.softcap = softcap;
  out.alibi = alibi;
  out.alibi_batch_stride = g[8];
  out.batch_invariant = g[9] != 0;
  return out;
}

static TokenLayout tokens(const void* data, const int64_t* strides) {
  return TokenLayout{const_cast<void*>(data), strides[0], strides[1], strides[2]};
}

int64_t host_attention_forward_workspace(const int64_t* g) {
  return attention_forward_workspace(geometry(g, nullptr, nullptr, 1.f, 0.f, 0));
}

int host_attention_forward(const int64_t* g, const int32_t* cu_q, const int32_t* cu_k,
                           float scale, float softcap, const float* alibi, int causal, int type, const void* q, const void* k,
                           const void* v, void* out, const int64_t* token_strides, float* lse,
                           const int64_t* lse_strides, const void* bias, int bias_type,
                           const int64_t* bias_strides, float* workspace) {
  const AttentionForward a{geometry(g, cu_q, cu_k, scale, softcap, causal, alibi),
                           tokens(q, token_strides),
                           tokens(k, token_strides + 3),
                           tokens(v, token_strides + 6),
                           tokens(out, token_strides + 9),
                           BiasLayout{bias, bias_strides[0], bias_strides[1], bias_strides[2],
                                      bias_strides[3], static_cast<DType>(bias_type)},
                           LseLayout{lse, lse_strides[0], lse_strides[1]},
                           static_cast<DType>(type)};
  return launch_attention_forward(a, workspace, nullptr);
}

// The forward over a paged KV cache: k and v strides (page, token, head),
// block_table (batch, table_stride) int32, pages of page_size tokens.
int host_attention_forward_paged(const int64_t* g, const int32_t* cu_q, const int32_t* cu_k,
                                 float scale, float softcap, const float* alibi, int causal,
                                 int type, const void* q, const void* k, const void* v, void* out,
                                 const int64_t* token_strides, float* lse,
                                 const int64_t* lse_strides, const int32_t* block_table,
                                 int64_t page_size, int64_t table_stride, float* workspace) {
  AttentionGeometry geo = geometry(g, cu_q, cu_k, scale, softcap, causal, alibi);
  geo.paged = true;
  TokenLayout kl = tokens(k, token_strides + 3), vl = tokens(v, token_strides + 6);
  for (TokenLayout* l : {&kl, &vl}) {
    l->block_table = block_table;
    l->page_size = page_size;
    l->table_stride = table_stride;
  }
  const AttentionForward a{geo, tokens(q, token_strides), kl, vl, tokens(out, token_strides + 9),
                           BiasLayout{nullptr, 0, 0, 0, 0, DType::f32},
                           LseLayout{lse, lse_strides[0], lse_strides[1]},
                           static_cast<DType>(type)};
  return launch_attention_forward(a, workspace, nullptr);
}

int host_attention_backward(const int64_t* g, const int32_t* cu_q, const int32_t* cu_k,
                            float scale, float softcap, const float* alibi, int causal, int type, const void* q, const void* k,
                            const void* v, const void* out, const void* grad_out, void* grad_q,
                            void* grad_k, void* grad_v, const int64_t* token_strides,
                            const float* lse, const float* delta, const int64_t* lse_strides,
                            const void* bias, int bias_type, const int64_t* bias_strides) {
  const AttentionBackward a{geometry(g, cu_q, cu_k, scale, softcap, causal, alibi),
                            tokens(q, token_strides),
                            tokens(k, token_strides + 3),
                            tokens(v, token_strides + 6),
                            tokens(out, token_strides + 9),
                            tokens(grad_out, token_strides + 12),
                            tokens(grad_q, token_strides + 15),
                            tokens(grad_k, token_strides + 18),
                            tokens(grad_v, token_strides + 21),
                            BiasLayout{bias, bias_strides[0], bias_strides[1], bias_strides[2],
                                       bias_strides[3], static_cast<DType>(bias_type)},
                            LseLayout{const_cast<float*>(lse), lse_strides[0], lse_strides[1]},
                            delta,
                            static_cast<DType>(type)};
  return launch_attention_backward(a, nullptr);
}

// The paged-KV append. rows: (page, row, head) strides and rows per page of
// k, v, k_pages, v_pages (k and v: page stride 0, one page of every row);
// sizes: tokens, heads, head_dim, half (0: no rotary), max_positions.
int host_paged_kv_append(const void* k, const void* v, void* k_pages, void* v_pages,
                         const int64_t* rows, const int64_t* slots, const float* cos,
                         const float* sin, const int64_t* positions, const int64_t* sizes,
                         int type, int interleaved) {
  const auto at = [&](const void* data, int i) {
    return KvRows{const_cast<void*>(data), rows[4 * i], rows[4 * i + 1], rows[4 * i + 2],
                  rows[4 * i + 3]};
  };
  const PagedKvAppend a{at(k, 0),   at(v, 1), at(k_pages, 2), at(v_pages, 3), slots,
                        sizes[0],   sizes[1], sizes[2],       sizes[3] > 0 ? cos : nullptr,
                        sin,        positions, sizes[3],      sizes[4],
                        interleaved != 0,    static_cast<DType>(type)};
  return launch_paged_kv_append(a, nullptr);
}

// Rotary embedding, in place on q and k. tensors: (batch, seq, head) strides
// and heads of q then k; sizes: batch, seq, head_dim, half, max_positions.
int host_rotary(void* q, void* k, const int64_t* tensors, const float* cos, const float* sin,
                const int64_t* positions, const int64_t* sizes, int type, int interleaved,
                int conjugate) {
  const Rotary r{RotaryTensor{q, tensors[0], tensors[1], tensors[2], tensors[3]},
                 RotaryTensor{k, tensors[4], tensors[5], tensors[6], tensors[7]},
                 cos, sin, positions, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4],
                 static_cast<DType>(type), interleaved != 0, conjugate != 0};
  return launch_rotary(r, nullptr);
}

// Cross-entropy: sizes rows, vocab, logits_stride, ignore_index; grad may be null.
int host_cross_entropy(const void* logits, const int64_t* target, float* loss, float* lse,
                       void* grad, const int64_t* sizes, float label_smoothing, float z_loss,
                       float softcap, int type) {
  const CrossEntropy a{logits, target, loss, lse, grad, sizes[0], sizes[1], sizes[2], sizes[3],
                       label_smoothing, z_loss, softcap, static_cast<DType>(type)};
  return launch_cross_entropy(a, nullptr);
}

}  // extern "C"
