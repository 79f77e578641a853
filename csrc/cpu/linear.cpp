// pyllm::linear, pyllm::swiglu and their backward ops for CPU tensors.
//
// linear: y = act(x @ weight^T + bias); swiglu: y = silu(x @ w_gate^T + b_gate)
// * (x @ w_up^T + b_up), both products from one pass over x. The backward
// recomputes the pre-activation with the derivative applied in the epilogue
// (dz = grad_y * act'(z)), then dx = dz @ weight, dW = dz^T @ x, db = sum dz,
// all through the same kernels (kernels/gemm_kernel.h).
//
// The user-facing argument checks live in pyllm/ops/linear.py; the checks here
// only guard the memory the kernels touch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "huge_pages.h"
#include "isa.h"
#include "kernels/gemm.h"
#include "packed_linear.h"
#include "output.h"
#include "../common/batch_invariant.h"
#include "../common/linear_checks.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {
namespace {

using at::Tensor;
using c10::optional;

Operand operand(const Tensor& t, bool transposed = false) {
  // A 2-D tensor as (i, j); transposed: as (j, i).
  return {t.data_ptr(), transposed ? t.stride(1) : t.stride(0),
          transposed ? t.stride(0) : t.stride(1), kernel_dtype(t, "operand")};
}

Tensor rows_of(const Tensor& x) {
  // (..., K) -> (M, K) with contiguous rows.
  Tensor x2 = as_rows(x);
  return x2.stride(-1) == 1 ? x2 : x2.contiguous();
}

GemmBlockFn block_kernel() {
  return pick_isa<GemmBlockFn>(generic::gemm_block, avx2::gemm_block, avx512::gemm_block,
                               avx512_bf16::gemm_block);
}

GemmWeightRowsFn weight_rows_kernel() {
  return pick_isa<GemmWeightRowsFn>(generic::gemm_block_weight_rows, avx2::gemm_block_weight_rows,
                                    avx512::gemm_block_weight_rows,
                                    avx512_bf16::gemm_block_weight_rows);
}

GemmSkinnyFn skinny_kernel() {
  return pick_isa<GemmSkinnyFn>(generic::gemm_skinny, avx2::gemm_skinny, avx512::gemm_skinny,
                                avx512_bf16::gemm_skinny);
}

GemmEpilogueFn epilogue_kernel() {
  return pick_isa<GemmEpilogueFn>(generic::gemm_epilogue, avx2::gemm_epilogue,
                                  avx512::gemm_epilogue, avx512_bf16::gemm_epilogue);
}

// Runs g's epilogue alone on a kept product c (c2), M x N fp32, in parallel
// over rows.
void run_epilogue(const GemmArgs& g, const Tensor& c, const Tensor& c2) {
  const GemmEpilogueFn kernel = epilogue_kernel();
  const float* cp = c.data_ptr<float>();
  const float* c2p = c2.defined() ? c2.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.N));
  at::parallel_for(0, g.M, grain, [&](int64_t m0, int64_t m1) { kernel(g, cp, c2p, m0, m1); });
}

