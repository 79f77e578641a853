// A LLaMA-style decoder stack of a plain eager CPU inference call in one call
// of pyllm._C: decoder_layers_direct.
//
// At a decode row each layer of pyllm.models.llama runs nine kernels (two
// norms, four packed products, the rotary embedding, the KV-cache write,
// attention) whose work is microseconds each but for the products; the Python
// between them (module calls, attribute reads, the packed modules' checks)
// cost ~180 us a layer, ~4 ms a step of a 22-layer model. This entry runs the
// same kernel functions with the same arguments in the modules' order
// (pyllm/models/direct_decode.py builds the arguments from the modules and
// decides what only Python knows), so the outputs are the modules' bit for bit.
//
// It returns None, having changed nothing, unless every argument is one the
// kernels take as the modules would pass it: the checks of the direct calls
// (direct_call_checks.h: plain CPU tensors, no mode, autocast or profiler),
// grad mode off, and the shapes, dtypes and packed panels of every layer
// checked before the first kernel runs, so that a refused call leaves the KV
// caches as they were and the caller can take the modules.

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/attention_op.h"
#include "cpu/norms.h"
#include "cpu/packed_linear.h"
#include "cpu/rotary_op.h"
#include "decoder_direct.h"
#include "direct_call_checks.h"

namespace py = pybind11;

