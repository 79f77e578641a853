// Argument preparation shared by the CPU and CUDA attention operators:
// checks that guard the memory the kernels touch (the user-facing checks
// live in pyllm/ops/attention.py), and the kernels' argument structs built
// from tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "attention_args.h"
#include "batch_invariant.h"
#include "tensor_args.h"

namespace pyllm {

using at::Tensor;
using c10::optional;

constexpr int64_t kMaxHeadDim = 256;

inline Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline TokenLayout layout(const Tensor& t, bool varlen) {
  return {t.data_ptr(), varlen ? 0 : t.stride(0), t.stride(varlen ? 0 : 1),
          t.stride(varlen ? 1 : 2)};
}

// Keys or values in pages (pages, page_size, heads_kv, head_dim) read
// through a block table (batch, pages per sequence).
inline TokenLayout paged_layout(const Tensor& t, const Tensor& block_table) {
  TokenLayout l{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
  l.block_table = block_table.data_ptr<int32_t>();
  l.page_size = t.size(1);
  l.table_stride = block_table.stride(0);
  return l;
}

struct Prepared {
  AttentionGeometry g;
  Tensor q, k, v, bias, cu_q, cu_k, alibi, block_table;
  bool varlen;
  TokenLayout k_layout() const { return block_table.defined() ? paged_layout(k, block_table) : layout(k, varlen); }
  TokenLayout v_layout() const { return block_table.defined() ? paged_layout(v, block_table) : layout(v, varlen); }
};

inline Prepared prepare(const char* op, c10::DeviceType device_type, const Tensor& q_in,
                        const Tensor& k_in, const Tensor& v_in,
                        const optional<Tensor>& cu_q_in, const optional<Tensor>& cu_k_in,
                        int64_t max_q, int64_t max_k, const optional<Tensor>& bias_in,
                        double scale, bool causal, int64_t window_left = -1,
                        int64_t window_right = -1, double softcap = 0.0,
                        const optional<Tensor>& alibi_in = c10::nullopt,
                        const optional<Tensor>& block_table_in = c10::nullopt) {
  const bool varlen = cu_q_in.has_value();
  const bool paged = block_table_in.has_value();
  TORCH_CHECK_VALUE(varlen == cu_k_in.has_value(), "pyllm::", op,
                    ": give both cu_seqlens_q and cu_seqlens_k, or neither");
  TORCH_CHECK_VALUE(!paged || varlen, "pyllm::", op,
                    ": a block_table needs cu_seqlens_q and cu_seqlens_k");
  const int64_t dims = varlen ? 3 : 4;
  for (const Tensor* t : {&q_in, &k_in, &v_in}) {
    const int64_t want = paged && t != &q_in ? 4 : dims;
    TORCH_CHECK_VALUE(t->dim() == want && t->device().type() == device_type &&
                          t->device() == q_in.device(),
                      "pyllm::", op, ": q, k, v must be ", dims, "-D ",
                      paged ? "(k and v 4-D pages) " : "", c10::DeviceTypeName(device_type),
                      " tensors on one device for this kernel");
    TORCH_CHECK_TYPE(t->scalar_type() == q_in.scalar_type(), "pyllm::", op,
                     ": q, k, v must have one dtype");
  }
  kernel_dtype(q_in, "q");
  Prepared p;
  p.varlen = varlen;
  p.q = last_dim_contiguous(q_in);
  p.k = last_dim_contiguous(k_in);
  p.v = last_dim_contiguous(v_in);
  AttentionGeometry& g = p.g;
  g.head_dim = q_in.size(-1);
  g.heads = q_in.size(-2);
  g.heads_kv = k_in.size(-2);
  TORCH_CHECK_VALUE(g.head_dim >= 1 && g.head_dim <= kMaxHeadDim && k_in.size(-1) == g.head_dim &&
                        v_in.size(-1) == g.head_dim,
                    "pyllm::", op, ": q, k, v must share a head_dim of at most ", kMaxHeadDim);
  TORCH_CHECK_VALUE(g.heads_kv >= 1 && v_in.size(-2) == g.heads_kv && g.heads % g.heads_kv == 0,
                    "pyllm::", op, ": k and v heads must divide q heads");
  TORCH_CHECK_VALUE(k_in.sizes() == v_in.sizes(), "pyllm::", op, ": k and v must have one shape");
  g.scale = static_cast<float>(scale);
  g.causal = causal;
  g.batch_invariant = batch_invariant();
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "pyllm::", op,
                    ": window sizes must be -1 (unbounded) or >= 0, got (", window_left, ", ",
                    window_right, ")");
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), "pyllm::", op,
                    ": softcap must be a finite number >= 0 (0: none), got ", softcap);
  g.window_left = window_left;
  g.window_right = causal ? 0 : window_right;
  g.softcap = static_cast<float>(softcap);
  g.cu_q = g.cu_k = nullptr;
  if (varlen) {
    p.cu_q = cu_q_in->contiguous();
    p.cu_k = cu_k_in->contiguous();
    for (const Tensor* cu : {&p.cu_q, &p.cu_k}) {
      TORCH_CHECK_VALUE(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() >= 1 &&
                            cu->device() == q_in.device() && cu->numel() == p.cu_q.numel(),
                        "pyllm::", op, ": cu_seqlens must be 1-D int32 tensors of batch + 1 on ",
                        q_in.device());
    }
    g.batch = p.cu_q.numel() - 1;
    g.cu_q = p.cu_q.data_ptr<int32_t>();
    g.cu_k = p.cu_k.data_ptr<int32_t>();
    // The kernels index memory with these: check them (on the host; for
    // device tensors that is a copy of batch + 1 integers).
    const Tensor host_q = p.cu_q.cpu(), host_k = p.cu_k.cpu();
    const int32_t* cq = host_q.data_ptr<int32_t>();
    const int32_t* ck = host_k.data_ptr<int32_t>();
    int64_t longest_q = 0, longest_k = 0;
    for (int64_t s = 0; s < g.batch; ++s) {
      TORCH_CHECK_VALUE(cq[s + 1] >= cq[s] && ck[s + 1] >= ck[s], "pyllm::", op,
                        ": cu_seqlens must not decrease");
      longest_q = std::max<int64_t>(longest_q, cq[s + 1] - cq[s]);
      longest_k = std::max<int64_t>(longest_k, ck[s + 1] - ck[s]);
    }
    TORCH_CHECK_VALUE(cq[0] == 0 && ck[0] == 0 && cq[g.batch] == q_in.size(0) &&
                          (paged || ck[g.batch] == k_in.size(0)),
                      "pyllm::", op, ": cu_seqlens must run from 0 to the number of tokens");
    if (paged) {
      // Every page a sequence's keys use must be a page of k and v.
      const Tensor& table = *block_table_in;
      const int64_t page_size = k_in.size(1), pages = k_in.size(0);
      TORCH_CHECK_VALUE(table.scalar_type() == at::kInt && table.dim() == 2 &&
                            table.size(0) == g.batch && table.stride(1) == 1 &&
                            table.device() == q_in.device() && page_size >= 1,
                        "pyllm::", op, ": block_table must be an int32 (batch, pages) tensor "
                        "with contiguous rows on ", q_in.device(), ", got ", table.sizes());
      p.block_table = table;
      const Tensor host_table = table.cpu();
      const int32_t* bt = host_table.data_ptr<int32_t>();
      for (int64_t s = 0; s < g.batch; ++s) {
        const int64_t used = (ck[s + 1] - ck[s] + page_size - 1) / page_size;
        TORCH_CHECK_VALUE(used <= table.size(1), "pyllm::", op, ": sequence ", s, " has ",
                          ck[s + 1] - ck[s], " keys, more than its ", table.size(1),
                          " pages of ", page_size, " hold");
        for (int64_t i = 0; i < used; ++i) {
          const int32_t page = bt[s * host_table.stride(0) + i];
          TORCH_CHECK_VALUE(page >= 0 && page < pages, "pyllm::", op, ": block_table[", s, ", ",
                            i, "] = ", page, " is not a page (0 <= page < ", pages, ")");
        }
      }
      g.paged = true;
    }
    TORCH_CHECK_VALUE(max_q >= longest_q && max_k >= longest_k, "pyllm::", op,
                      ": max_seqlen_q/k must be at least the longest sequence");
    g.seq_q = max_q;
    g.seq_k = max_k;
  } else {
    g.batch = q_in.size(0);
    g.seq_q = q_in.size(1);
    g.seq_k = k_in.size(1);
    TORCH_CHECK_VALUE(k_in.size(0) == g.batch, "pyllm::", op, ": q and k batch sizes differ");
  }
  if (bias_in.has_value()) {
    TORCH_CHECK_TYPE(bias_in->scalar_type() == q_in.scalar_type() ||
                         bias_in->scalar_type() == at::kFloat,
                     "pyllm::", op, ": bias must be ", q_in.scalar_type(), " or float32");
    TORCH_CHECK_VALUE(bias_in->dim() <= 4 && bias_in->device() == q_in.device(), "pyllm::", op,
                      ": bias must broadcast to (batch, heads, seq_q, seq_k)");
    p.bias = bias_in->expand({g.batch, g.heads, g.seq_q, g.seq_k});
  }
  if (alibi_in.has_value()) {
    const Tensor& a = *alibi_in;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "pyllm::", op,
                     ": alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.device() == q_in.device() &&
                          ((a.dim() == 1 && a.size(0) == g.heads) ||
                           (a.dim() == 2 && a.size(0) == g.batch && a.size(1) == g.heads)),
                      "pyllm::", op, ": alibi_slopes must be (heads,) = (", g.heads,
                      ",) or (batch, heads) = (", g.batch, ", ", g.heads, ") on ", q_in.device(),
                      ", got ", a.sizes());
    p.alibi = a.contiguous();
    g.alibi = p.alibi.data_ptr<float>();
    g.alibi_batch_stride = a.dim() == 2 ? g.heads : 0;
  }
  return p;
}