// Runs one GEMM, in parallel: the skinny path for a few rows of x @ W^T
// (see below for when), else tasks of whole column blocks (each packs its
// own panels), split by rows too when there are too few column blocks for the
// threads.
void run(const GemmArgs& args) {
  if (args.M == 0 || args.N == 0) return;
  GemmArgs g = args;
  if (g.K == 0) {
    // An empty sum: the product is zero, and the epilogue (bias, activation,
    // gates) must still run. One column of zeros (zero bits are 0 in every
    // element type, strides 0) makes the kernels run it.
    static const uint32_t kZero = 0;
    g.K = 1;
    g.a = {&kZero, 0, 0, g.a.type};
    g.b = {&kZero, 0, 0, g.b.type};
    g.b2 = {&kZero, 0, 0, g.b2.type};
    g.packed = g.packed2 = nullptr;  // panels of no rows: the zero column instead
  }
  const int64_t blocks = (g.N + kGemmColumnBlock - 1) / kGemmColumnBlock;
  const int64_t threads = at::get_num_threads();
  // The skinny kernels take x and W of one dtype, rows contiguous. (A
  // one-column W, e.g. dX = dZ W with in_features 1, has rs == 1 in any
  // layout, and dZ is fp32 after an activation: the types must be checked.)
  const bool weight_rows = g.a.cs == 1 && g.b.rs == 1 && g.a.type == g.b.type &&
                           (!two_products(g.epilogue) || g.b2.rs == 1);
  // The skinny kernels (M <= kGemmSkinnyRows):
  // - bf16 on AMX tiles (amx_usable()): 2-16 rows go to the tiles, which
  //   stream the weight at the skinny kernel's rate or better (1.1-1.4 ms
  //   against 1.1-3.1 ms for a 4096^2 weight); one row stays on the GEMV,
  //   except in batch-invariant mode (the tiles sum in another order).
  // - otherwise, batch-invariant mode wants every M summed in the blocked
  //   kernel's order (K in blocks of kSumBlock, each in order), the same in
  //   whichever tile and row split a row falls: the AVX-512 skinny kernel sums
  //   that way (and then serves one row too, instead of the GEMV); the AVX2
  //   and generic ones do not, so there the blocked kernel runs.
  g.use_amx = amx_usable();
  const bool invariant = batch_invariant();
  const bool skinny = g.use_amx && g.a.type == DType::bf16
                          ? g.M == 1 && !invariant
                          : !invariant || active_isa() >= Isa::avx512;
  // A pre-packed weight (g.packed) has no rows to stream: it goes where the
  // weight would, except that the skinny path is AVX-512's skinny_panel,
  // which reads the panels (one row included, in the blocked order).
  const bool skinny_path = g.packed != nullptr
                               ? skinny && active_isa() >= Isa::avx512
                               : weight_rows && skinny;
  if (g.M <= kGemmSkinnyRows && skinny_path) {
    g.blocked_order = invariant;
    const GemmSkinnyFn kernel = skinny_kernel();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      kernel(g, b0 * kGemmColumnBlock, std::min(g.N, b1 * kGemmColumnBlock));
    });
    return;
  }
  // x @ W^T with the weight read in place (block_weight_rows) where packing
  // x's rows once per thread costs less than packing the weight once (M per
  // thread below N) and still matters (M <= 256: the weight's packing is
  // 1/M of the work; measured on Zen 4, bf16 128 x 2048 x 5632 7.7 against
  // 8.3 ms, 256 rows about even, 512 rows 1-2% slower than the blocked
  // kernel). AVX-512 only (not AMX, whose tiles take the packed weight).
  // The same sums as the blocked kernel.
  const bool weight_in_place = weight_rows && g.packed == nullptr && !g.use_amx &&
                               active_isa() >= Isa::avx512 && g.M <= 256 &&
                               g.M * threads <= g.N;
  if (weight_in_place) {
    const GemmWeightRowsFn kernel = weight_rows_kernel();
    const int64_t chunks = (g.N + kGemmWeightRowChunk - 1) / kGemmWeightRowChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      kernel(g, c0 * kGemmWeightRowChunk, std::min(g.N, c1 * kGemmWeightRowChunk));
    });
    return;
  }
  const int64_t row_splits =
      blocks >= 2 * threads ? 1 : std::min<int64_t>((g.M + 5) / 6, (2 * threads + blocks - 1) / blocks);
  const int64_t rows_per = (g.M + row_splits - 1) / row_splits;
  const GemmBlockFn kernel = block_kernel();
  at::parallel_for(0, blocks * row_splits, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / row_splits, r = t % row_splits;
      const int64_t m0 = r * rows_per, m1 = std::min(g.M, m0 + rows_per);
      if (m0 < m1)
        kernel(g, m0, m1, b * kGemmColumnBlock, std::min(g.N, (b + 1) * kGemmColumnBlock));
    }
  });
}

GemmArgs base_args(int64_t M, int64_t N, int64_t K, Operand a, Operand b) {
  GemmArgs g{};
  g.M = M;
  g.N = N;
  g.K = K;
  g.a = a;
  g.b = b;
  g.b2 = b;
  g.bias_type = DType::f32;
  g.act = Activation::none;
  g.epilogue = Epilogue::store;
  return g;
}

