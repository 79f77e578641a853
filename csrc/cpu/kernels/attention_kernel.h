// Attention kernels, written once over the SIMD layer and compiled per ISA
// (the including file defines PYLLM_ISA).
//
// Forward (FlashAttention-2): a task owns a block of query rows that share
// one kv head and walks the keys in blocks of kAttentionBlockK: S = Q K^T
// (scaled to log2 units), an online softmax keeps each row's running max m and
// sum l, and O += P V; no seq_q x seq_k matrix ever exists. Products are fp32
// register-blocked tiles (kTileRows rows x kTileCols columns), inputs of any
// dtype converted to fp32 as blocks are packed.
// Decode: the same row walk over a slice of the keys, leaving (O, m, l)
// unnormalised so that slices computed by different threads can be combined.
// Backward: recompute P from the saved log-sum-exp; pass 1 accumulates dK, dV
// per key block, pass 2 dQ per query block, so no two tasks share an output.
#pragma once

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention.h"
#include "scratch.h"
#include "simd.h"

namespace pyllm::cpu::PYLLM_ISA {
namespace {

using namespace simd;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kTileRows = 4;
constexpr int kTileVecs = kLanes == 16 ? 4 : 2;
constexpr int64_t kTileCols = int64_t{kTileVecs} * kLanes;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Workspace {
  Scratch a, b, c, d, e, f, g, h, i, j;
};

Workspace& workspace() {
  static thread_local Workspace w;
  return w;
}



// -- fp32 matrix products --------------------------------------------------------

// C[R][kTileCols] (+)= A[R][K] . B[K][kTileCols]: A's element (r, k) at
// a[r * ars + k * aks], B's rows ldb apart, C's rows ldc apart. The sum runs
// in chunks of `chunk` terms (K: one), each summed from zero and added to C at
// its end (the first one stored unless accumulating): a block's sum plus the
// running total rounds less than adding every term to the running total
// (gradients sum hundreds of blocks; kAttentionBackwardChunk).
template <int R, bool kAccumulate>
inline void tile(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int64_t K,
                 float* c, int64_t ldc, int64_t chunk) {
  int64_t k0 = 0;
  do {  // once at least: K = 0 stores zeros
    const int64_t k_end = imin(K, k0 + chunk);
    V acc[R][kTileVecs];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kTileVecs; ++j) acc[r][j] = zero();
    for (int64_t k = k0; k < k_end; ++k) {
      V bv[kTileVecs];
      for (int j = 0; j < kTileVecs; ++j) bv[j] = load(b + k * ldb + j * kLanes);
      for (int r = 0; r < R; ++r) {
        const V ar = set1(a[r * ars + k * aks]);
        for (int j = 0; j < kTileVecs; ++j) acc[r][j] = fma(ar, bv[j], acc[r][j]);
      }
    }
    const bool add_to_c = kAccumulate || k0 > 0;
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kTileVecs; ++j) {
        float* out = c + r * ldc + j * kLanes;
        store(out, add_to_c ? add(load(out), acc[r][j]) : acc[r][j]);
      }
    k0 += chunk;
  } while (k0 < K);
}

// C[M][N] (+)= A[M][K] . B[K][N] (strides and chunks as tile; chunk 0: K);
// N is a multiple of kTileCols.
template <bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t aks,
          const float* b, int64_t ldb, float* c, int64_t ldc, int64_t chunk = 0) {
  if (chunk <= 0 || chunk > K) chunk = K > 0 ? K : 1;
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    int64_t m0 = 0;
    for (; m0 + kTileRows <= M; m0 += kTileRows)
      tile<kTileRows, kAccumulate>(a + m0 * ars, ars, aks, b + n0, ldb, K, c + m0 * ldc + n0, ldc,
                                   chunk);
    const float* ar = a + m0 * ars;
    float* cr = c + m0 * ldc + n0;
    switch (M - m0) {
      case 3: tile<3, kAccumulate>(ar, ars, aks, b + n0, ldb, K, cr, ldc, chunk); break;
      case 2: tile<2, kAccumulate>(ar, ars, aks, b + n0, ldb, K, cr, ldc, chunk); break;
      case 1: tile<1, kAccumulate>(ar, ars, aks, b + n0, ldb, K, cr, ldc, chunk); break;
      default: break;
    }
  }
}

// -- data movement ------------------------------------------------------------------

// Row `first + i` of sequence s, head h (through the block table when the
// layout is paged).
template <typename T>
inline const T* token(const TokenLayout& t, int64_t first, int64_t s, int64_t i, int64_t h) {
  return static_cast<const T*>(t.data) + t.offset(s, first + i, h);
}

template <typename T>
inline T* token_out(const TokenLayout& t, int64_t first, int64_t s, int64_t i, int64_t h) {
  return static_cast<T*>(t.data) + t.offset(s, first + i, h);
}

// dst[0, padded) = src[0, n) as float, zeros after.
template <typename T>
inline void load_f32(const T* src, int64_t n, float* dst, int64_t padded) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
  if (i < n) store(dst + i, load(src + i, static_cast<int>(n - i)), static_cast<int>(n - i));
  for (i = n; i < padded; ++i) dst[i] = 0.f;
}

template <typename T>
inline void store_scaled(const float* src, int64_t n, float factor, T* dst) {
  const V f = set1(factor);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, mul(load(src + i), f));
  if (i < n) store(dst + i, mul(load(src + i, static_cast<int>(n - i)), f), static_cast<int>(n - i));
}

template <typename T>
inline void zero_row(T* dst, int64_t n) {
  std::memset(static_cast<void*>(dst), 0, sizeof(T) * n);
}

// dst[d][j] = row j of the tokens [first, first + count) of head h, as float;
// columns [count, ld) are zero.
template <typename T>
void pack_transposed(const TokenLayout& t, int64_t first, int64_t s, int64_t h, int64_t count,
                     int64_t D, float* dst, int64_t ld) {
  for (int64_t d = 0; d < D; ++d) std::memset(dst + d * ld + count, 0, sizeof(float) * (ld - count));
  int64_t j0 = 0;
#if defined(__AVX512F__)
  // 16 tokens x 16 dims at a time, transposed in registers (element by
  // element, every store went to another row of dst: ~10% of a BERT-sized
  // attention backward).
  const int64_t whole_d = D / kLanes * kLanes;
  if (whole_d > 0) {
    for (; j0 + kLanes <= count; j0 += kLanes) {
      const T* rows[kLanes];
      for (int r = 0; r < kLanes; ++r) rows[r] = token<T>(t, first, s, j0 + r, h);
      for (int64_t d0 = 0; d0 < whole_d; d0 += kLanes) {
        V block[kLanes];
        for (int r = 0; r < kLanes; ++r) block[r] = load(rows[r] + d0);
        transpose16(block);
        for (int c = 0; c < kLanes; ++c) store(dst + (d0 + c) * ld + j0, block[c]);
      }
      for (int64_t d = whole_d; d < D; ++d)
        for (int r = 0; r < kLanes; ++r) dst[d * ld + j0 + r] = to_f32(rows[r][d]);
    }
  }
#endif
  for (int64_t j = j0; j < count; ++j) {
    const T* row = token<T>(t, first, s, j, h);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + j] = to_f32(row[d]);
  }
}

