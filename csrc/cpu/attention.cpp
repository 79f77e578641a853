// pyllm::attention and pyllm::attention_backward for CPU tensors.
//
// Dense inputs are (batch, seq, heads, head_dim); variable-length inputs are
// (total_tokens, heads, head_dim) with int32 cumulative sequence lengths. The
// work is cut into independent tasks (query blocks for the forward and dQ,
// key blocks for dK/dV, key slices for decode) run with at::parallel_for; the
// kernels are in kernels/attention_kernel.h.
//
// The user-facing argument checks live in pyllm/ops/attention.py and run for
// every backend; the checks here only guard the memory the kernels touch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_op.h"
#include "isa.h"
#include "kernels/attention.h"
#include "output.h"
#include "../common/attention_prepare.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {
namespace {

using at::Tensor;
using c10::optional;

// Queries per sequence up to which the decode path (split keys) is taken.
constexpr int64_t kDecodeMaxQueries = 8;
// Keys per decode slice, at least.
constexpr int64_t kDecodeMinSlice = 256;
// Multiply-adds of Q K^T in a sequence from which the decode path shares the
// kv heads out among idle threads (below it, waking a thread costs more).
constexpr int64_t kDecodeMinHeadWork = 1 << 17;

// Tasks: for each sequence, `per_seq` units (heads) times the blocks of
// `block` that its length (from `length`) needs. Runs fn(s, unit, begin, end)
// for each, in parallel.
template <typename Length, typename Fn>
void for_each_block(const AttentionGeometry& g, int64_t per_seq, int64_t block, Length length,
                    Fn fn) {
  std::vector<int64_t> first(g.batch + 1, 0);  // first task of each sequence
  for (int64_t s = 0; s < g.batch; ++s) {
    const int64_t blocks = (length(s) + block - 1) / block;
    first[s + 1] = first[s] + per_seq * blocks;
  }
  at::parallel_for(0, first[g.batch], 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const int64_t blocks = (length(s) + block - 1) / block;
      const int64_t local = t - first[s];
      const int64_t unit = local / blocks, b = local % blocks;
      fn(s, unit, b * block, std::min(length(s), (b + 1) * block));
    }
  });
}

AttentionForwardFn forward_kernel() {
  return pick_isa<AttentionForwardFn>(generic::attention_forward, avx2::attention_forward,
                                      avx512::attention_forward, avx512_bf16::attention_forward);
}

AttentionDecodeFn decode_kernel() {
  return pick_isa<AttentionDecodeFn>(generic::attention_decode, avx2::attention_decode,
                                     avx512::attention_decode, avx512_bf16::attention_decode);
}

template <typename T>
void store_typed(const float* src, int64_t n, void* dst) {
  T* out = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = from_f32<T>(src[i]);
}

void store_row(DType type, const float* src, int64_t n, void* dst) {
  switch (type) {
    case DType::f32: return store_typed<float>(src, n, dst);
    case DType::bf16: return store_typed<bf16>(src, n, dst);
    case DType::f16: return store_typed<f16>(src, n, dst);
  }
}