// Runs g into a new output of x's shape with N columns (x's dtype) and
// returns it; g's epilogue and its other outputs are set by the caller.
Tensor run_into_output(GemmArgs& g, const Tensor& x, int64_t N) {
  Tensor y = empty_output(with_last(x, N), x.options());
  g.out = y.data_ptr();
  g.ldo = N;
  g.out_type = kernel_dtype(y, "y");
  run(g);
  return y;
}

void check_input(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.device().is_cpu(), "pyllm::", op,
                    " (CPU kernel): x must be a CPU tensor with at least one dimension");
  kernel_dtype(x, "x");
}

void set_bias(GemmArgs& g, const Tensor& bias, const Tensor& bias2) {
  g.bias = bias.defined() ? bias.data_ptr() : nullptr;
  g.bias2 = bias2.defined() ? bias2.data_ptr() : nullptr;
  const Tensor& any = bias.defined() ? bias : bias2;
  g.bias_type = any.defined() ? kernel_dtype(any, "bias") : DType::f32;
}

// linear's forward; with `preact` defined (fp32, y's shape) the epilogue
// also keeps x W^T + b there (the training forward).
Tensor linear_into(const char* op, const Tensor& x, const Tensor& weight,
                   const optional<Tensor>& bias_in, c10::string_view activation,
                   const Tensor& preact) {
  check_input(op, x);
  check_linear_params(op, x, weight, bias_in);
  const Tensor x2 = rows_of(x);
  const Tensor bias = contiguous_or_undefined(bias_in);
  const int64_t M = x2.size(0), N = weight.size(0), K = x2.size(1);
  GemmArgs g = base_args(M, N, K, operand(x2), operand(weight, /*transposed=*/true));
  set_bias(g, bias, Tensor());
  g.act = parse_activation(activation);
  if (preact.defined()) {
    g.epilogue = Epilogue::store_preact;
    g.out2 = preact.data_ptr();
  }
  return run_into_output(g, x, N);
}

Tensor linear(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias_in,
              c10::string_view activation) {
  return linear_into("linear", x, weight, bias_in, activation, Tensor());
}

std::tuple<Tensor, Tensor> linear_with_preact(const Tensor& x, const Tensor& weight,
                                              const optional<Tensor>& bias_in,
                                              c10::string_view activation) {
  check_input("linear_with_preact", x);
  check_linear_params("linear_with_preact", x, weight, bias_in);
  Tensor preact = empty_output(with_last(x, weight.size(0)), x.options().dtype(at::kFloat));
  Tensor y = linear_into("linear_with_preact", x, weight, bias_in, activation, preact);
  return {y, preact};
}

// swiglu's forward; with gate and up defined (fp32, y's shape) the epilogue
// also keeps both pre-activations there (the training forward).
Tensor swiglu_into(const char* op, const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                   const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in,
                   const Tensor& gate, const Tensor& up) {
  check_input(op, x);
  check_swiglu_params(op, x, w_gate, w_up, b_gate_in, b_up_in);
  const Tensor x2 = rows_of(x);
  const Tensor b_gate = contiguous_or_undefined(b_gate_in), b_up = contiguous_or_undefined(b_up_in);
  const int64_t M = x2.size(0), N = w_gate.size(0), K = x2.size(1);
  GemmArgs g = base_args(M, N, K, operand(x2), operand(w_gate, true));
  g.b2 = operand(w_up, true);
  set_bias(g, b_gate, b_up);
  g.epilogue = Epilogue::swiglu;
  if (gate.defined()) {
    g.epilogue = Epilogue::swiglu_preact;
    g.out2 = gate.data_ptr();
    g.out3 = up.data_ptr();
  }
  return run_into_output(g, x, N);
}

Tensor swiglu(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
              const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in) {
  return swiglu_into("swiglu", x, w_gate, w_up, b_gate_in, b_up_in, Tensor(), Tensor());
}

std::tuple<Tensor, Tensor, Tensor> swiglu_with_preact(const Tensor& x, const Tensor& w_gate,
                                                      const Tensor& w_up,
                                                      const optional<Tensor>& b_gate_in,
                                                      const optional<Tensor>& b_up_in) {
  check_input("swiglu_with_preact", x);
  check_swiglu_params("swiglu_with_preact", x, w_gate, w_up, b_gate_in, b_up_in);
  const auto shape = with_last(x, w_gate.size(0));
  Tensor gate = empty_output(shape, x.options().dtype(at::kFloat));
  Tensor up = empty_output(shape, x.options().dtype(at::kFloat));
  Tensor y = swiglu_into("swiglu_with_preact", x, w_gate, w_up, b_gate_in, b_up_in, gate, up);
  return {y, gate, up};
}