// dst[j][0, ld) = row j as float (zero-padded), for j < rows; rows up to
// padded_rows are zero.
template <typename T>
void pack_rows(const TokenLayout& t, int64_t first, int64_t s, int64_t h, int64_t count,
               int64_t D, float* dst, int64_t ld, int64_t padded_rows) {
  for (int64_t j = 0; j < count; ++j) load_f32(token<T>(t, first, s, j, h), D, dst + j * ld, ld);
  if (padded_rows > count) std::memset(dst + count * ld, 0, sizeof(float) * ld * (padded_rows - count));
}

// -- the additive bias ------------------------------------------------------------

// row[0, n) += bias * factor (factor log2(e) for scores in log2 units).
template <typename B>
inline void add_bias_row(const BiasLayout& bias, int64_t s, int64_t h, int64_t i, int64_t j0,
                         int64_t n, float* row, float factor) {
  const B* p = static_cast<const B*>(bias.data) + s * bias.batch_stride + h * bias.head_stride +
               i * bias.q_stride + j0 * bias.k_stride;
  const V l2e = set1(factor);
  if (bias.k_stride == 1) {
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) store(row + j, fma(load(p + j), l2e, load(row + j)));
    if (j < n) {
      const int c = static_cast<int>(n - j);
      store(row + j, fma(load(p + j, c), l2e, load(row + j, c)), c);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] += to_f32(p[j * bias.k_stride]) * factor;
  }
}

inline void add_bias(const BiasLayout& bias, int64_t s, int64_t h, int64_t i, int64_t j0, int64_t n,
                     float* row, float factor = kLog2e) {
  if (bias.data == nullptr || n <= 0) return;
  switch (bias.type) {
    case DType::f32: return add_bias_row<float>(bias, s, h, i, j0, n, row, factor);
    case DType::bf16: return add_bias_row<bf16>(bias, s, h, i, j0, n, row, factor);
    case DType::f16: return add_bias_row<f16>(bias, s, h, i, j0, n, row, factor);
  }
}

// -- ALiBi -----------------------------------------------------------------------

// row[i] += -slope * factor * |distance0 + i| for i in [0, n), n a multiple of
// kLanes (distance0 = query - key of the first element, queries along the
// row; distances are exact in fp32 below 2^24).
inline void add_alibi_along_queries(float* row, int64_t n, float distance0, float slope,
                                    float factor) {
  alignas(64) static const float kIota[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                              8, 9, 10, 11, 12, 13, 14, 15};
  static_assert(kLanes <= 16, "kIota covers a vector");
  const V step = load(kIota), minus = set1(-slope * factor);
  for (int64_t i = 0; i < n; i += kLanes) {
    const V d = abs(add(step, set1(distance0 + static_cast<float>(i))));
    store(row + i, fma(d, minus, load(row + i)));
  }
}

// row[j] += -slope * factor * |distance0 - j| for j in [0, n) (keys along the row).
inline void add_alibi_along_keys(float* row, int64_t n, float distance0, float slope,
                                 float factor) {
  for (int64_t j = 0; j < n; ++j)
    row[j] -= slope * factor * std::fabs(distance0 - static_cast<float>(j));
}

// The log-sum-exp in natural units from the row max m (log2 units) and sum l,
// rounded once: the backward recomputes P = exp(s - lse), so every rounding
// of lse is a relative error in every P of the row.
inline float natural_lse(float m, float l) {
  return static_cast<float>((static_cast<double>(m) + std::log2(static_cast<double>(l))) *
                            0.6931471805599453);
}

// -- softcapping ----------------------------------------------------------------------

// Gemma 2's softcap: a score s (natural units, scaled) becomes softcap
// tanh(s / softcap). tanh(x) = sign(x) (1 - e) / (1 + e), e = e^(-2|x|):
// absolute error about 1e-7; NaN stays NaN, +-inf gives +-1.
inline V tanh_v(V x) {
  const V e = exp(mul(abs(x), set1(-2.f)));
  const V t = div(sub(set1(1.f), e), add(set1(1.f), e));
  return select_negative(x, sub(zero(), t), t);
}

// The scores of a row, raw dot products in, log2 units out (scaled, and
// softcapped when the geometry asks for it).
struct ScoreTransform {
  V scale2, inner, outer;
  bool cap;
  explicit ScoreTransform(const AttentionGeometry& g)
      : scale2(set1(g.scale * kLog2e)),
        inner(set1(g.softcap > 0.f ? g.scale / g.softcap : 0.f)),
        outer(set1(g.softcap * kLog2e)),
        cap(g.softcap > 0.f) {}
  V operator()(V raw) const { return cap ? mul(outer, tanh_v(mul(raw, inner))) : mul(raw, scale2); }
};

// The backward's score in natural units from a raw dot product, and d score
// / d (raw * scale) (1 - tanh^2 under a softcap, else 1).
inline float natural_score(const AttentionGeometry& g, float raw, float& slope) {
  if (g.softcap > 0.f) {
    const float th = std::tanh(raw * (g.scale / g.softcap));
    slope = 1.f - th * th;
    return g.softcap * th;
  }
  slope = 1.f;
  return raw * g.scale;
}

// -- forward ------------------------------------------------------------------------

// Rows of a block of tokens of one head as fp32, for a matrix product: where
// the tokens are fp32 with a head_dim of whole tiles they are used in place
// (rows token_stride apart), else converted into `buffer` (rows ld apart,
// zero-padded to ld columns and padded_rows rows).
template <typename T>
const float* rows_f32(const TokenLayout& t, int64_t first, int64_t s, int64_t h, int64_t count,
                      int64_t D, float* buffer, int64_t ld, int64_t padded_rows, int64_t& stride) {
  if (std::is_same_v<T, float> && D == ld && t.contiguous(first, count)) {
    stride = t.token_stride;
    return reinterpret_cast<const float*>(token<T>(t, first, s, 0, h));
  }
  pack_rows<T>(t, first, s, h, count, D, buffer, ld, padded_rows);
  stride = ld;
  return buffer;
}

