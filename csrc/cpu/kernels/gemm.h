// GEMM CPU kernels: the interface between the operators (csrc/cpu/linear.cpp)
// and the per-ISA variants of gemm_kernel.h (setup.py compiles one per
// instruction set).
//
// C[M][N] = A[M][K] . B[K][N], each operand given by its strides (so that
// x @ W^T, dz @ W and dz^T @ x are all the same kernel), with the epilogue
// applied while the tile is still hot: bias, activation, the SwiGLU gate, or
// the gradient of those for the backward.
#pragma once

#include <cstdint>

#include "../../common/activation.h"
#include "scalar.h"

namespace pyllm::cpu {

using pyllm::Activation;

// Element (i, j) at data + i * rs + j * cs (in elements).
struct Operand {
  const void* data;
  int64_t rs, cs;
  DType type;
};

enum class Epilogue : int {
  store,        // out[m][n] = act(C + bias[n]), in out_type
  swiglu,       // out = silu(C + bias) * (C2 + bias2), C2 = A . B2
  grad_act,     // out (out_type: fp32 or bf16) = grad * act'(C + bias)
  grad_swiglu,  // out (out_type) = grad * (C2 + bias2) * silu'(C + bias),
                // out2 (out_type) = grad * silu(C + bias)
  accumulate,   // out (fp32) += C
  // The training forward, which keeps the pre-activation for the backward:
  store_preact,   // store's out, and out2 (fp32) = C + bias
  swiglu_preact,  // swiglu's out, out2 (fp32) = C + bias, out3 (fp32) = C2 + bias2
};

// Whether the epilogue takes a second product (C2 = A . B2).
inline bool two_products(Epilogue e) {
  return e == Epilogue::swiglu || e == Epilogue::grad_swiglu || e == Epilogue::swiglu_preact;
}

struct GemmArgs {
  int64_t M, N, K;
  Operand a;   // (M, K)
  Operand b;   // (K, N)
  Operand b2;  // (K, N), the up projection (swiglu, grad_swiglu)
  const void* bias;   // [N] or null
  const void* bias2;  // [N] or null
  DType bias_type;
  Activation act;
  Epilogue epilogue;
  void* out;
  int64_t ldo;
  DType out_type;
  void* out2;  // grad_swiglu (out_type), store_preact, swiglu_preact (fp32): ldo apart
  void* out3;  // swiglu_preact: fp32, ldo apart
  const void* grad;  // grad_act, grad_swiglu: [M][N], ldg apart
  int64_t ldg;
  DType grad_type;
  // The skinny path sums in the blocked kernel's order for every M, 1
  // included (batch-invariant mode; only the AVX-512 skinny kernel can, see
  // can_sum_like_block in linear.cpp).
  bool blocked_order = false;
  // The blocked path's bf16 x bf16 products on AMX tiles (amx_usable()).
  bool use_amx = false;
  // B (and B2) pre-packed (gemm_pack_panel, all N columns): panel i holds
  // columns [i * kNR, (i + 1) * kNR) in the layout the kernels pack per call
  // (fp32 [K][kNR]; pairs [KPpad][kNR] when b.type is bf16 on avx512_bf16),
  // so no call packs. b.data / b2.data are unused then.
  const void* packed = nullptr;
  const void* packed2 = nullptr;
};

// Columns are handed to the kernels in multiples of this (a multiple of every
// ISA's panel width).
constexpr int64_t kGemmColumnBlock = 64;

// Rows up to which the weight-streaming path is used (decode-sized inputs).
constexpr int64_t kGemmSkinnyRows = 16;

// C rows [m0, m1) x columns [n0, n1) with the epilogue; n0 is a multiple of
// kGemmColumnBlock. Packs B's panels for those columns itself.
using GemmBlockFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// Columns [n0, n1) of all M rows of x @ W^T with the weight read in place
// (A's rows and B's columns contiguous along K, one dtype; not pre-packed):
// x's rows are packed instead of the weight's, the same sums as
// GemmBlockFn. Columns go in chunks of kGemmWeightRowChunk.
using GemmWeightRowsFn = void (*)(const GemmArgs&, int64_t n0, int64_t n1);
constexpr int64_t kGemmWeightRowChunk = 96;

// The same for M <= kGemmSkinnyRows with A's rows and B's columns contiguous
// along K (a.cs == 1, b.rs == 1: x @ W^T): streams B once, no packing.
using GemmSkinnyFn = void (*)(const GemmArgs&, int64_t n0, int64_t n1);

// The epilogue alone, on rows [m0, m1) of all N columns of a product
// computed before: c (and c2 for the two-product epilogues) fp32 [M][N],
// rows N apart, the biases already in it (g.bias, g.bias2 null). The
// backward's grad_act and grad_swiglu from the pre-activation the training
// forward kept (store_preact, swiglu_preact), bit for bit what they give on
// the recomputed product.
using GemmEpilogueFn = void (*)(const GemmArgs&, const float* c, const float* c2, int64_t m0,
                                int64_t m1);

// One panel of a pre-packed weight (GemmArgs::packed): B's columns [n, n +
// nr) (nr <= the ISA's panel width; zero past nr), fp32 [K][width], or with
// `pairs` (avx512_bf16 only, B bf16) bf16 pairs along K [KPpad][width],
// KPpad = (K + 1) / 2 rounded up to 16, pair rows past (K + 1) / 2 zero.
using GemmPackPanelFn = void (*)(const Operand& b, int64_t K, int64_t n, int64_t nr, bool pairs,
                                 void* panel);

// dst[c][r] = src[r][c] for rows [r0, r1) x columns [c0, c1) of src (rows
// ld apart) into dst (rows `rows` apart), converted from src_type to
// dst_type (f32 to f32 or bf16, or a 16-bit type to itself): the backward's
// dZ^T.
using TransposeFn = void (*)(const void* src, DType src_type, int64_t rows, int64_t ld, int64_t r0,
                             int64_t r1, int64_t c0, int64_t c1, DType dst_type, void* dst);

#define PYLLM_DECLARE_GEMM(isa)                                                          \
  namespace isa {                                                                        \
  void gemm_block(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);                  \
  void gemm_skinny(const GemmArgs&, int64_t, int64_t);                                   \
  void gemm_block_weight_rows(const GemmArgs&, int64_t, int64_t);                        \
  void gemm_epilogue(const GemmArgs&, const float*, const float*, int64_t, int64_t);     \
  void gemm_pack_panel(const Operand&, int64_t, int64_t, int64_t, bool, void*);          \
  int64_t gemm_panel_width();                                                            \
  void transpose(const void*, DType, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                 DType, void*);                                                          \
  }
PYLLM_DECLARE_GEMM(generic)
PYLLM_DECLARE_GEMM(avx2)
PYLLM_DECLARE_GEMM(avx512)
PYLLM_DECLARE_GEMM(avx512_bf16)
#undef PYLLM_DECLARE_GEMM

}  // namespace pyllm::cpu