// out (M x K, out_type) = a (M x N) @ weight (N x K); accumulate into an fp32
// out instead when `accumulate`.
void times_weight(const Tensor& a, const Tensor& weight, Tensor& out, bool accumulate) {
  GemmArgs g = base_args(a.size(0), weight.size(1), a.size(1), operand(a), operand(weight));
  g.epilogue = accumulate ? Epilogue::accumulate : Epilogue::store;
  g.out = out.data_ptr();
  g.ldo = out.size(1);
  g.out_type = kernel_dtype(out, "out");
  run(g);
}

// Whether the backward's products of a bf16 weight take bf16 operands: the
// active ISA is avx512_bf16 (vdpbf16ps, or AMX tiles where amx_usable()),
// whose bf16 products run ~2.5x the fp32 ones. An fp32 dZ (after an
// activation's derivative) is then rounded to bf16 once, as PyTorch's bf16
// backward rounds its dZ, and dX and dW both take that. (Splitting dZ into
// bf16 hi + lo for a second dX product cost a third more GEMM work and
// bought nothing measurable: the extra error of an autocast BERT step was
// the residual stream rounded to bf16 in pyllm.nn's fused residual norm.)
bool bf16_backward(const Tensor& weight) {
  return weight.scalar_type() == at::kBFloat16 && active_isa() == Isa::avx512_bf16;
}

// The dtype the backward's first step writes dZ in (after an activation's
// derivative): bf16 where the products take bf16 (bf16_backward), rounded in
// the epilogue as product_grad would round it (the same bits, without an
// fp32 dZ written, read and converted), unless a bias gradient is wanted
// (summed from the fp32 dZ); else fp32.
at::ScalarType grad_dtype(const Tensor& weight, bool bias_grad) {
  return bf16_backward(weight) && !bias_grad ? at::kBFloat16 : at::kFloat;
}

// dZ as the backward's products take it: bf16 where they run on bf16
// operands (see bf16_backward), else as it is.
Tensor product_grad(const Tensor& dz, const Tensor& weight) {
  if (!bf16_backward(weight) || dz.scalar_type() == at::kBFloat16) return dz;
  return dz.to(at::kBFloat16);
}

// dZ^T (N x M) row-major, as the dW product takes it (read in place, dZ^T's
// K would run down dZ's columns, a cache line per element: 80 ms against 28
// for a 2048 x 3072 x 768 fp32 dW): bf16 where the products are (see
// bf16_backward), rounded from an fp32 dZ in the same pass; in 64 x 64
// blocks that stay in L1 (ATen's strided copy of a 2048 x 3072 fp32 dZ^T
// ran at ~2.6 GB/s, page after page).
Tensor transposed_grad(const Tensor& dz_in, const Tensor& weight) {
  const Tensor dz = dz_in.stride(1) == 1 ? dz_in : dz_in.contiguous();
  const bool to_bf16 = bf16_backward(weight) && dz.scalar_type() == at::kFloat;
  const int64_t M = dz.size(0), N = dz.size(1);
  Tensor out = empty_output({N, M}, to_bf16 ? dz.options().dtype(at::kBFloat16) : dz.options());
  if (dz.numel() == 0) return out;
  const TransposeFn kernel = pick_isa<TransposeFn>(generic::transpose, avx2::transpose,
                                                   avx512::transpose, avx512_bf16::transpose);
  const void* src = dz.data_ptr();
  const DType src_type = kernel_dtype(dz, "grad"), dst_type = kernel_dtype(out, "grad");
  const int64_t ld = dz.stride(0);
  void* dst = out.data_ptr();
  constexpr int64_t kB = 64;
  const int64_t row_blocks = (M + kB - 1) / kB, col_blocks = (N + kB - 1) / kB;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = (b / col_blocks) * kB, c0 = (b % col_blocks) * kB;
      kernel(src, src_type, M, ld, r0, std::min(M, r0 + kB), c0, std::min(N, c0 + kB), dst_type,
             dst);
    }
  });
  return out;
}