// One key block of the prefill forward, between the two products: S^T's bk
// rows (keys) of kAttentionBlockQ columns (queries) are scaled to log2 units,
// biased and masked (key j0 + j is visible to the queries from
// j0 + j - offset on, when causal), then the online softmax runs across the
// rows per query column: S^T becomes P^T, the running max m and sum l move,
// and the accumulator rows o (bq of them, Dp wide) are rescaled.
inline void softmax_block(const AttentionForward& a, int64_t s, int64_t h, int64_t q_begin,
                          int64_t bq, int64_t j0, int64_t bk, int64_t offset, float* st, float* m,
                          float* l, float* alpha, float* o, int64_t Dp) {
  const AttentionGeometry& g = a.g;
  constexpr int64_t BQ = kAttentionBlockQ;
  const ScoreTransform transform(g);
  const float alibi = g.alibi_slope(s, h);
  V mx[kAttentionBlockQ / kLanes];
  for (auto& v : mx) v = set1(-kInf);
  for (int64_t j = 0; j < bk; ++j) {
    float* row = st + j * BQ;
    for (int64_t i = 0; i < BQ; i += kLanes) store(row + i, transform(load(row + i)));
    if (alibi != 0.f)  // query q_begin + i, key j0 + j
      add_alibi_along_queries(row, BQ, static_cast<float>(q_begin + offset - j0 - j), alibi,
                              kLog2e);
    if (a.bias.data != nullptr) {
      if (a.bias.q_stride == 0) {
        float b = 0.f;
        add_bias(a.bias, s, h, 0, j0 + j, 1, &b);
        const V bv = set1(b);
        for (int64_t i = 0; i < BQ; i += kLanes) store(row + i, add(load(row + i), bv));
      } else {
        for (int64_t i = 0; i < bq; ++i) add_bias(a.bias, s, h, q_begin + i, j0 + j, 1, row + i);
      }
    }
    // key j0 + j is seen by queries key - offset - right .. key - offset + left
    if (g.window_right >= 0) {
      const int64_t first = imin(BQ, imax(0, j0 + j - offset - g.window_right - q_begin));
      for (int64_t i = 0; i < first; ++i) row[i] = -kInf;
    }
    if (g.window_left >= 0)
      for (int64_t i = imax(0, j0 + j - offset + g.window_left + 1 - q_begin); i < BQ; ++i)
        row[i] = -kInf;
    for (int64_t v = 0; v < BQ / kLanes; ++v) mx[v] = max(mx[v], load(row + v * kLanes));
  }
  // Online softmax across the key rows, per query column.
  V msafe[kAttentionBlockQ / kLanes];
  for (int64_t v = 0; v < BQ / kLanes; ++v) {
    const V old = load(m + v * kLanes);
    const V mnew = max(old, mx[v]);
    store(m + v * kLanes, mnew);
    // A query that has seen nothing yet keeps m = -inf; exponents are taken
    // against 0 then, so P = 0 and its (zero) accumulator scales by 0.
    store(alpha + v * kLanes, mnew);
    for (int64_t i = v * kLanes; i < (v + 1) * kLanes; ++i)
      if (alpha[i] == -kInf) alpha[i] = 0.f;
    msafe[v] = load(alpha + v * kLanes);
    store(alpha + v * kLanes, exp2(sub(old, msafe[v])));
  }
  V sum[kAttentionBlockQ / kLanes];
  for (auto& v : sum) v = zero();
  for (int64_t j = 0; j < bk; ++j) {
    float* row = st + j * BQ;
    for (int64_t v = 0; v < BQ / kLanes; ++v) {
      const V p = exp2(sub(load(row + v * kLanes), msafe[v]));
      store(row + v * kLanes, p);
      sum[v] = add(sum[v], p);
    }
  }
  for (int64_t v = 0; v < BQ / kLanes; ++v)
    store(l + v * kLanes, fma(load(l + v * kLanes), load(alpha + v * kLanes), sum[v]));
  for (int64_t i = 0; i < bq; ++i) {
    if (alpha[i] == 1.f) continue;
    const V av = set1(alpha[i]);
    for (int64_t d = 0; d < Dp; d += kLanes) store(o + i * Dp + d, mul(load(o + i * Dp + d), av));
  }
}

// One task of the prefill forward: queries [q_begin, q_end) of sequence s,
// head h. Per key block the scores are computed transposed, S^T = K Q^T (K
// rows as they are, Q^T packed once per task), so that the online softmax of
// each key row runs across the block's kAttentionBlockQ queries in vectors;
// then O += P V.
template <typename T>
void forward_task(const AttentionForward& a, int64_t s, int64_t h, int64_t q_begin, int64_t q_end) {
  const AttentionGeometry& g = a.g;
  const int64_t D = g.head_dim, Dp = round_up(D, kTileCols);
  const int64_t BQ = kAttentionBlockQ, BK = kAttentionBlockK, bq = q_end - q_begin;
  const int64_t hk = h / (g.heads / g.heads_kv), lq = g.len_q(s), lk = g.len_k(s);
  const int64_t offset = lk - lq, fq = g.first_q(s), fk = g.first_k(s);
  static_assert(kAttentionBlockQ % kTileCols == 0, "query blocks are whole tiles");
  Workspace& w = workspace();
  float* qt = w.a.get(D * BQ);       // Q^T, [D][BQ], zero columns past bq
  float* kb = w.b.get(BK * D);       // K rows as fp32 (when converted)
  float* vb = w.c.get(BK * Dp);      // V rows as fp32 (when converted)
  float* st = w.d.get(BK * BQ);      // S^T, then P^T: [key][query]
  float* o = w.e.get(BQ * Dp);       // [query][Dp]
  float* m = w.f.get(3 * BQ);        // running max (log2 units), sum, and a scratch row
  float* l = m + BQ;
  float* alpha = l + BQ;
  pack_transposed<T>(a.q, fq + q_begin, s, h, bq, D, qt, BQ);
  std::memset(o, 0, sizeof(float) * BQ * Dp);
  for (int64_t i = 0; i < BQ; ++i) {
    m[i] = -kInf;
    l[i] = 0.f;
  }
  // the keys any of these queries sees: a sliding window skips the others
  const int64_t k_start = g.walk_start(g.key_lo(q_begin, offset), BK);
  const int64_t k_stop = imax(k_start, g.key_hi(q_end - 1, offset, lk));
  for (int64_t j0 = k_start; j0 < k_stop; j0 += BK) {
    const int64_t bk = imin(BK, k_stop - j0);
    int64_t k_stride, v_stride;
    const float* krows = rows_f32<T>(a.k, fk + j0, s, hk, bk, D, kb, D, bk, k_stride);
    gemm<false>(bk, BQ, D, krows, k_stride, 1, qt, BQ, st, BQ);  // S^T
    softmax_block(a, s, h, q_begin, bq, j0, bk, offset, st, m, l, alpha, o, Dp);
    const float* vrows = rows_f32<T>(a.v, fk + j0, s, hk, bk, D, vb, Dp, bk, v_stride);
    gemm<true>(bq, Dp, bk, st, 1, BQ, vrows, v_stride, o, Dp);  // O += P V
  }
  for (int64_t i = 0; i < bq; ++i) {
    T* out = token_out<T>(a.out, fq, s, q_begin + i, h);
    float* lse = a.lse.data + s * a.lse.batch_stride + h * a.lse.head_stride + fq + q_begin + i;
    if (l[i] == 0.f) {  // the query sees no key: zeros, as flash-attn
      zero_row(out, D);
      *lse = kInf;
    } else {
      store_scaled(o + i * Dp, D, 1.f / l[i], out);
      *lse = natural_lse(m[i], l[i]);
    }
  }
}

