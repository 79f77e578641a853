// The pyllm operator schemas, declared once for every backend.
//
// Each operator is declared under two names built from one signature:
//   pyllm::<op>         served by the C++ kernels: the CPU key from pyllm._C
//                       (csrc/cpu/), the CUDA key from pyllm._C_cuda (csrc/cuda/);
//   pyllm::<op>_triton  served by the Triton kernels (kernels/), registered
//                       from Python for the CUDA key (and the CPU key when the
//                       Triton interpreter is on).
// Triton and CUDA C++ both serve CUDA tensors and the dispatcher has one CUDA
// slot per operator, so the backend is chosen by picking the name
// (pyllm/backend.py); a traced graph still holds exactly one op per call.
// Fake (meta) kernels and autograd are registered next to each op's Python
// face in pyllm/ops/.

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#define PYLLM_DEF(m, name, signature) \
  m.def(name signature);              \
  m.def(name "_triton" signature)

// Backward ops are not differentiable again: differentiating one raises
// "derivative for pyllm::<op>_backward is not implemented".
#define PYLLM_ONCE_DIFFERENTIABLE(m, name)                                \
  m.impl(name, torch::autograd::autogradNotImplementedFallback());       \
  m.impl(name "_triton", torch::autograd::autogradNotImplementedFallback())