// dW (N x K) = dzt (N x M, dZ^T) @ x (M x K), in the weight's dtype.
Tensor weight_grad(const Tensor& dzt, const Tensor& x2, const Tensor& weight) {
  Tensor dw = empty_output(weight.sizes(), weight.options());
  GemmArgs g = base_args(dzt.size(0), x2.size(1), dzt.size(1), operand(dzt), operand(x2));
  g.epilogue = Epilogue::store;
  g.out = dw.data_ptr();
  g.ldo = dw.size(1);
  g.out_type = kernel_dtype(dw, "grad_weight");
  run(g);
  return dw;
}

// The arguments of the backward's first step, dz from grad_y (gy, x's rows
// x2) in the epilogue `e` into fp32 out (and out2, swiglu's d up): over the
// recomputed product (run) or a kept one (run_epilogue).
GemmArgs grad_args(const Tensor& x2, const Tensor& weight, const Tensor& gy, Epilogue e,
                   const Tensor& out, const Tensor& out2 = Tensor()) {
  const int64_t M = x2.size(0), N = weight.size(0), K = x2.size(1);
  GemmArgs g = base_args(M, N, K, operand(x2), operand(weight, true));
  g.epilogue = e;
  g.out = out.data_ptr();
  g.out2 = out2.defined() ? out2.data_ptr() : nullptr;
  g.ldo = N;
  g.grad = gy.data_ptr();
  g.ldg = N;
  g.grad_type = kernel_dtype(gy, "grad_y");
  g.out_type = kernel_dtype(out, "grad");
  return g;
}

// linear's gradients from dz = grad_y * act'(z) ([M, N]; x2 is x's rows).
std::tuple<Tensor, Tensor, Tensor> linear_grads(const Tensor& dz, const Tensor& x2, const Tensor& x,
                                                const Tensor& weight,
                                                const optional<Tensor>& bias_in,
                                                std::array<bool, 3> mask) {
  Tensor dx, dw, db;
  if (mask[0]) {
    dx = empty_output(x2.sizes(), x.options());
    times_weight(product_grad(dz, weight), weight, dx, false);
    dx = dx.view(x.sizes());
  }
  if (mask[1]) dw = weight_grad(transposed_grad(dz, weight), x2, weight);
  if (mask[2] && bias_in.has_value()) db = linear_bias_grad(dz, *bias_in);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_y, const Tensor& x,
                                                   const Tensor& weight,
                                                   const optional<Tensor>& bias_in,
                                                   c10::string_view activation,
                                                   std::array<bool, 3> mask) {
  check_input("linear_backward", x);
  check_linear_params("linear_backward", x, weight, bias_in, &grad_y);
  const Tensor x2 = rows_of(x);
  const Tensor gy = rows_of(grad_y);
  const Tensor bias = contiguous_or_undefined(bias_in);
  const int64_t M = x2.size(0), N = weight.size(0);
  const Activation act = parse_activation(activation);
  Tensor dz = gy;
  if (act != Activation::none) {  // dz = grad_y * act'(x W^T + b), fp32 or bf16
    dz = empty_output({M, N}, x.options().dtype(grad_dtype(weight, mask[2] && bias_in.has_value())));
    GemmArgs g = grad_args(x2, weight, gy, Epilogue::grad_act, dz);
    set_bias(g, bias, Tensor());
    g.act = act;
    run(g);
  }
  return linear_grads(dz, x2, x, weight, bias_in, mask);
}