#if defined(__AVX512BF16__)
// -- bf16 products on AVX512-BF16 (vdpbf16ps) -------------------------------------
//
// vdpbf16ps multiplies pairs of bf16 and adds both products to one fp32 lane:
// the reduction dimension is consumed two at a time. A's pairs are broadcast
// (one 32-bit word), B's pair-rows hold 16 column pairs per vector.

// C[R][kTileCols] (+)= A[R][2 KP] . B[2 KP][kTileCols]; A's pair (r, p) at
// a[r * ars + p * aks], B's pair-row p at b + p * ldb (32-bit words).
template <int R, bool kAccumulate>
inline void tile_bf16(const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b, int64_t ldb,
                      int64_t KP, float* c, int64_t ldc) {
  __m512 acc[R][kTileVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTileVecs; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p) {
    __m512bh bv[kTileVecs];
    for (int j = 0; j < kTileVecs; ++j)
      bv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * ldb + j * 16));
    for (int r = 0; r < R; ++r) {
      const __m512bh ar =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * ars + p * aks])));
      for (int j = 0; j < kTileVecs; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], ar, bv[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTileVecs; ++j) {
      float* out = c + r * ldc + j * kLanes;
      _mm512_storeu_ps(out, kAccumulate ? _mm512_add_ps(_mm512_loadu_ps(out), acc[r][j]) : acc[r][j]);
    }
}

template <bool kAccumulate>
void gemm_bf16(int64_t M, int64_t N, int64_t KP, const uint32_t* a, int64_t ars, int64_t aks,
               const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    int64_t m0 = 0;
    for (; m0 + kTileRows <= M; m0 += kTileRows)
      tile_bf16<kTileRows, kAccumulate>(a + m0 * ars, ars, aks, b + n0, ldb, KP, c + m0 * ldc + n0, ldc);
    const uint32_t* ar = a + m0 * ars;
    float* cr = c + m0 * ldc + n0;
    switch (M - m0) {
      case 3: tile_bf16<3, kAccumulate>(ar, ars, aks, b + n0, ldb, KP, cr, ldc); break;
      case 2: tile_bf16<2, kAccumulate>(ar, ars, aks, b + n0, ldb, KP, cr, ldc); break;
      case 1: tile_bf16<1, kAccumulate>(ar, ars, aks, b + n0, ldb, KP, cr, ldc); break;
      default: break;
    }
  }
}

// dst[p][i] = (row i [2p], row i [2p + 1]) of `count` bf16 rows, for p <
// pairs; columns [count, ld) zero. (A transpose of 32-bit words.)
inline void pack_pairs_transposed(const TokenLayout& t, int64_t first, int64_t s, int64_t h,
                                  int64_t count, int64_t D, uint32_t* dst, int64_t ld) {
  const int64_t pairs = (D + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) std::memset(dst + p * ld + count, 0, 4 * (ld - count));
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(token<bf16>(t, first, s, i, h));
    for (int64_t p = 0; p < pairs; ++p) {
      const uint32_t lo = row[2 * p], hi = 2 * p + 1 < D ? row[2 * p + 1] : 0u;
      dst[p * ld + i] = lo | (hi << 16);
    }
  }
}