namespace pyllm {
namespace {

using namespace direct;
using at::Tensor;
using std::optional;

// One decoder layer's arguments (the Python tuple's order, see bind below).
struct Layer {
  optional<Tensor> norm1;
  double eps1 = 0.0;
  Tensor qkv;
  optional<Tensor> qkv_bias;
  Tensor o;
  optional<Tensor> o_bias;
  optional<Tensor> norm2;
  double eps2 = 0.0;
  Tensor gate, up;
  optional<Tensor> gate_bias, up_bias;
  int64_t intermediate = 0;
  Tensor down;
  optional<Tensor> down_bias;
  Tensor cos, sin;
  bool interleaved = false;
  Tensor keys, values;
};

constexpr size_t kLayerFields = 20;

// The sizes every layer shares.
struct Stack {
  int64_t batch, seq, hidden, heads, heads_kv, head_dim, length;
  at::ScalarType dtype;
};

// A bias of the packed products: nullopt, or [n] of x's dtype (or float32
// where `float32_ok`).
bool bias_ok(const optional<Tensor>& b, const Stack& s, int64_t n, bool float32_ok) {
  return !b.has_value() ||
         (b->dim() == 1 && b->size(0) == n &&
          (b->scalar_type() == s.dtype || (float32_ok && b->scalar_type() == at::kFloat)));
}

// The rotary tables: contiguous float32 (rows, half), 2 x half <= head_dim,
// a row for every position of this call.
bool tables_ok(const Layer& l, const Stack& s) {
  for (const Tensor* t : {&l.cos, &l.sin}) {
    if (t->dim() != 2 || t->scalar_type() != at::kFloat || !t->is_contiguous() ||
        t->sizes() != l.cos.sizes()) {
      return false;
    }
  }
  return l.cos.size(1) >= 1 && 2 * l.cos.size(1) <= s.head_dim &&
         l.cos.size(0) >= s.length + s.seq;
}

bool cache_ok(const Tensor& t, const Stack& s) {
  return t.dim() == 4 && t.scalar_type() == s.dtype && t.size(0) == s.batch &&
         t.size(1) >= s.length + s.seq && t.size(2) == s.heads_kv && t.size(3) == s.head_dim;
}

// Parses and checks one layer's tuple; false when any field is not what the
// kernels take.
bool parse_layer(py::handle h, const Stack& s, Layer& l) {
  if (!PyTuple_Check(h.ptr()) || PyTuple_GET_SIZE(h.ptr()) != kLayerFields) return false;
  const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
  bool ok = true;
  const auto required = [&](size_t i, Tensor& out) {
    const optional<Tensor> v = tensor_arg(t[i], ok);
    if (!v.has_value()) {
      ok = false;
    } else {
      out = *v;
    }
  };
  l.norm1 = tensor_arg(t[0], ok);
  required(2, l.qkv);
  l.qkv_bias = tensor_arg(t[3], ok);
  required(4, l.o);
  l.o_bias = tensor_arg(t[5], ok);
  l.norm2 = tensor_arg(t[6], ok);
  required(8, l.gate);
  required(9, l.up);
  l.gate_bias = tensor_arg(t[10], ok);
  l.up_bias = tensor_arg(t[11], ok);
  required(13, l.down);
  l.down_bias = tensor_arg(t[14], ok);
  required(15, l.cos);
  required(16, l.sin);
  required(18, l.keys);
  required(19, l.values);
  if (!ok || !PyLong_Check(t[12].ptr()) || !PyBool_Check(t[17].ptr())) return false;
  if (!eps_arg(t[1], true, s.dtype, l.eps1) || !eps_arg(t[7], true, s.dtype, l.eps2)) {
    return false;
  }
  l.intermediate = t[12].cast<int64_t>();
  l.interleaved = t[17].cast<bool>();
  const int64_t q_out = s.heads * s.head_dim, kv_out = s.heads_kv * s.head_dim;
  const int64_t qkv_out = q_out + 2 * kv_out, I = l.intermediate;
  if (I < 1 || !param_ok(l.norm1, s.dtype, s.hidden) || !param_ok(l.norm2, s.dtype, s.hidden)) {
    return false;
  }
  if (!cpu::packed_fits(l.qkv, qkv_out, s.hidden, s.dtype) ||
      !cpu::packed_fits(l.o, s.hidden, q_out, s.dtype) ||
      !cpu::packed_fits(l.gate, I, s.hidden, s.dtype) ||
      !cpu::packed_fits(l.up, I, s.hidden, s.dtype) ||
      !cpu::packed_fits(l.down, s.hidden, I, s.dtype)) {
    return false;
  }
  if (!bias_ok(l.qkv_bias, s, qkv_out, true) || !bias_ok(l.o_bias, s, s.hidden, true) ||
      !bias_ok(l.gate_bias, s, I, false) || !bias_ok(l.up_bias, s, I, false) ||
      !bias_ok(l.down_bias, s, s.hidden, true)) {
    return false;
  }
  return tables_ok(l, s) && cache_ok(l.keys, s) && cache_ok(l.values, s) &&
         l.keys.sizes() == l.values.sizes();
}

// The stack, as pyllm.models.llama runs it: for each layer
//   h, residual = input_layernorm(x, residual)   (layer 0 without residual:
//                                                 residual = x)
//   q, k, v = split(h @ Wqkv^T + b);  rotary(q, k) at length + arange(seq)
//   cache[length:length + seq] = k, v;  attention(q, cache[:length + seq])
//   h, residual = post_attention_layernorm(o_proj(attention), residual)
//   x = down_proj(swiglu(h))
// Returns (x, residual).
std::pair<Tensor, Tensor> run_stack(const Tensor& x_in, optional<Tensor> residual,
                                    const std::vector<Layer>& layers, const Stack& s) {
  const int64_t q_out = s.heads * s.head_dim, kv_out = s.heads_kv * s.head_dim;
  const int64_t total = s.length + s.seq;
  // RotaryEmbedding.rotate's positions: arange(length, length + seq) for each sequence
  Tensor positions = at::arange(s.length, total, at::TensorOptions().dtype(at::kLong));
  positions = s.batch == 1 ? positions.view({1, s.seq})
                           : positions.expand({s.batch, s.seq}).contiguous();
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  Tensor x = x_in;
  for (const Layer& l : layers) {
    auto normed = cpu::norm_inference(true, x, residual, l.norm1, std::nullopt, l.eps1);
    if (!residual.has_value()) {
      residual = x;
    } else {
      residual = normed[1];
    }
    const Tensor qkv =
        cpu::linear_packed(normed[0], l.qkv, q_out + 2 * kv_out, l.qkv_bias, "none");
    const Tensor q = qkv.narrow(-1, 0, q_out).view({s.batch, s.seq, s.heads, s.head_dim});
    const Tensor k = qkv.narrow(-1, q_out, kv_out).view({s.batch, s.seq, s.heads_kv, s.head_dim});
    const Tensor v =
        qkv.narrow(-1, q_out + kv_out, kv_out).view({s.batch, s.seq, s.heads_kv, s.head_dim});
    cpu::rotary(q, k, l.cos, l.sin, positions, l.interleaved, false);
    l.keys.narrow(1, s.length, s.seq).copy_(k);
    l.values.narrow(1, s.length, s.seq).copy_(v);
    const Tensor out = std::get<0>(cpu::attention(
        q, l.keys.narrow(1, 0, total), l.values.narrow(1, 0, total), std::nullopt, std::nullopt,
        s.seq, total, std::nullopt, scale, true, -1, -1, 0.0, std::nullopt, std::nullopt));
    const Tensor attended = cpu::linear_packed(out.reshape({s.batch, s.seq, q_out}), l.o,
                                               s.hidden, l.o_bias, "none");
    normed = cpu::norm_inference(true, attended, residual, l.norm2, std::nullopt, l.eps2);
    residual = normed[1];
    const Tensor gated =
        cpu::swiglu_packed(normed[0], l.gate, l.up, l.intermediate, l.gate_bias, l.up_bias);
    x = cpu::linear_packed(gated, l.down, s.hidden, l.down_bias, "none");
  }
  return {x, *residual};
}

py::object decoder_layers_direct(py::handle x_h, py::handle residual_h, py::list layer_list,
                                 int64_t length, int64_t heads, int64_t heads_kv,
                                 int64_t head_dim) {
  if (!bare_context() || at::GradMode::is_enabled()) return py::none();
  bool ok = true;
  const optional<Tensor> x = tensor_arg(x_h, ok);
  const optional<Tensor> residual = tensor_arg(residual_h, ok);
  if (!ok || !x.has_value() || !float_kernel_dtype(x->scalar_type()) || x->dim() != 3) {
    return py::none();
  }
  if (residual.has_value() &&
      (residual->scalar_type() != x->scalar_type() || residual->sizes() != x->sizes())) {
    return py::none();
  }
  const Stack s{x->size(0), x->size(1), x->size(2), heads, heads_kv, head_dim, length,
                x->scalar_type()};
  if (s.batch < 1 || s.seq < 1 || s.hidden < 1 || heads < 1 || heads_kv < 1 || head_dim < 1 ||
      heads % heads_kv || length < 0 || layer_list.empty()) {
    return py::none();
  }
  std::vector<Layer> layers(layer_list.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    if (!parse_layer(layer_list[i], s, layers[i])) return py::none();
  }
  std::pair<Tensor, Tensor> out;
  {
    py::gil_scoped_release no_gil;
    out = run_stack(*x, residual, layers, s);
  }
  return py::make_tuple(out.first, out.second);
}

}  // namespace

void bind_decoder_direct(py::module& m) {
  m.def("decoder_layers_direct", &decoder_layers_direct, py::arg("x"), py::arg("residual"),
        py::arg("layers"), py::arg("length"), py::arg("heads"), py::arg("heads_kv"),
        py::arg("head_dim"),
        "A LLaMA-style decoder stack (pyllm.models.llama's layers over pyllm.nn.KVCache "
        "caches) of a plain eager CPU inference call, without Python between the kernels: "
        "(x, residual) after the last layer, the caches written at [length, length + seq); "
        "None, with nothing changed, when the call must take the modules. x, residual: "
        "(batch, seq, hidden); layers: one tuple per layer of (input_layernorm weight, eps, "
        "packed qkv panels, qkv bias, packed o_proj, o_proj bias, post_attention_layernorm "
        "weight, eps, packed gate, packed up, gate bias, up bias, intermediate size, packed "
        "down, down bias, rotary cos, rotary sin, interleaved, cache keys, cache values) "
        "(see csrc/decoder_direct.cpp).");
}

}  // namespace pyllm