TORCH_LIBRARY(pyllm, m) {
  // Before each op family: the Python module that holds its fake kernels,
  // which torch names when only this library was loaded.
  m.set_python_module("pyllm.ops.rms_norm");
  // RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * weight.
  // Returns (y, rstd); rstd is float32 with shape x.shape[:-1].
  PYLLM_DEF(m, "rms_norm", "(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // RMSNorm of s = x + residual (rounded to x's dtype); returns (y, s, rstd).
  PYLLM_DEF(m, "add_rms_norm",
            "(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");
  // Gradients of (add_)rms_norm from the input it normalised (x, or the sum)
  // and the rstd it saved; grad_sum, the gradient reaching the sum output, is
  // added to grad_x. output_mask selects (grad_x, grad_weight); an unselected
  // gradient comes back as None.
  PYLLM_DEF(m, "rms_norm_backward",
            "(Tensor grad_y, Tensor x, Tensor rstd, Tensor? weight, Tensor? grad_sum,"
            " bool[2] output_mask) -> (Tensor, Tensor)");

  m.set_python_module("pyllm.ops.layer_norm");
  // LayerNorm over the last dimension; returns (y, mean, rstd), float32 stats.
  PYLLM_DEF(m, "layer_norm",
            "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // LayerNorm of s = x + residual; returns (y, s, mean, rstd).
  PYLLM_DEF(m, "add_layer_norm",
            "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
            " -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of (add_)layer_norm; output_mask selects (grad_x, grad_weight,
  // grad_bias).
  PYLLM_DEF(m, "layer_norm_backward",
            "(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? grad_sum,"
            " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  m.set_python_module("pyllm.ops.attention");
  // Scaled dot-product attention, FlashAttention-style. Dense: q (batch,
  // seq_q, heads, head_dim), k/v (batch, seq_k, heads_kv, head_dim); varlen
  // (cu_seqlens given): q (total_q, heads, head_dim), k/v (total_k, heads_kv,
  // head_dim) with int32 cumulative lengths and the longest lengths. bias:
  // additive, broadcastable to (batch, heads, seq_q, seq_k). causal: aligned
  // to the bottom-right. window_left/right: a sliding window (flash-attn's
  // window_size, -1 unbounded; causal is window_right = 0). softcap > 0:
  // scores softcap * tanh(scores / softcap) before the bias. alibi_slopes:
  // float32 (heads,) or (batch, heads), -slope * |i + seq_k - seq_q - j|
  // added to query i's score of key j (flash-attn's). Returns (out like q,
  // lse float32: dense (batch, heads, seq_q), varlen (heads, total_q)); a
  // query that sees no key gives zeros and lse = +inf. block_table (varlen
  // only; forward only): k/v are pages (pages, page_size, heads_kv,
  // head_dim), sequence s's key i is row i % page_size of page
  // block_table[s, i / page_size], cu_seqlens_k gives the key counts.
  PYLLM_DEF(m, "attention",
            "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
            " int max_seqlen_q, int max_seqlen_k, Tensor? bias, float scale, bool causal,"
            " int window_left=-1, int window_right=-1, float softcap=0.,"
            " Tensor? alibi_slopes=None, Tensor? block_table=None) -> (Tensor, Tensor)");
  // Gradients (dq, dk, dv) of attention from its out and lse. The bias gets
  // no gradient.
  PYLLM_DEF(m, "attention_backward",
            "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
            " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,"
            " Tensor? bias, float scale, bool causal, int window_left=-1, int window_right=-1,"
            " float softcap=0., Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)");

  m.set_python_module("pyllm.ops.linear");
  // y = act(x @ weight^T + bias), the epilogue fused: x (..., in), weight
  // (out, in), bias (out,) or None; activation none, gelu, gelu_tanh or silu.
  PYLLM_DEF(m, "linear", "(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
  // The SwiGLU gate in one pass over x:
  // silu(x @ weight_gate^T + bias_gate) * (x @ weight_up^T + bias_up).
  PYLLM_DEF(m, "swiglu",
            "(Tensor x, Tensor weight_gate, Tensor weight_up, Tensor? bias_gate, Tensor? bias_up)"
            " -> Tensor");
  // Gradients of linear; output_mask selects (grad_x, grad_weight, grad_bias).
  PYLLM_DEF(m, "linear_backward",
            "(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, str activation,"
            " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Gradients of swiglu: (grad_x, grad_weight_gate, grad_weight_up,
  // grad_bias_gate, grad_bias_up), selected by output_mask.
  PYLLM_DEF(m, "swiglu_backward",
            "(Tensor grad_y, Tensor x, Tensor weight_gate, Tensor weight_up, Tensor? bias_gate,"
            " Tensor? bias_up, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The CPU kernels' training pair (csrc/autograd/linear.cpp uses it for CPU
  // tensors): the forward also returns its pre-activations x @ W^T + b,
  // float32 of y's shape (linear: preact; swiglu: gate, up), and the backward
  // takes them instead of recomputing the products. One name each: no
  // Triton twin.
  m.def("linear_with_preact(Tensor x, Tensor weight, Tensor? bias, str activation)"
        " -> (Tensor, Tensor)");
  m.def("linear_backward_from_preact(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias,"
        " Tensor preact, str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_with_preact(Tensor x, Tensor weight_gate, Tensor weight_up, Tensor? bias_gate,"
        " Tensor? bias_up) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_backward_from_preact(Tensor grad_y, Tensor x, Tensor weight_gate,"
        " Tensor weight_up, Tensor? bias_gate, Tensor? bias_up, Tensor gate, Tensor up,"
        " bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Pre-packed weights for inference (CPU): pack_linear_weight lays an
  // (out_features, in_features) weight out as the panels the CPU GEMM would
  // pack from it on every call (layout per instruction set, see
  // csrc/cpu/linear.cpp); linear_packed / swiglu_packed are linear / swiglu
  // with packed weights in place of the weights (same results). Not
  // differentiable in the packed weights: inference only.
  m.set_python_module("pyllm.ops.packed_linear");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor packed, int out_features, Tensor? bias, str activation)"
        " -> Tensor");
  m.def("swiglu_packed(Tensor x, Tensor packed_gate, Tensor packed_up, int out_features,"
        " Tensor? bias_gate, Tensor? bias_up) -> Tensor");

  m.set_python_module("pyllm.ops.rotary");
  // Rotary position embedding, in place on q (batch, seq, heads, head_dim)
  // and k (batch, seq, heads_kv, head_dim), head_dim contiguous: the first
  // rotary_dim = 2 * cos.size(1) elements of every head of token (b, s) are
  // rotated by the angles of position positions[b, s] (int64, (batch, seq)),
  // cos/sin float32 (max_positions, rotary_dim / 2); pairs (i, i + rotary_dim
  // / 2) (GPT-NeoX) or (2i, 2i + 1) (interleaved, GPT-J). conjugate rotates
  // by minus the angle (the backward). Computed in float32, rounded once.
  PYLLM_DEF(m, "rotary",
            "(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions,"
            " bool interleaved, bool conjugate) -> ()");

  m.set_python_module("pyllm.ops.paged_kv");
  // A paged KV cache's append: token t's key and value rows (k, v (tokens,
  // heads_kv, head_dim)) written to row slots[t] % page_size of page
  // slots[t] / page_size of k_pages / v_pages (pages, page_size, heads_kv,
  // head_dim); slots (tokens,) int64, < 0: not written. With cos, sin and
  // positions ((tokens,) int64) the key is rotated on the way, as
  // pyllm::rotary (the pages get the rotated key, k is unchanged).
  PYLLM_DEF(m, "paged_kv_append",
            "(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor k, Tensor v, Tensor slots,"
            " Tensor? cos, Tensor? sin, Tensor? positions, bool interleaved) -> ()");

  m.set_python_module("pyllm.ops.cross_entropy");
  // Cross-entropy of each row of logits (rows, vocab), vocab contiguous,
  // against target (rows,) int64, with z = softcap * tanh(logits / softcap)
  // when softcap > 0: loss_i = lse_i - (1 - label_smoothing) z_it -
  // label_smoothing mean_j z_ij + z_loss lse_i^2, lse_i = logsumexp_j z_ij,
  // all in float32; rows whose target is ignore_index give 0. Returns (loss
  // float32 (rows,), lse float32 (rows,), grad): grad (rows, vocab) in logits'
  // dtype = d loss_i / d logits_i when want_grad (else empty), zero rows where
  // ignored.
  PYLLM_DEF(m, "cross_entropy",
            "(Tensor logits, Tensor target, int ignore_index, float label_smoothing,"
            " float z_loss, float softcap, bool want_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyllm, Autograd, m) {
  PYLLM_ONCE_DIFFERENTIABLE(m, "rms_norm_backward");
  PYLLM_ONCE_DIFFERENTIABLE(m, "layer_norm_backward");
  PYLLM_ONCE_DIFFERENTIABLE(m, "attention_backward");
  PYLLM_ONCE_DIFFERENTIABLE(m, "linear_backward");
  PYLLM_ONCE_DIFFERENTIABLE(m, "swiglu_backward");
  // Called below autograd by csrc/autograd/linear.cpp; differentiating one
  // called directly raises.
  for (const char* name : {"linear_with_preact", "swiglu_with_preact",
                           "linear_backward_from_preact", "swiglu_backward_from_preact",
                           "pack_linear_weight", "linear_packed", "swiglu_packed"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}