// dst[p][d] = (row 2p [d], row 2p + 1 [d]) for the `count` bf16 rows (a
// missing odd row is zero), d < ld (zero past D).
inline void pack_row_pairs(const TokenLayout& t, int64_t first, int64_t s, int64_t h,
                           int64_t count, int64_t D, uint32_t* dst, int64_t ld) {
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                          40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                          32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int64_t p = 0; p < (count + 1) / 2; ++p) {
    const bf16* r0 = token<bf16>(t, first, s, 2 * p, h);
    const bf16* r1 = 2 * p + 1 < count ? token<bf16>(t, first, s, 2 * p + 1, h) : nullptr;
    uint32_t* out = dst + p * ld;
    for (int64_t d = 0; d < ld; d += 32) {
      const int64_t left = imax(0, imin(32, D - d));
      const __mmask32 mask = left == 32 ? ~__mmask32{0} : ((__mmask32{1} << left) - 1);
      const __m512i a = _mm512_maskz_loadu_epi16(mask, r0 + d);
      const __m512i b = r1 != nullptr ? _mm512_maskz_loadu_epi16(mask, r1 + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(a, lo_idx, b));
      _mm512_storeu_si512(out + d + 16, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

// P^T (fp32 rows [key][query], `keys` rows) as bf16 pairs of consecutive keys:
// dst[p][i] = (P^T[2p][i], P^T[2p + 1][i]); a missing odd key is zero.
inline void pack_probability_pairs(const float* pt, int64_t keys, int64_t width, uint32_t* dst) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t p = 0; p < (keys + 1) / 2; ++p) {
    const float* r0 = pt + 2 * p * width;
    const float* r1 = r0 + width;
    const bool odd = 2 * p + 1 >= keys;
    for (int64_t i = 0; i < width; i += 16) {
      const __m512 a = _mm512_loadu_ps(r0 + i);
      const __m512 b = odd ? _mm512_setzero_ps() : _mm512_loadu_ps(r1 + i);
      // (b, a) -> 32 bf16: a's 16 in the low half, b's in the high half.
      const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
      _mm512_storeu_si512(dst + p * width + i, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// The prefill forward for bf16 on AVX512-BF16: forward_task's algorithm with
// both products on vdpbf16ps (K in place as pairs, Q^T and V packed as pairs,
// P rounded to bf16 for P V as flash-attention kernels do).
void forward_task_bf16(const AttentionForward& a, int64_t s, int64_t h, int64_t q_begin,
                       int64_t q_end) {
  const AttentionGeometry& g = a.g;
  const int64_t D = g.head_dim, Dp = round_up(D, kTileCols), DP = (D + 1) / 2;
  const int64_t BQ = kAttentionBlockQ, BK = kAttentionBlockK, bq = q_end - q_begin;
  const int64_t hk = h / (g.heads / g.heads_kv), lq = g.len_q(s), lk = g.len_k(s);
  const int64_t offset = lk - lq, fq = g.first_q(s), fk = g.first_k(s);
  Workspace& w = workspace();
  uint32_t* qt = reinterpret_cast<uint32_t*>(w.a.get(DP * BQ));     // Q^T pairs [DP][BQ]
  uint32_t* kp = reinterpret_cast<uint32_t*>(w.b.get(BK * DP));     // K pairs when D is odd
  uint32_t* vp = reinterpret_cast<uint32_t*>(w.c.get(BK / 2 * Dp)); // V pairs [BK/2][Dp]
  float* st = w.d.get(BK * BQ);                                     // S^T, then P^T
  float* o = w.e.get(BQ * Dp);
  float* m = w.f.get(3 * BQ);
  float* l = m + BQ;
  float* alpha = l + BQ;
  uint32_t* pp = reinterpret_cast<uint32_t*>(w.g.get(BK / 2 * BQ)); // P pairs [BK/2][BQ]
  pack_pairs_transposed(a.q, fq + q_begin, s, h, bq, D, qt, BQ);
  std::memset(o, 0, sizeof(float) * BQ * Dp);
  for (int64_t i = 0; i < BQ; ++i) {
    m[i] = -kInf;
    l[i] = 0.f;
  }
  const int64_t k_start = g.walk_start(g.key_lo(q_begin, offset), BK);
  const int64_t k_stop = imax(k_start, g.key_hi(q_end - 1, offset, lk));
  for (int64_t j0 = k_start; j0 < k_stop; j0 += BK) {
    const int64_t bk = imin(BK, k_stop - j0);
    const uint32_t* krows;
    int64_t k_stride;
    if (D % 2 == 0 && a.k.contiguous(fk + j0, bk)) {  // K rows are pairs already
      krows = reinterpret_cast<const uint32_t*>(token<bf16>(a.k, fk + j0, s, 0, hk));
      k_stride = a.k.token_stride / 2;
    } else {
      for (int64_t j = 0; j < bk; ++j) {
        const uint16_t* row = reinterpret_cast<const uint16_t*>(token<bf16>(a.k, fk + j0, s, j, hk));
        for (int64_t p = 0; p < DP; ++p)
          kp[j * DP + p] = row[2 * p] | (2 * p + 1 < D ? uint32_t{row[2 * p + 1]} << 16 : 0u);
      }
      krows = kp;
      k_stride = DP;
    }
    gemm_bf16<false>(bk, BQ, DP, krows, k_stride, 1, qt, BQ, st, BQ);  // S^T
    softmax_block(a, s, h, q_begin, bq, j0, bk, offset, st, m, l, alpha, o, Dp);
    pack_probability_pairs(st, bk, BQ, pp);
    pack_row_pairs(a.v, fk + j0, s, hk, bk, D, vp, Dp);
    gemm_bf16<true>(bq, Dp, (bk + 1) / 2, pp, 1, BQ, vp, Dp, o, Dp);  // O += P V
  }
  for (int64_t i = 0; i < bq; ++i) {
    bf16* out = token_out<bf16>(a.out, fq, s, q_begin + i, h);
    float* lse = a.lse.data + s * a.lse.batch_stride + h * a.lse.head_stride + fq + q_begin + i;
    if (l[i] == 0.f) {
      zero_row(out, D);
      *lse = kInf;
    } else {
      store_scaled(o + i * Dp, D, 1.f / l[i], out);
      *lse = natural_lse(m[i], l[i]);
    }
  }
}
#endif  // __AVX512BF16__

// The decode path: few query rows (each kv head's group of query heads x the
// queries), many keys. Keys go by chunks of kLanes: the chunk's K and V rows
// (every kv head) are converted to fp32 once, each query row's kLanes scores
// come from
// kLanes dot products reduced at once (reduce_add_lanes), and P V is a
// broadcast-FMA per key into the row's accumulator.
// Requests the cache lines of [p, p + bytes) into L2. (An asm statement:
// GCC drops __builtin_prefetch loops here as dead code.)
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht1 %0" : : "m"(c[b]));
#else
    __builtin_prefetch(c + b, 0, 2);
#endif
  }
}

template <typename T>
void decode_task(const AttentionForward& a, int64_t s, int64_t hk_begin, int64_t hk_end,
                 int64_t k_begin, int64_t k_end, float* partial) {
  const AttentionGeometry& g = a.g;
  const int64_t group = g.heads / g.heads_kv, lq = g.len_q(s), lk = g.len_k(s);
  const int64_t rows = g.heads * lq;  // row r: head r / lq, query r % lq
  // this task's rows: those of kv heads [hk_begin, hk_end)
  const int64_t r_begin = hk_begin * group * lq, r_end = hk_end * group * lq;
  const int64_t D = g.head_dim, Dv = round_up(D, kLanes);
  const int64_t offset = lk - lq, fq = g.first_q(s), fk = g.first_k(s);
  Workspace& w = workspace();
  float* q = w.a.get(rows * Dv);
  float* kc = w.b.get(kLanes * Dv);  // a chunk's K rows of one kv head as fp32: [key][Dv]
  float* vc = w.c.get(kLanes * Dv);
  float* o = w.e.get(rows * Dv);
  float* m = w.f.get(rows);
  float* l = w.g.get(rows);
  int64_t* limit = reinterpret_cast<int64_t*>(w.h.get(4 * rows + 2 * kLanes));
  int64_t* start = limit + rows;  // per row: keys [start, limit) are visible
  float* buf = reinterpret_cast<float*>(start + rows);  // kLanes scores, then probabilities
  const ScoreTransform transform(g);
  int64_t k_stop = k_begin, k_first = k_end;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t h = r / lq, i = r % lq;
    load_f32(token<T>(a.q, fq, s, i, h), D, q + r * Dv, Dv);
    start[r] = imax(k_begin, g.key_lo(i, offset));
    limit[r] = imax(start[r], imin(k_end, g.key_hi(i, offset, lk)));
    if (limit[r] > start[r]) {
      k_stop = imax(k_stop, limit[r]);
      k_first = imin(k_first, start[r]);
    }
    m[r] = -kInf;
    l[r] = 0.f;
  }
  k_first = imin(k_first, k_stop);
  std::memset(o, 0, sizeof(float) * rows * Dv);
  // Keys go by chunks of kLanes, kv head by kv head; a head's K and V rows
  // of the chunk are converted to fp32 in L1 (fp32 rows whose length is a
  // multiple of kLanes are read in place). Rows of one head lie token_stride
  // apart, which the hardware prefetchers don't follow: while head hk of
  // this chunk is worked on, head hk's rows kPrefetchKeys keys on are
  // requested into L2 (spread out like this, the requests are not dropped
  // for want of miss buffers; all at once, most were). Decode attention
  // went from 4-6 to 14-24 GB/s (bf16) with it.
  const int64_t kPrefetchKeys = (a.k.block_table != nullptr ? 4 : 2) * kLanes;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  // Paged keys: chunks start at multiples of kLanes (the keys before a row's
  // start are masked), so that in pages of a multiple of kLanes tokens a
  // chunk's rows lie in one page, token_stride apart: one block-table lookup
  // per chunk, for every head.
  if (a.k.block_table != nullptr) k_first = k_first / kLanes * kLanes;
  // Rows [j0, j0 + n) of K (or V), head 0, into rows[] (head hk's are
  // hk * head_stride on).
  const auto chunk_rows = [&](const TokenLayout& t, int64_t j0, int64_t n, const T** rows) {
    if (t.contiguous(fk + j0, n)) {
      const T* base = token<T>(t, fk, s, j0, 0);
      for (int64_t j = 0; j < n; ++j) rows[j] = base + j * t.token_stride;
    } else {
      for (int64_t j = 0; j < n; ++j) rows[j] = token<T>(t, fk, s, j0 + j, 0);
    }
  };
  // The chunk kPrefetchKeys keys ahead: its rows (head 0) and count.
  const T* ahead_k[kLanes];
  const T* ahead_v[kLanes];
  int64_t ahead_n = 0;
  const auto look_ahead = [&](int64_t j0) {
    ahead_n = imax(0, imin(k_stop, j0 + kLanes) - j0);
    if (ahead_n == 0) return;
    chunk_rows(a.k, j0, ahead_n, ahead_k);
    chunk_rows(a.v, j0, ahead_n, ahead_v);
  };
  const auto prefetch = [&](int64_t hk) {
    for (int64_t j = 0; j < ahead_n; ++j) {
      prefetch_l2(ahead_k[j] + hk * a.k.head_stride, row_bytes);
      prefetch_l2(ahead_v[j] + hk * a.v.head_stride, row_bytes);
    }
  };
  constexpr bool kFloat = std::is_same<T, float>::value;
  const bool in_place = kFloat && D == Dv;
  float* zeros = w.d.get(Dv);  // the rows past the last key of a partial chunk
  std::memset(zeros, 0, sizeof(float) * Dv);
  for (int64_t j0 = k_first; j0 < imin(k_stop, k_first + kPrefetchKeys); j0 += kLanes) {
    look_ahead(j0);
    for (int64_t hk = hk_begin; hk < hk_end; ++hk) prefetch(hk);
  }
  const float* kh[kLanes];
  const float* vh[kLanes];
  const T* krows[kLanes];
  const T* vrows[kLanes];
  for (int64_t j0 = k_first; j0 < k_stop; j0 += kLanes) {
    const int64_t n = imin(kLanes, k_stop - j0);
    chunk_rows(a.k, j0, n, krows);
    chunk_rows(a.v, j0, n, vrows);
    look_ahead(j0 + kPrefetchKeys);
    for (int64_t hk = hk_begin; hk < hk_end; ++hk) {
      prefetch(hk);
      const int64_t k_head = hk * a.k.head_stride, v_head = hk * a.v.head_stride;
      for (int64_t j = 0; j < kLanes; ++j) {
        if (j >= n) {
          kh[j] = vh[j] = zeros;
        } else if (in_place) {
          kh[j] = reinterpret_cast<const float*>(krows[j] + k_head);
          vh[j] = reinterpret_cast<const float*>(vrows[j] + v_head);
        } else {
          load_f32(krows[j] + k_head, D, kc + j * Dv, Dv);
          load_f32(vrows[j] + v_head, D, vc + j * Dv, Dv);
          kh[j] = kc + j * Dv;
          vh[j] = vc + j * Dv;
        }
      }
      for (int64_t r = hk * group * lq; r < (hk + 1) * group * lq; ++r) {
        const int64_t valid = imax(0, imin(n, limit[r] - j0));
        const int64_t skip = imax(0, start[r] - j0);  // keys before the window
        if (valid <= skip) continue;
        const float* qr = q + r * Dv;
        V parts[kLanes];
        for (int j = 0; j < kLanes; ++j) parts[j] = zero();
        for (int64_t d = 0; d < Dv; d += kLanes) {
          const V qv = load(qr + d);
          for (int j = 0; j < kLanes; ++j) parts[j] = fma(qv, load(kh[j] + d), parts[j]);
        }
        // Scaled after the dot product, as the prefill and backward kernels
        // do, so that the lse the backward reads matches its recomputed scores.
        store(buf, transform(reduce_add_lanes(parts)));
        add_bias(a.bias, s, r / lq, r % lq, j0, valid, buf);
        if (g.alibi != nullptr)
          add_alibi_along_keys(buf, valid, static_cast<float>(r % lq + offset - j0),
                               g.alibi_slope(s, r / lq), kLog2e);
        for (int64_t j = 0; j < skip; ++j) buf[j] = -kInf;
        for (int64_t j = valid; j < kLanes; ++j) buf[j] = -kInf;
        const V sc = load(buf);
        const float mx = reduce_max(sc);  // NaN if a score is NaN
        const float m_new = (mx > m[r] || std::isnan(mx)) ? mx : m[r];
        if (m_new == -kInf) continue;
        const V pv = exp2(sub(sc, set1(m_new)));
        const float alpha = std::exp2(m[r] - m_new);
        l[r] = l[r] * alpha + reduce_add(pv);
        m[r] = m_new;
        float* orow = o + r * Dv;
        if (alpha != 1.f)
          for (int64_t d = 0; d < Dv; d += kLanes) store(orow + d, mul(load(orow + d), set1(alpha)));
        float* p = buf + kLanes;
        store(p, pv);
        for (int64_t d = 0; d < Dv; d += kLanes) {
          V acc = load(orow + d);
          for (int64_t j = 0; j < valid; ++j) acc = fma(set1(p[j]), load(vh[j] + d), acc);
          store(orow + d, acc);
        }
      }
    }
  }
  for (int64_t r = r_begin; r < r_end; ++r) {
    float* out = partial + r * (D + 2);
    std::memcpy(out, o + r * Dv, sizeof(float) * D);
    out[D] = m[r];
    out[D + 1] = l[r];
  }
}

// -- backward -------------------------------------------------------------------------

inline const float* stat_row(const LseLayout& t, const AttentionGeometry& g, int64_t s, int64_t h) {
  return t.data + s * t.batch_stride + h * t.head_stride + g.first_q(s);
}

// Whether a block's scores need nothing but the scale: no bias, ALiBi or
// softcap (the vector path of the key pass below; the others go element by
// element, as does the query pass: there the vector e^x's last-bit
// differences from std::exp moved an fp32 dQ of the tests past the accuracy
// rule's bound).
inline bool plain_scores(const AttentionBackward& a, float alibi) {
  return a.bias.data == nullptr && alibi == 0.f && !(a.g.softcap > 0.f);
}

// P^T and dS^T of one block in place, in vectors (plain scores): bk key rows
// (keys k_begin..) of kAttentionBlockQ query columns (queries t0.., bq of
// them real), raw scores in pt, dP^T in dpt; lse and delta from query t0 on.
// P = e^(raw * scale - lse), the exponent in one fused multiply-add, and
// dS = P (dP - delta) scale, natural units. Elements no query sees (masked, padding, infinite lse) are 0 in both, as
// in the element-wise path.
inline void transposed_block_grads(const AttentionGeometry& g, const float* lse,
                                   const float* delta, int64_t bq, int64_t k_begin, int64_t bk,
                                   int64_t t0, int64_t offset, int64_t lq, float* pt, float* dpt) {
  constexpr int64_t BQ = kAttentionBlockQ;
  alignas(64) float neg_lse[BQ], delta_b[BQ], live_b[BQ];
  for (int64_t i = 0; i < BQ; ++i) {
    const bool real = i < bq;
    neg_lse[i] = real ? -lse[i] : 0.f;
    delta_b[i] = real ? delta[i] : 0.f;
    live_b[i] = real && !std::isinf(lse[i]) ? 1.f : -1.f;
  }
  const V scale = set1(g.scale);
  for (int64_t j = 0; j < bk; ++j) {
    const int64_t key = k_begin + j;
    // The queries that see this key: [query_lo(key), query_hi(key + 1)).
    const int64_t lo = imin(bq, imax(0, g.query_lo(key, offset) - t0));
    const int64_t hi = imax(lo, imin(bq, g.query_hi(key + 1, offset, lq) - t0));
    float* prow = pt + j * BQ;
    float* dprow = dpt + j * BQ;
    for (int64_t i = 0; i < BQ; i += kLanes) {
      V p = exp(fma(load(prow + i), scale, load(neg_lse + i)));
      p = select_negative(load(live_b + i), zero(), p);
      store(prow + i, p);
      store(dprow + i, mul(mul(p, sub(load(dprow + i), load(delta_b + i))), scale));
    }
    for (int64_t i = 0; i < lo; ++i) prow[i] = dprow[i] = 0.f;
    for (int64_t i = hi; i < BQ; ++i) prow[i] = dprow[i] = 0.f;
  }
}

template <typename T>
void backward_kv_task(const AttentionBackward& a, int64_t s, int64_t hk, int64_t k_begin,
                      int64_t k_end) {
  const AttentionGeometry& g = a.g;
  const int64_t D = g.head_dim, Dp = round_up(D, kTileCols), BQ = kAttentionBlockQ;
  const int64_t group = g.heads / g.heads_kv, lq = g.len_q(s), lk = g.len_k(s);
  const int64_t offset = lk - lq, fq = g.first_q(s), fk = g.first_k(s);
  const int64_t bk = k_end - k_begin;
  Workspace& w = workspace();
  float* kb = w.a.get(bk * D);        // K rows
  float* vb = w.b.get(bk * D);        // V rows
  float* qt = w.c.get(D * BQ);        // Q^T
  float* dot = w.d.get(D * BQ);       // dO^T
  float* qr = w.e.get(BQ * Dp);       // Q rows
  float* dor = w.f.get(BQ * Dp);      // dO rows
  float* pt = w.g.get(bk * BQ * 2);   // P^T, then dS^T
  float* dpt = pt + bk * BQ;          // dP^T
  float* acc = w.h.get(2 * bk * Dp);  // dK, dV
  float* dk = acc;
  float* dv = acc + bk * Dp;
  std::memset(acc, 0, sizeof(float) * 2 * bk * Dp);
  for (int64_t j = 0; j < bk; ++j) {
    load_f32(token<T>(a.k, fk, s, k_begin + j, hk), D, kb + j * D, D);
    load_f32(token<T>(a.v, fk, s, k_begin + j, hk), D, vb + j * D, D);
  }
  // The fused backward (attention_backward_fused): this task has every key,
  // and adds each query block's dQ = dS K here (K rows Dp wide).
  const bool fused = attention_backward_fused(a, s);
  float* kp = nullptr;
  float* dqb = nullptr;
  if (fused) {
    kp = w.i.get(bk * Dp);
    dqb = w.j.get(BQ * Dp);
    pack_rows<T>(a.k, fk + k_begin, s, hk, bk, D, kp, Dp, bk);
  }
  // The queries that see any of these keys (causal or a window: not all).
  const int64_t t_first = g.query_lo(k_begin, offset);
  const int64_t t_stop = g.query_hi(k_end, offset, lq);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float* lse = stat_row(a.lse, g, s, h);
    const float* delta = a.delta + s * a.lse.batch_stride + h * a.lse.head_stride + fq;
    const float alibi = g.alibi_slope(s, h);
    for (int64_t t0 = t_first; t0 < t_stop; t0 += BQ) {
      const int64_t bq = imin(BQ, t_stop - t0);
      pack_transposed<T>(a.q, fq + t0, s, h, bq, D, qt, BQ);
      pack_transposed<T>(a.grad_out, fq + t0, s, h, bq, D, dot, BQ);
      pack_rows<T>(a.q, fq + t0, s, h, bq, D, qr, Dp, bq);
      pack_rows<T>(a.grad_out, fq + t0, s, h, bq, D, dor, Dp, bq);
      gemm<false>(bk, BQ, D, kb, D, 1, qt, BQ, pt, BQ, kAttentionBackwardChunk);   // S^T
      gemm<false>(bk, BQ, D, vb, D, 1, dot, BQ, dpt, BQ, kAttentionBackwardChunk); // dP^T
      if (plain_scores(a, alibi)) {
        transposed_block_grads(g, lse + t0, delta + t0, bq, k_begin, bk, t0, offset, lq, pt, dpt);
      } else {
        for (int64_t j = 0; j < bk; ++j) {
          float* prow = pt + j * BQ;
          float* dprow = dpt + j * BQ;
          for (int64_t i = 0; i < BQ; ++i) {
            const int64_t t = t0 + i, key = k_begin + j;
            const bool seen =
                i < bq && key >= g.key_lo(t, offset) && key < g.key_hi(t, offset, lk);
            if (!seen) {
              prow[i] = 0.f;
              dprow[i] = 0.f;
              continue;
            }
            // Natural units until after the subtraction of lse: both are large,
            // their difference small, and scaling first would round both.
            float slope;
            float sv = natural_score(g, prow[i], slope);
            if (a.bias.data != nullptr) add_bias(a.bias, s, h, t, key, 1, &sv, 1.f);
            sv -= alibi * std::fabs(static_cast<float>(t + offset - key));
            const float p = std::isinf(lse[t]) ? 0.f : std::exp(sv - lse[t]);
            prow[i] = p;
            dprow[i] = p * (dprow[i] - delta[t]) * g.scale * slope;  // dS, natural units
          }
        }
      }
      gemm<true>(bk, Dp, bq, pt, BQ, 1, dor, Dp, dv, Dp);   // dV += P^T dO
      gemm<true>(bk, Dp, bq, dpt, BQ, 1, qr, Dp, dk, Dp);   // dK += dS^T Q
      if (fused) {
        gemm<false>(bq, Dp, bk, dpt, 1, BQ, kp, Dp, dqb, Dp);  // dQ = dS K, all keys
        for (int64_t i = 0; i < bq; ++i)
          store_scaled(dqb + i * Dp, D, 1.f, token_out<T>(a.grad_q, fq, s, t0 + i, h));
      }
    }
  }
  for (int64_t j = 0; j < bk; ++j) {
    store_scaled(dk + j * Dp, D, 1.f, token_out<T>(a.grad_k, fk, s, k_begin + j, hk));
    store_scaled(dv + j * Dp, D, 1.f, token_out<T>(a.grad_v, fk, s, k_begin + j, hk));
  }
}

template <typename T>
void backward_q_task(const AttentionBackward& a, int64_t s, int64_t h, int64_t q_begin,
                     int64_t q_end) {
  const AttentionGeometry& g = a.g;
  const int64_t D = g.head_dim, Dp = round_up(D, kTileCols), BK = kAttentionBlockK;
  const int64_t hk = h / (g.heads / g.heads_kv), lq = g.len_q(s), lk = g.len_k(s);
  const int64_t offset = lk - lq, fq = g.first_q(s), fk = g.first_k(s);
  const int64_t bq = q_end - q_begin;
  Workspace& w = workspace();
  float* q = w.a.get(bq * D);
  float* dout = w.b.get(bq * D);
  float* kt = w.c.get(D * BK);
  float* vt = w.d.get(D * BK);
  float* kr = w.e.get(BK * Dp);
  float* sc = w.f.get(2 * bq * BK);
  float* dp = sc + bq * BK;
  float* dq = w.g.get(bq * Dp);
  std::memset(dq, 0, sizeof(float) * bq * Dp);
  for (int64_t i = 0; i < bq; ++i) {
    load_f32(token<T>(a.q, fq, s, q_begin + i, h), D, q + i * D, D);
    load_f32(token<T>(a.grad_out, fq, s, q_begin + i, h), D, dout + i * D, D);
  }
  const float* lse = stat_row(a.lse, g, s, h);
  const float* delta = a.delta + s * a.lse.batch_stride + h * a.lse.head_stride + fq;
  const float alibi = g.alibi_slope(s, h);
  const int64_t k_start = g.walk_start(g.key_lo(q_begin, offset), BK);
  const int64_t k_stop = imax(k_start, g.key_hi(q_end - 1, offset, lk));
  float slope[kAttentionBlockK];
  for (int64_t j0 = k_start; j0 < k_stop; j0 += BK) {
    const int64_t bk = imin(BK, k_stop - j0);
    pack_transposed<T>(a.k, fk + j0, s, hk, bk, D, kt, BK);
    pack_transposed<T>(a.v, fk + j0, s, hk, bk, D, vt, BK);
    pack_rows<T>(a.k, fk + j0, s, hk, bk, D, kr, Dp, BK);
    gemm<false>(bq, BK, D, q, D, 1, kt, BK, sc, BK, kAttentionBackwardChunk);     // S
    gemm<false>(bq, BK, D, dout, D, 1, vt, BK, dp, BK, kAttentionBackwardChunk);  // dP
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t t = q_begin + i;
      // the keys of this block that query t sees: [first, valid)
      const int64_t first = imin(bk, imax(0, g.key_lo(t, offset) - j0));
      const int64_t valid = imax(first, imin(bk, g.key_hi(t, offset, lk) - j0));
      float* srow = sc + i * BK;
      float* dprow = dp + i * BK;
      if (plain_scores(a, alibi)) {
        // In vectors, P = e^(raw * scale - lse) by the key pass's formula
        // (transposed_block_grads), so both passes take the same P.
        const V scale = set1(g.scale), neg_lse = set1(-lse[t]), dl = set1(delta[t]);
        if (std::isinf(lse[t])) {
          std::memset(srow, 0, sizeof(float) * BK);
        } else {
          for (int64_t j = 0; j < BK; j += kLanes)
            store(srow + j, exp(fma(load(srow + j), scale, neg_lse)));
          for (int64_t j = 0; j < first; ++j) srow[j] = 0.f;
          for (int64_t j = valid; j < BK; ++j) srow[j] = 0.f;
        }
        // dS, natural units (0 * a NaN dP stays NaN, as in PyTorch's composition)
        for (int64_t j = 0; j < BK; j += kLanes)
          store(dprow + j, mul(mul(load(srow + j), sub(load(dprow + j), dl)), scale));
        continue;
      }
      // Natural units until after the subtraction of lse (see backward_kv_task).
      for (int64_t j = 0; j < BK; ++j) {
        slope[j] = 1.f;
        srow[j] = j >= first && j < valid ? natural_score(g, srow[j], slope[j]) : 0.f;
      }
      add_bias(a.bias, s, h, t, j0 + first, valid - first, srow + first, 1.f);
      if (alibi != 0.f)
        add_alibi_along_keys(srow + first, valid - first,
                             static_cast<float>(t + offset - j0 - first), alibi, 1.f);
      for (int64_t j = 0; j < BK; ++j) {
        const bool seen = j >= first && j < valid && !std::isinf(lse[t]);
        const float p = seen ? std::exp(srow[j] - lse[t]) : 0.f;
        // dS, natural units (0 * a NaN dP stays NaN, as in PyTorch's composition)
        dprow[j] = p * (dprow[j] - delta[t]) * g.scale * slope[j];
      }
    }
    gemm<true>(bq, Dp, BK, dp, BK, 1, kr, Dp, dq, Dp);  // dQ += dS K
  }
  for (int64_t i = 0; i < bq; ++i)
    store_scaled(dq + i * Dp, D, 1.f, token_out<T>(a.grad_q, fq, s, q_begin + i, h));
}

}  // namespace

