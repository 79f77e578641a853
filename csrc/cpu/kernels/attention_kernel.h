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

// A per-thread scratch buffer. (No std containers in ISA code: their inline
// functions, compiled with this ISA's flags, could be picked by the linker
// for code that runs on any CPU.)
struct Scratch {
  float* data = nullptr;
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(64, round_up(imax(n, 1) * 4, 64)));
      size = n;
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

struct Workspace {
  Scratch a, b, c, d, e, f, g, h, rows;
};

Workspace& workspace() {
  static thread_local Workspace w;
  return w;
}

// Room for 2 * rows int64 (each row's head and query), in float storage.
int64_t* row_index(Workspace& w, int64_t rows) {
  static_assert(sizeof(int64_t) == 2 * sizeof(float), "index storage");
  return reinterpret_cast<int64_t*>(w.rows.get(4 * rows));
}

// -- fp32 matrix products --------------------------------------------------------

// C[R][kTileCols] (+)= A[R][K] . B[K][kTileCols]  (A rows lda apart, B rows ldb apart).
// When accumulating, the product is summed from zero and added to C at the
// end: a block's sum plus the running total rounds less than adding every
// term to the running total (gradients sum hundreds of blocks).
template <int R, bool kAccumulate>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, float* c,
                 int64_t ldc) {
  V acc[R][kTileVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTileVecs; ++j) acc[r][j] = zero();
  for (int64_t k = 0; k < K; ++k) {
    V bv[kTileVecs];
    for (int j = 0; j < kTileVecs; ++j) bv[j] = load(b + k * ldb + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const V ar = set1(a[r * lda + k]);
      for (int j = 0; j < kTileVecs; ++j) acc[r][j] = fma(ar, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTileVecs; ++j) {
      float* out = c + r * ldc + j * kLanes;
      store(out, kAccumulate ? add(load(out), acc[r][j]) : acc[r][j]);
    }
}

// C[M][N] (+)= A[M][K] . B[K][N]; N is a multiple of kTileCols.
template <bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
          int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    int64_t m0 = 0;
    for (; m0 + kTileRows <= M; m0 += kTileRows)
      tile<kTileRows, kAccumulate>(a + m0 * lda, lda, b + n0, ldb, K, c + m0 * ldc + n0, ldc);
    const float* ar = a + m0 * lda;
    float* cr = c + m0 * ldc + n0;
    switch (M - m0) {
      case 3: tile<3, kAccumulate>(ar, lda, b + n0, ldb, K, cr, ldc); break;
      case 2: tile<2, kAccumulate>(ar, lda, b + n0, ldb, K, cr, ldc); break;
      case 1: tile<1, kAccumulate>(ar, lda, b + n0, ldb, K, cr, ldc); break;
      default: break;
    }
  }
}

// -- data movement ------------------------------------------------------------------

template <typename T>
inline const T* token(const TokenLayout& t, int64_t first, int64_t s, int64_t i, int64_t h) {
  return static_cast<const T*>(t.data) + s * t.batch_stride + (first + i) * t.token_stride +
         h * t.head_stride;
}