// A kept pre-activation (fp32, grad_y's shape) as the epilogue reads it.
Tensor preact_rows(const char* op, const char* name, const Tensor& preact, const Tensor& grad_y) {
  TORCH_CHECK_VALUE(preact.scalar_type() == at::kFloat && preact.device().is_cpu() &&
                        preact.sizes() == grad_y.sizes(),
                    "pyllm::", op, ": ", name, " must be float32 on the CPU with grad_y's shape ",
                    grad_y.sizes(), ", got ", preact.scalar_type(), " ", preact.sizes());
  return as_rows(preact).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_from_preact(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const optional<Tensor>& bias_in,
    const Tensor& preact, c10::string_view activation, std::array<bool, 3> mask) {
  const char* op = "linear_backward_from_preact";
  check_input(op, x);
  check_linear_params(op, x, weight, bias_in, &grad_y);
  const Tensor z = preact_rows(op, "preact", preact, grad_y);
  const Tensor x2 = rows_of(x);
  const Tensor gy = rows_of(grad_y);
  const int64_t M = x2.size(0), N = weight.size(0);
  const Activation act = parse_activation(activation);
  Tensor dz = gy;
  if (act != Activation::none) {  // dz = grad_y * act'(z), fp32 or bf16
    dz = empty_output({M, N}, x.options().dtype(grad_dtype(weight, mask[2] && bias_in.has_value())));
    GemmArgs g = grad_args(x2, weight, gy, Epilogue::grad_act, dz);
    g.act = act;
    run_epilogue(g, z, Tensor());
  }
  return linear_grads(dz, x2, x, weight, bias_in, mask);
}

// d gate and d up's dtype (grad_dtype): fp32 where a bias gradient is wanted.
at::ScalarType swiglu_grad_dtype(const Tensor& w_gate, const Tensor& w_up,
                                 const optional<Tensor>& b_gate, const optional<Tensor>& b_up,
                                 std::array<bool, 5> mask) {
  const bool bias_grad = (mask[3] && b_gate.has_value()) || (mask[4] && b_up.has_value());
  return grad_dtype(w_gate, bias_grad) == at::kBFloat16 && grad_dtype(w_up, bias_grad) == at::kBFloat16
             ? at::kBFloat16
             : at::kFloat;
}

// swiglu's gradients from d gate and d up (fp32 or bf16 [M, N]; x2 is x's rows).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> swiglu_grads(
    const Tensor& dgate, const Tensor& dup, const Tensor& x2, const Tensor& x, const Tensor& w_gate,
    const Tensor& w_up, const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in,
    std::array<bool, 5> mask) {
  const int64_t M = x2.size(0), K = x2.size(1);
  Tensor dx, dwg, dwu, dbg, dbu;
  if (mask[0]) {  // two products summed in fp32, rounded once
    Tensor dx32 = empty_output({M, K}, x.options().dtype(at::kFloat));
    times_weight(product_grad(dgate, w_gate), w_gate, dx32, false);
    times_weight(product_grad(dup, w_up), w_up, dx32, true);
    dx = dx32.to(x.scalar_type()).view(x.sizes());
  }
  if (mask[1]) dwg = weight_grad(transposed_grad(dgate, w_gate), x2, w_gate);
  if (mask[2]) dwu = weight_grad(transposed_grad(dup, w_up), x2, w_up);
  if (mask[3] && b_gate_in.has_value()) dbg = linear_bias_grad(dgate, *b_gate_in);
  if (mask[4] && b_up_in.has_value()) dbu = linear_bias_grad(dup, *b_up_in);
  return {dx, dwg, dwu, dbg, dbu};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> swiglu_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
    const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in, std::array<bool, 5> mask) {
  check_input("swiglu_backward", x);
  check_swiglu_params("swiglu_backward", x, w_gate, w_up, b_gate_in, b_up_in);
  check_grad_y("swiglu_backward", grad_y, x, w_gate.size(0));
  const Tensor x2 = rows_of(x);
  const Tensor gy = rows_of(grad_y);
  const Tensor b_gate = contiguous_or_undefined(b_gate_in), b_up = contiguous_or_undefined(b_up_in);
  const int64_t M = x2.size(0), N = w_gate.size(0);
  // d gate and d up (fp32 or bf16), from the recomputed products.
  const auto dtype = swiglu_grad_dtype(w_gate, w_up, b_gate_in, b_up_in, mask);
  Tensor dgate = empty_output({M, N}, x.options().dtype(dtype));
  Tensor dup = empty_output({M, N}, x.options().dtype(dtype));
  GemmArgs g = grad_args(x2, w_gate, gy, Epilogue::grad_swiglu, dgate, dup);
  g.b2 = operand(w_up, true);
  set_bias(g, b_gate, b_up);
  run(g);
  return swiglu_grads(dgate, dup, x2, x, w_gate, w_up, b_gate_in, b_up_in, mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> swiglu_backward_from_preact(
    const Tensor& grad_y, const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
    const optional<Tensor>& b_gate_in, const optional<Tensor>& b_up_in, const Tensor& gate,
    const Tensor& up, std::array<bool, 5> mask) {
  const char* op = "swiglu_backward_from_preact";
  check_input(op, x);
  check_swiglu_params(op, x, w_gate, w_up, b_gate_in, b_up_in);
  check_grad_y(op, grad_y, x, w_gate.size(0));
  const Tensor zg = preact_rows(op, "gate", gate, grad_y);
  const Tensor zu = preact_rows(op, "up", up, grad_y);
  const Tensor x2 = rows_of(x);
  const Tensor gy = rows_of(grad_y);
  const int64_t M = x2.size(0), N = w_gate.size(0);
  const auto dtype = swiglu_grad_dtype(w_gate, w_up, b_gate_in, b_up_in, mask);
  Tensor dgate = empty_output({M, N}, x.options().dtype(dtype));
  Tensor dup = empty_output({M, N}, x.options().dtype(dtype));
  GemmArgs g = grad_args(x2, w_gate, gy, Epilogue::grad_swiglu, dgate, dup);
  g.b2 = operand(w_up, true);
  run_epilogue(g, zg, zu);
  return swiglu_grads(dgate, dup, x2, x, w_gate, w_up, b_gate_in, b_up_in, mask);
}

// -- pre-packed weights (inference) -----------------------------------------------------
//
// pack_linear_weight lays a weight out once as the panels that every call of
// the blocked and skinny paths would otherwise pack from it (GemmArgs::packed);
// linear_packed / swiglu_packed take those panels in place of the weight.
// The layout depends on the instruction set (panel width; bf16 pairs on
// avx512_bf16), so a packed weight names what it was packed for by its shape
// and dtype, and a call under another set is refused.

int64_t panel_width() {
  using WidthFn = int64_t (*)();
  return pick_isa<WidthFn>(generic::gemm_panel_width, avx2::gemm_panel_width,
                           avx512::gemm_panel_width, avx512_bf16::gemm_panel_width)();
}

// Whether a weight of this dtype packs into bf16 pairs (else fp32 panels).
bool packs_in_pairs(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && active_isa() == Isa::avx512_bf16;
}

// The packed shape of an (N, K) weight of `dtype`: (panels, rows, width).
std::vector<int64_t> packed_shape(int64_t N, int64_t K, at::ScalarType dtype) {
  const int64_t width = panel_width();
  const int64_t rows = packs_in_pairs(dtype) ? ((K + 1) / 2 + 15) / 16 * 16 : K;  // KPpad
  return {(N + width - 1) / width, rows, width};
}

Tensor pack_linear_weight(const Tensor& weight) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.device().is_cpu(),
                    "pyllm::pack_linear_weight (CPU kernel): weight must be a 2-D CPU tensor "
                    "(out_features, in_features), got shape ", weight.sizes(), " on ",
                    weight.device());
  kernel_dtype(weight, "weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const bool pairs = packs_in_pairs(weight.scalar_type());
  const auto shape = packed_shape(N, K, weight.scalar_type());
  // Each decode step streams the packed weight whole: on huge pages (huge_pages.h).
  Tensor packed =
      empty_on_huge_pages(shape, weight.options().dtype(pairs ? at::kInt : at::kFloat));
  if (packed.numel() == 0) return packed;
  const Operand b = operand(weight, /*transposed=*/true);  // (K, N)
  const GemmPackPanelFn fn =
      pick_isa<GemmPackPanelFn>(generic::gemm_pack_panel, avx2::gemm_pack_panel,
                                avx512::gemm_pack_panel, avx512_bf16::gemm_pack_panel);
  const int64_t width = shape[2], panel_elems = shape[1] * shape[2];
  char* base = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, shape[0], 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      fn(b, K, p * width, std::min(width, N - p * width), pairs, base + 4 * p * panel_elems);
  });
  return packed;
}