// The decode path: each sequence's keys are cut into slices run in parallel
// (each slice covering every head), whose unnormalised (o, m, l) per row are
// combined afterwards: m = max m_i, l = sum l_i 2^(m_i - m),
// o = sum o_i 2^(m_i - m) / l. Where sequences x slices leave threads idle
// (one sequence of fewer than 2 x kDecodeMinSlice keys: a decode step of a
// short context), the kv heads are shared out too; a row's result is the
// same either way (its keys' slices do not change).
void decode(const AttentionForward& a) {
  const AttentionGeometry& g = a.g;
  const int64_t D = g.head_dim;
  const int64_t rows = g.heads * g.seq_q;  // rows of a sequence, at most
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + g.batch - 1) / g.batch);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, g.seq_k / kDecodeMinSlice));
  const int64_t work = rows * g.seq_k * D;  // multiply-adds of Q K^T, of a sequence at most
  const int64_t parts =
      g.batch * splits >= threads || work < kDecodeMinHeadWork
          ? 1
          : std::min(g.heads_kv, (threads + g.batch * splits - 1) / (g.batch * splits));
  std::vector<float> partial(static_cast<size_t>(g.batch * splits * rows * (D + 2)));
  const AttentionDecodeFn kernel = decode_kernel();
  at::parallel_for(0, g.batch * splits * parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t slice = t / parts, part = t % parts;
      const int64_t s = slice / splits, split = slice % splits;
      const int64_t lk = g.len_k(s);
      // Paged keys: slices of whole kLanes chunks (see decode_task).
      const int64_t per = g.paged ? (lk + splits * 16 - 1) / (splits * 16) * 16
                                  : (lk + splits - 1) / splits;
      const int64_t k_begin = std::min(lk, split * per), k_end = std::min(lk, k_begin + per);
      const int64_t hk_begin = g.heads_kv * part / parts, hk_end = g.heads_kv * (part + 1) / parts;
      kernel(a, s, hk_begin, hk_end, k_begin, k_end, partial.data() + slice * rows * (D + 2));
    }
  });
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t element = static_cast<int64_t>(a.type == DType::f32 ? 4 : 2);
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> acc(D);
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t s = unit / g.heads, h = unit % g.heads, lq = g.len_q(s);
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t r = h * lq + i;
        const auto slice = [&](int64_t split) {
          return partial.data() + ((s * splits + split) * rows + r) * (D + 2);
        };
        // A slice that saw no key keeps m = -inf and adds nothing; every
        // other slice counts, one with a NaN m or l included (a NaN input
        // shows in the row, as in PyTorch, instead of looking masked).
        float m = -kInf;
        bool seen = false;
        for (int64_t split = 0; split < splits; ++split) {
          const float ms = slice(split)[D];
          if (ms == -kInf) continue;
          seen = true;
          if (!std::isnan(m) && !(ms <= m)) m = ms;  // NaN sticks
        }
        float l = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t split = 0; split < splits && seen; ++split) {
          const float* p = slice(split);
          if (p[D] == -kInf) continue;
          const float weight = std::exp2(p[D] - m);
          l += p[D + 1] * weight;
          for (int64_t d = 0; d < D; ++d) acc[d] += p[d] * weight;
        }
        const int64_t token = g.first_q(s) + i;
        char* out = static_cast<char*>(a.out.data) +
                    (s * a.out.batch_stride + token * a.out.token_stride + h * a.out.head_stride) *
                        element;
        float* lse = a.lse.data + s * a.lse.batch_stride + h * a.lse.head_stride + token;
        const float inv = seen ? 1.f / l : 0.f;
        for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
        store_row(a.type, acc.data(), D, out);
        // Rounded once (see natural_lse in the kernels).
        *lse = seen ? static_cast<float>((static_cast<double>(m) +
                                          std::log2(static_cast<double>(l))) *
                                         0.6931471805599453)
                    : kInf;
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                     const optional<Tensor>& cu_q, const optional<Tensor>& cu_k,
                                     int64_t max_q, int64_t max_k, const optional<Tensor>& bias,
                                     double scale, bool causal, int64_t window_left,
                                     int64_t window_right, double softcap,
                                     const optional<Tensor>& alibi,
                                     const optional<Tensor>& block_table) {
  Prepared p = prepare("attention", c10::DeviceType::CPU, q_in, k_in, v_in, cu_q, cu_k, max_q,
                       max_k, bias, scale, causal, window_left, window_right, softcap, alibi,
                       block_table);
  const AttentionGeometry& g = p.g;
  Tensor out = empty_output(p.q.sizes(), p.q.options());
  Tensor lse = new_lse(p, p.q);
  const AttentionForward a = forward_args(p, out, lse);
  if (g.batch == 0 || g.heads == 0) return {out, lse};
  // Batch-invariant mode: every query through the prefill kernel, whose
  // result for a row depends on that row's keys only (the decode path's key
  // slices depend on the batch and the thread count).
  if (g.seq_q <= kDecodeMaxQueries && !g.batch_invariant) {
    decode(a);
    return {out, lse};
  }
  const AttentionForwardFn kernel = forward_kernel();
  for_each_block(g, g.heads, kAttentionBlockQ, [&](int64_t s) { return g.len_q(s); },
                 [&](int64_t s, int64_t h, int64_t b, int64_t e) { kernel(a, s, h, b, e); });
  return {out, lse};
}