void attention_forward(const AttentionForward& a, int64_t s, int64_t h, int64_t q_begin,
                       int64_t q_end) {
  switch (a.type) {
    case DType::f32: return forward_task<float>(a, s, h, q_begin, q_end);
    case DType::bf16:
#if defined(__AVX512BF16__)
      return forward_task_bf16(a, s, h, q_begin, q_end);
#else
      return forward_task<bf16>(a, s, h, q_begin, q_end);
#endif
    case DType::f16: return forward_task<f16>(a, s, h, q_begin, q_end);
  }
}

void attention_decode(const AttentionForward& a, int64_t s, int64_t hk_begin, int64_t hk_end,
                      int64_t k_begin, int64_t k_end, float* partial) {
  switch (a.type) {
    case DType::f32: return decode_task<float>(a, s, hk_begin, hk_end, k_begin, k_end, partial);
    case DType::bf16: return decode_task<bf16>(a, s, hk_begin, hk_end, k_begin, k_end, partial);
    case DType::f16: return decode_task<f16>(a, s, hk_begin, hk_end, k_begin, k_end, partial);
  }
}

// One fused multiply-add per element in order (std::fma: an instruction in
// the FMA builds; in attention.cpp's portable build it was a libm call, ~5%
// of a BERT-sized attention backward).
void attention_delta(const float* x, const float* y, int64_t begin, int64_t end, int64_t D,
                     float* out) {
  for (int64_t r = begin; r < end; ++r) {
    float total = 0.f;
    for (int64_t i0 = 0; i0 < D; i0 += kAttentionBackwardChunk) {
      float acc = 0.f;
      const int64_t i_end = imin(D, i0 + kAttentionBackwardChunk);
      for (int64_t i = i0; i < i_end; ++i) acc = std::fma(x[r * D + i], y[r * D + i], acc);
      total = i0 == 0 ? acc : total + acc;
    }
    out[r] = total;
  }
}

void attention_backward_kv(const AttentionBackward& a, int64_t s, int64_t hk, int64_t k_begin,
                           int64_t k_end) {
  switch (a.type) {
    case DType::f32: return backward_kv_task<float>(a, s, hk, k_begin, k_end);
    case DType::bf16: return backward_kv_task<bf16>(a, s, hk, k_begin, k_end);
    case DType::f16: return backward_kv_task<f16>(a, s, hk, k_begin, k_end);
  }
}

void attention_backward_q(const AttentionBackward& a, int64_t s, int64_t h, int64_t q_begin,
                          int64_t q_end) {
  switch (a.type) {
    case DType::f32: return backward_q_task<float>(a, s, h, q_begin, q_end);
    case DType::bf16: return backward_q_task<bf16>(a, s, h, q_begin, q_end);
    case DType::f16: return backward_q_task<f16>(a, s, h, q_begin, q_end);
  }
}

}  // namespace pyllm::cpu::PYLLM_ISA