inline BiasLayout bias_layout(const Tensor& bias) {
  if (!bias.defined()) return {nullptr, 0, 0, 0, 0, DType::f32};
  return {bias.data_ptr(), bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3),
          kernel_dtype(bias, "bias")};
}

inline LseLayout lse_layout(const Tensor& lse, const AttentionGeometry& g, bool varlen) {
  return {lse.data_ptr<float>(), varlen ? 0 : g.heads * g.seq_q, lse.size(-1)};
}

inline Tensor new_lse(const Prepared& p, const Tensor& q) {
  const auto options = q.options().dtype(at::kFloat);
  if (p.varlen) return at::empty({p.g.heads, q.size(0)}, options);
  return at::empty({p.g.batch, p.g.heads, p.g.seq_q}, options);
}

// The backward's own inputs, checked against q; delta = rowsum(grad_out *
// out) laid out like lse is left to the device (delta_like_lse lays it out), which sums it
// the way its kernels sum dP.
struct PreparedBackward {
  Tensor grad_out, out, lse, delta;
};

inline PreparedBackward prepare_backward(const Prepared& p, const Tensor& q_in,
                                         const Tensor& grad_out_in, const Tensor& out_in,
                                         const Tensor& lse_in) {
  for (const Tensor* t : {&grad_out_in, &out_in}) {
    TORCH_CHECK_VALUE(t->sizes() == q_in.sizes() && t->scalar_type() == q_in.scalar_type() &&
                          t->device() == q_in.device(),
                      "pyllm::attention_backward: grad_out and out must match q");
  }
  const Tensor expected_lse = new_lse(p, p.q);
  TORCH_CHECK_VALUE(lse_in.sizes() == expected_lse.sizes() && lse_in.scalar_type() == at::kFloat &&
                        lse_in.device() == q_in.device(),
                    "pyllm::attention_backward: lse must be float32 of shape ",
                    expected_lse.sizes());
  PreparedBackward b;
  b.grad_out = last_dim_contiguous(grad_out_in);
  b.out = last_dim_contiguous(out_in);
  b.lse = lse_in.contiguous();
  return b;
}