void check_packed(const char* op, const char* name, const Tensor& x, const Tensor& packed,
                  int64_t N) {
  TORCH_CHECK_VALUE(N >= 0, "pyllm::", op, ": out_features must be >= 0, got ", N);
  const auto shape = packed_shape(N, x.size(-1), x.scalar_type());
  const auto dtype = packs_in_pairs(x.scalar_type()) ? at::kInt : at::kFloat;
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.scalar_type() == dtype &&
                        packed.sizes() == c10::IntArrayRef(shape) && packed.is_contiguous(),
                    "pyllm::", op, ": ", name, " must be pyllm::pack_linear_weight of an (", N,
                    ", ", x.size(-1), ") weight of x's dtype ", x.scalar_type(),
                    " under this instruction set (", isa_name(active_isa()),
                    "): a contiguous CPU tensor of shape ", c10::IntArrayRef(shape), " and dtype ",
                    dtype, ", got ", packed.sizes(), " ", packed.scalar_type(), " on ",
                    packed.device(), " (pack the weight again)");
}

// x's rows against packed panels: g with the packed pointers set (b, b2 typed
// as x, whose dtype the panels were packed for).
GemmArgs packed_args(const Tensor& x2, int64_t N, const Tensor& packed, const Tensor& packed2) {
  const Operand none{nullptr, 0, 0, kernel_dtype(x2, "x")};
  GemmArgs g = base_args(x2.size(0), N, x2.size(1), operand(x2), none);
  g.packed = packed.numel() > 0 ? packed.data_ptr() : nullptr;
  g.packed2 = packed2.defined() && packed2.numel() > 0 ? packed2.data_ptr() : nullptr;
  return g;
}

}  // namespace