template <typename T>
inline T* token_out(const TokenLayout& t, int64_t first, int64_t s, int64_t i, int64_t h) {
  return static_cast<T*>(t.data) + s * t.batch_stride + (first + i) * t.token_stride +
         h * t.head_stride;
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
  for (int64_t j = 0; j < count; ++j) {
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

// The log-sum-exp in natural units from the row max m (log2 units) and sum l,
// rounded once: the backward recomputes P = exp(s - lse), so every rounding
// of lse is a relative error in every P of the row.
inline float natural_lse(float m, float l) {
  return static_cast<float>((static_cast<double>(m) + std::log2(static_cast<double>(l))) *
                            0.6931471805599453);
}

// -- forward ------------------------------------------------------------------------

// The number of keys of block [j0, j0 + bk) that query i may see.
inline int64_t visible(const AttentionGeometry& g, int64_t offset, int64_t i, int64_t j0,
                       int64_t bk) {
  if (!g.causal) return bk;
  return imax(0, imin(bk, i + offset + 1 - j0));
}

// Online softmax of one row of scores (in place: scores become P). The row
// has `valid` visible keys, then padding up to `width`. Rescales the row's
// accumulator o[0, Dp) when its max moves.
inline void softmax_row(float* row, int64_t valid, int64_t width, float& m, float& l, float* o,
                        int64_t Dp) {
  float mx = -kInf;
  {
    V vmax = set1(-kInf);
    int64_t j = 0;
    for (; j + kLanes <= valid; j += kLanes) vmax = max(vmax, load(row + j));
    mx = reduce_max(vmax);
    for (; j < valid; ++j) mx = row[j] > mx ? row[j] : mx;
  }
  const float m_new = mx > m ? mx : m;
  if (m_new == -kInf) {  // nothing visible yet (or all masked by the bias)
    std::memset(row, 0, sizeof(float) * width);
    return;
  }
  const float alpha = std::exp2(m - m_new);
  const V mv = set1(m_new);
  V vsum = zero();
  int64_t j = 0;
  for (; j + kLanes <= valid; j += kLanes) {
    const V p = exp2(sub(load(row + j), mv));
    store(row + j, p);
    vsum = add(vsum, p);
  }
  float sum = reduce_add(vsum);
  for (; j < valid; ++j) {
    row[j] = std::exp2(row[j] - m_new);
    sum += row[j];
  }
  for (j = valid; j < width; ++j) row[j] = 0.f;
  l = l * alpha + sum;
  if (alpha != 1.f) {
    const V av = set1(alpha);
    for (int64_t d = 0; d < Dp; d += kLanes) store(o + d, mul(load(o + d), av));
  }
  m = m_new;
}

// Rows (head heads[r], query queries[r]) of sequence s, all of kv head hk,
// against keys [k_begin, k_end): updates o (rows x Dp), m and l (log2 units).
template <typename T>
void attend(const AttentionForward& a, int64_t s, int64_t hk, int64_t rows, const int64_t* heads,
            const int64_t* queries, int64_t k_begin, int64_t k_end, float* o, float* m, float* l) {
  const AttentionGeometry& g = a.g;
  const int64_t D = g.head_dim, Dp = round_up(D, kTileCols), BK = kAttentionBlockK;
  const int64_t offset = g.len_k(s) - g.len_q(s);
  const int64_t fq = g.first_q(s), fk = g.first_k(s);
  Workspace& w = workspace();
  float* q = w.a.get(rows * D);
  float* kt = w.b.get(D * BK);
  float* vb = w.c.get(BK * Dp);
  float* sc = w.d.get(rows * BK);
  for (int64_t r = 0; r < rows; ++r) load_f32(token<T>(a.q, fq, s, queries[r], heads[r]), D, q + r * D, D);
  int64_t k_stop = k_begin;
  for (int64_t r = 0; r < rows; ++r)
    k_stop = imax(k_stop, g.causal ? imin(k_end, queries[r] + offset + 1) : k_end);
  const float c = g.scale * kLog2e;
  for (int64_t j0 = k_begin; j0 < k_stop; j0 += BK) {
    const int64_t bk = imin(BK, k_stop - j0);
    pack_transposed<T>(a.k, fk + j0, s, hk, bk, D, kt, BK);
    gemm<false>(rows, BK, D, q, D, kt, BK, sc, BK);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = sc + r * BK;
      const int64_t valid = imin(visible(g, offset, queries[r], j0, bk), k_end - j0);
      const V cv = set1(c);
      for (int64_t j = 0; j < valid; j += kLanes) {
        const int n = static_cast<int>(imin(kLanes, valid - j));
        store(row + j, mul(load(row + j, n), cv), n);
      }
      add_bias(a.bias, s, heads[r], queries[r], j0, valid, row);
      softmax_row(row, valid, BK, m[r], l[r], o + r * Dp, Dp);
    }
    pack_rows<T>(a.v, fk + j0, s, hk, bk, D, vb, Dp, BK);
    gemm<true>(rows, Dp, BK, sc, BK, vb, Dp, o, Dp);
  }
}

template <typename T>
void forward_task(const AttentionForward& a, int64_t s, int64_t h, int64_t q_begin, int64_t q_end) {
  const AttentionGeometry& g = a.g;
  const int64_t rows = q_end - q_begin, D = g.head_dim, Dp = round_up(D, kTileCols);
  const int64_t hk = h / (g.heads / g.heads_kv);
  Workspace& w = workspace();
  float* o = w.e.get(rows * Dp);
  float* m = w.f.get(rows);
  float* l = w.g.get(rows);
  int64_t* heads = row_index(w, rows);
  int64_t* queries = heads + rows;
  for (int64_t r = 0; r < rows; ++r) {
    heads[r] = h;
    queries[r] = q_begin + r;
    m[r] = -kInf;
    l[r] = 0.f;
  }
  std::memset(o, 0, sizeof(float) * rows * Dp);
  attend<T>(a, s, hk, rows, heads, queries, 0, g.len_k(s), o, m, l);
  const int64_t fq = g.first_q(s);
  for (int64_t r = 0; r < rows; ++r) {
    T* out = token_out<T>(a.out, fq, s, q_begin + r, h);
    float* lse = a.lse.data + s * a.lse.batch_stride + h * a.lse.head_stride + fq + q_begin + r;
    if (l[r] == 0.f) {  // the query sees no key: zeros, as flash-attn
      zero_row(out, D);
      *lse = kInf;
    } else {
      store_scaled(o + r * Dp, D, 1.f / l[r], out);
      *lse = natural_lse(m[r], l[r]);
    }
  }
}

// The decode path: few query rows (each kv head's group of query heads x the
// queries), many keys. Keys go by chunks of kLanes: the chunk's K and V rows
// (every kv head) are converted to fp32 once, each query row's kLanes scores
// come from
// kLanes dot products reduced at once (reduce_add_lanes), and P V is a
// broadcast-FMA per key into the row's accumulator.
template <typename T>
void decode_task(const AttentionForward& a, int64_t s, int64_t k_begin, int64_t k_end,
                 float* partial) {
  const AttentionGeometry& g = a.g;
  const int64_t group = g.heads / g.heads_kv, lq = g.len_q(s), lk = g.len_k(s);
  const int64_t rows = g.heads * lq;  // row r: head r / lq, query r % lq
  const int64_t D = g.head_dim, Dv = round_up(D, kLanes);
  const int64_t offset = lk - lq, fq = g.first_q(s), fk = g.first_k(s);
  Workspace& w = workspace();
  float* q = w.a.get(rows * Dv);
  float* kc = w.b.get(g.heads_kv * kLanes * Dv);  // a chunk's K rows as fp32: [head][key][Dv]
  float* vc = w.c.get(g.heads_kv * kLanes * Dv);
  float* o = w.e.get(rows * Dv);
  float* m = w.f.get(rows);
  float* l = w.g.get(rows);
  float* limit = w.h.get(rows + 2 * kLanes);  // per row: keys < limit are visible
  float* buf = limit + rows;                   // kLanes scores, then kLanes probabilities
  const float c = g.scale * kLog2e;
  int64_t k_stop = k_begin;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r / lq, i = r % lq;
    load_f32(token<T>(a.q, fq, s, i, h), D, q + r * Dv, Dv);
    const int64_t stop = g.causal ? imin(k_end, i + offset + 1) : k_end;
    limit[r] = static_cast<float>(stop);
    k_stop = imax(k_stop, stop);
    m[r] = -kInf;
    l[r] = 0.f;
  }
  std::memset(o, 0, sizeof(float) * rows * Dv);
  // A chunk's K and V rows are converted key by key, every head of a key in
  // turn: memory order for the usual (token, head, dim) layout, which the
  // hardware prefetchers follow (head by head, rows token_stride apart, they
  // don't); the keys kPrefetchKeys ahead are also requested explicitly.
  constexpr int64_t kPrefetchKeys = 2 * kLanes;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const auto prefetch = [&](int64_t key) {
    if (key >= k_stop) return;
    for (int64_t hk = 0; hk < g.heads_kv; ++hk) {
      const char* kr = reinterpret_cast<const char*>(token<T>(a.k, fk, s, key, hk));
      const char* vr = reinterpret_cast<const char*>(token<T>(a.v, fk, s, key, hk));
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kr + b, 0, 3);
        __builtin_prefetch(vr + b, 0, 3);
      }
    }
  };
  for (int64_t key = k_begin; key < imin(k_stop, k_begin + kPrefetchKeys); ++key) prefetch(key);
  const float* kh[kLanes];
  const float* vh[kLanes];
  for (int64_t j0 = k_begin; j0 < k_stop; j0 += kLanes) {
    const int64_t n = imin(kLanes, k_stop - j0);
    for (int64_t j = 0; j < kLanes; ++j) {
      prefetch(j0 + j + kPrefetchKeys);
      for (int64_t hk = 0; hk < g.heads_kv; ++hk) {
        float* kd = kc + (hk * kLanes + j) * Dv;
        float* vd = vc + (hk * kLanes + j) * Dv;
        if (j < n) {
          load_f32(token<T>(a.k, fk, s, j0 + j, hk), D, kd, Dv);
          load_f32(token<T>(a.v, fk, s, j0 + j, hk), D, vd, Dv);
        } else {
          std::memset(kd, 0, sizeof(float) * Dv);
          std::memset(vd, 0, sizeof(float) * Dv);
        }
      }
    }
    for (int64_t hk = 0; hk < g.heads_kv; ++hk) {
      for (int64_t j = 0; j < kLanes; ++j) {
        kh[j] = kc + (hk * kLanes + j) * Dv;
        vh[j] = vc + (hk * kLanes + j) * Dv;
      }
      for (int64_t r = hk * group * lq; r < (hk + 1) * group * lq; ++r) {
        const int64_t valid = imax(0, imin(n, static_cast<int64_t>(limit[r]) - j0));
        if (valid == 0) continue;
        const float* qr = q + r * Dv;
        V parts[kLanes];
        for (int j = 0; j < kLanes; ++j) parts[j] = zero();
        for (int64_t d = 0; d < Dv; d += kLanes) {
          const V qv = load(qr + d);
          for (int j = 0; j < kLanes; ++j) parts[j] = fma(qv, load(kh[j] + d), parts[j]);
        }
        // Scaled after the dot product, as the prefill and backward kernels
        // do, so that the lse the backward reads matches its recomputed scores.
        store(buf, mul(reduce_add_lanes(parts), set1(c)));
        add_bias(a.bias, s, r / lq, r % lq, j0, valid, buf);
        for (int64_t j = valid; j < kLanes; ++j) buf[j] = -kInf;
        const V sc = load(buf);
        const float mx = reduce_max(sc);
        const float m_new = mx > m[r] ? mx : m[r];
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
  for (int64_t r = 0; r < rows; ++r) {
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
  // Queries that see any of these keys: causal, t + offset >= k_begin.
  const int64_t t_first = g.causal ? imax(0, k_begin - offset) : 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float* lse = stat_row(a.lse, g, s, h);
    const float* delta = a.delta + s * a.lse.batch_stride + h * a.lse.head_stride + fq;
    for (int64_t t0 = t_first; t0 < lq; t0 += BQ) {
      const int64_t bq = imin(BQ, lq - t0);
      pack_transposed<T>(a.q, fq + t0, s, h, bq, D, qt, BQ);
      pack_transposed<T>(a.grad_out, fq + t0, s, h, bq, D, dot, BQ);
      pack_rows<T>(a.q, fq + t0, s, h, bq, D, qr, Dp, bq);
      pack_rows<T>(a.grad_out, fq + t0, s, h, bq, D, dor, Dp, bq);
      gemm<false>(bk, BQ, D, kb, D, qt, BQ, pt, BQ);    // S^T
      gemm<false>(bk, BQ, D, vb, D, dot, BQ, dpt, BQ);  // dP^T
      for (int64_t j = 0; j < bk; ++j) {
        float* prow = pt + j * BQ;
        float* dprow = dpt + j * BQ;
        for (int64_t i = 0; i < BQ; ++i) {
          const int64_t t = t0 + i;
          const bool seen = i < bq && (!g.causal || k_begin + j <= t + offset);
          if (!seen) {
            prow[i] = 0.f;
            dprow[i] = 0.f;
            continue;
          }
          // Natural units until after the subtraction of lse: both are large,
          // their difference small, and scaling first would round both.
          float sv = prow[i] * g.scale;
          if (a.bias.data != nullptr) add_bias(a.bias, s, h, t, k_begin + j, 1, &sv, 1.f);
          const float p = std::isinf(lse[t]) ? 0.f : std::exp2((sv - lse[t]) * kLog2e);
          prow[i] = p;
          dprow[i] = p * (dprow[i] - delta[t]) * g.scale;  // dS, natural units
        }
      }
      gemm<true>(bk, Dp, bq, pt, BQ, dor, Dp, dv, Dp);   // dV += P^T dO
      gemm<true>(bk, Dp, bq, dpt, BQ, qr, Dp, dk, Dp);   // dK += dS^T Q
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
  const int64_t k_stop = g.causal ? imax(0, imin(lk, q_end - 1 + offset + 1)) : lk;
  for (int64_t j0 = 0; j0 < k_stop; j0 += BK) {
    const int64_t bk = imin(BK, k_stop - j0);
    pack_transposed<T>(a.k, fk + j0, s, hk, bk, D, kt, BK);
    pack_transposed<T>(a.v, fk + j0, s, hk, bk, D, vt, BK);
    pack_rows<T>(a.k, fk + j0, s, hk, bk, D, kr, Dp, BK);
    gemm<false>(bq, BK, D, q, D, kt, BK, sc, BK);      // S
    gemm<false>(bq, BK, D, dout, D, vt, BK, dp, BK);   // dP
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t t = q_begin + i;
      const int64_t valid = visible(g, offset, t, j0, bk);
      float* srow = sc + i * BK;
      float* dprow = dp + i * BK;
      // Natural units until after the subtraction of lse (see backward_kv_task).
      for (int64_t j = 0; j < BK; ++j) srow[j] = j < valid ? srow[j] * g.scale : 0.f;
      add_bias(a.bias, s, h, t, j0, valid, srow, 1.f);
      for (int64_t j = 0; j < BK; ++j) {
        const float p =
            (j < valid && !std::isinf(lse[t])) ? std::exp2((srow[j] - lse[t]) * kLog2e) : 0.f;
        dprow[j] = p * (dprow[j] - delta[t]) * g.scale;  // dS, natural units
      }
    }
    gemm<true>(bq, Dp, BK, dp, BK, kr, Dp, dq, Dp);  // dQ += dS K
  }
  for (int64_t i = 0; i < bq; ++i)
    store_scaled(dq + i * Dp, D, 1.f, token_out<T>(a.grad_q, fq, s, q_begin + i, h));
}

}  // namespace

void attention_forward(const AttentionForward& a, int64_t s, int64_t h, int64_t q_begin,
                       int64_t q_end) {
  switch (a.type) {
    case DType::f32: return forward_task<float>(a, s, h, q_begin, q_end);
    case DType::bf16: return forward_task<bf16>(a, s, h, q_begin, q_end);
    case DType::f16: return forward_task<f16>(a, s, h, q_begin, q_end);
  }
}

void attention_decode(const AttentionForward& a, int64_t s, int64_t k_begin, int64_t k_end,
                      float* partial) {
  switch (a.type) {
    case DType::f32: return decode_task<float>(a, s, k_begin, k_end, partial);
    case DType::bf16: return decode_task<bf16>(a, s, k_begin, k_end, partial);
    case DType::f16: return decode_task<f16>(a, s, k_begin, k_end, partial);
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