// rowsum(grad_out * out) of shape q.shape[:-1], laid out like lse.
inline Tensor delta_like_lse(const Prepared& p, const Tensor& row_sums) {
  return (p.varlen ? row_sums.t() : row_sums.permute({0, 2, 1})).contiguous();
}

// The backward kernels' arguments; grad_q/k/v shaped like q/k/v.
inline AttentionBackward backward_args(const Prepared& p, const PreparedBackward& b,
                                       const Tensor& grad_q, const Tensor& grad_k,
                                       const Tensor& grad_v) {
  return AttentionBackward{p.g,
                           layout(p.q, p.varlen),
                           layout(p.k, p.varlen),
                           layout(p.v, p.varlen),
                           layout(b.out, p.varlen),
                           layout(b.grad_out, p.varlen),
                           layout(grad_q, p.varlen),
                           layout(grad_k, p.varlen),
                           layout(grad_v, p.varlen),
                           bias_layout(p.bias),
                           lse_layout(b.lse, p.g, p.varlen),
                           b.delta.data_ptr<float>(),
                           kernel_dtype(p.q, "q")};
}

// The forward kernels' arguments.
inline AttentionForward forward_args(const Prepared& p, const Tensor& out, const Tensor& lse) {
  return AttentionForward{p.g,
                          layout(p.q, p.varlen),
                          p.k_layout(),
                          p.v_layout(),
                          layout(out, p.varlen),
                          bias_layout(p.bias),
                          lse_layout(lse, p.g, p.varlen),
                          kernel_dtype(p.q, "q")};
}

}  // namespace pyllm