bool packed_fits(const Tensor& packed, int64_t out_features, int64_t in_features,
                 at::ScalarType dtype) {
  if (out_features < 0 || in_features < 0 || !packed.defined()) return false;
  const auto shape = packed_shape(out_features, in_features, dtype);
  return packed.device().is_cpu() &&
         packed.scalar_type() == (packs_in_pairs(dtype) ? at::kInt : at::kFloat) &&
         packed.sizes() == c10::IntArrayRef(shape) && packed.is_contiguous();
}

Tensor linear_packed(const Tensor& x, const Tensor& packed, int64_t out_features,
                     const optional<Tensor>& bias_in, c10::string_view activation) {
  const char* op = "linear_packed";
  check_input(op, x);
  check_packed(op, "packed", x, packed, out_features);
  check_linear_bias(op, bias_in, out_features, x);
  const Tensor x2 = rows_of(x);
  const Tensor bias = contiguous_or_undefined(bias_in);
  const int64_t N = out_features;
  GemmArgs g = packed_args(x2, N, packed, Tensor());
  set_bias(g, bias, Tensor());
  g.act = parse_activation(activation);
  return run_into_output(g, x, N);
}

Tensor swiglu_packed(const Tensor& x, const Tensor& packed_gate, const Tensor& packed_up,
                     int64_t out_features, const optional<Tensor>& b_gate_in,
                     const optional<Tensor>& b_up_in) {
  const char* op = "swiglu_packed";
  check_input(op, x);
  check_packed(op, "packed_gate", x, packed_gate, out_features);
  check_packed(op, "packed_up", x, packed_up, out_features);
  check_swiglu_biases(op, b_gate_in, b_up_in, out_features, x);
  const Tensor x2 = rows_of(x);
  const Tensor b_gate = contiguous_or_undefined(b_gate_in), b_up = contiguous_or_undefined(b_up_in);
  const int64_t N = out_features;
  GemmArgs g = packed_args(x2, N, packed_gate, packed_up);
  set_bias(g, b_gate, b_up);
  g.epilogue = Epilogue::swiglu;
  return run_into_output(g, x, N);
}

TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("linear_packed", &linear_packed);
  m.impl("swiglu_packed", &swiglu_packed);
  m.impl("linear", &linear);
  m.impl("swiglu", &swiglu);
  m.impl("linear_backward", &linear_backward);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("linear_with_preact", &linear_with_preact);
  m.impl("swiglu_with_preact", &swiglu_with_preact);
  m.impl("linear_backward_from_preact", &linear_backward_from_preact);
  m.impl("swiglu_backward_from_preact", &swiglu_backward_from_preact);
}

}  // namespace pyllm::cpu