namespace {

// delta = rowsum(grad_out * out) summed as the kernels sum dP = grad_out . v
// (in chunks of kAttentionBackwardChunk terms, each from zero with one fused
// multiply-add per element in order, each added to the total at its end), so
// that dP - delta is exactly zero where out is the value row a query sees
// alone (a single visible key): the gradient is then exactly zero, as
// PyTorch's.
Tensor kernel_ordered_delta(const Prepared& p, const PreparedBackward& b) {
  const Tensor go = b.grad_out.to(at::kFloat).contiguous();
  const Tensor o = b.out.to(at::kFloat).contiguous();
  const int64_t D = go.size(-1), rows = D == 0 ? 0 : go.numel() / D;
  Tensor delta = at::empty(go.sizes().slice(0, go.dim() - 1), go.options());
  const float* x = go.data_ptr<float>();
  const float* y = o.data_ptr<float>();
  float* out = delta.data_ptr<float>();
  const auto delta_kernel =
      pick_isa<AttentionDeltaFn>(generic::attention_delta, avx2::attention_delta,
                                 avx512::attention_delta, avx512_bf16::attention_delta);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    delta_kernel(x, y, begin, end, D, out);
  });
  return delta_like_lse(p, delta);
}

std::tuple<Tensor, Tensor, Tensor> attention_backward(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, const optional<Tensor>& cu_q,
    const optional<Tensor>& cu_k, int64_t max_q, int64_t max_k, const optional<Tensor>& bias,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const optional<Tensor>& alibi) {
  Prepared p = prepare("attention_backward", c10::DeviceType::CPU, q_in, k_in, v_in, cu_q, cu_k,
                       max_q, max_k, bias, scale, causal, window_left, window_right, softcap, alibi);
  const AttentionGeometry& g = p.g;
  PreparedBackward inputs = prepare_backward(p, q_in, grad_out_in, out_in, lse_in);
  inputs.delta = kernel_ordered_delta(p, inputs);
  Tensor grad_q = empty_output(p.q.sizes(), p.q.options());
  Tensor grad_k = empty_output(p.k.sizes(), p.k.options());
  Tensor grad_v = empty_output(p.v.sizes(), p.v.options());
  if (g.batch == 0 || g.heads == 0) return {grad_q, grad_k, grad_v};
  const AttentionBackward a = backward_args(p, inputs, grad_q, grad_k, grad_v);
  const auto kv_kernel = pick_isa<AttentionBackwardKvFn>(
      generic::attention_backward_kv, avx2::attention_backward_kv, avx512::attention_backward_kv,
      avx512_bf16::attention_backward_kv);
  const auto q_kernel = pick_isa<AttentionBackwardQFn>(
      generic::attention_backward_q, avx2::attention_backward_q, avx512::attention_backward_q,
      avx512_bf16::attention_backward_q);
  // A fused sequence (attention_backward_fused): one key task of all its
  // keys per kv head, which writes dQ too; no query tasks.
  std::vector<char> fused(static_cast<size_t>(g.batch));
  for (int64_t s = 0; s < g.batch; ++s) fused[s] = attention_backward_fused(a, s);
  for_each_block(g, g.heads_kv, kAttentionBlockK,
                 [&](int64_t s) { return fused[s] ? int64_t{1} : g.len_k(s); },
                 [&](int64_t s, int64_t hk, int64_t b, int64_t e) {
                   kv_kernel(a, s, hk, fused[s] ? 0 : b, fused[s] ? g.len_k(s) : e);
                 });
  for_each_block(g, g.heads, kAttentionBlockQ,
                 [&](int64_t s) { return fused[s] ? int64_t{0} : g.len_q(s); },
                 [&](int64_t s, int64_t h, int64_t b, int64_t e) { q_kernel(a, s, h, b, e); });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("attention", &attention);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace pyllm::cpu
