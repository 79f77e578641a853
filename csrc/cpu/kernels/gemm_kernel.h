// GEMM kernels, written once over the SIMD layer and compiled per ISA (the
// including file defines PYLLM_ISA).
//
// Blocked path (gemm_block): B's columns are packed, kNR at a time, into a
// panel [K][kNR] of fp32 (once per column block and call, or never with a
// pre-packed weight); a register-blocked micro-kernel computes kMR x kNR of C
// from kMR rows of A (broadcast) and the panel (vector loads), and the
// epilogue finishes the tile while it is in L1. Loop order: panel outer, rows
// inner, so a panel (K x kNR) stays in L2 and kMR rows of A in L1.
// Skinny path (gemm_skinny, M <= 16): each weight row is read once and used
// for every row of A; kLanes output columns at a time, their dot products
// reduced together (reduce_add_lanes). On AVX-512 it sums in the blocked
// order: skinny_panel transposes the weight into panels, skinny_rows reads it
// in place against x^T (more rows).
// On AVX512-BF16, bf16 x bf16 products use vdpbf16ps with panels of pairs,
// or AMX tiles where the CPU and OS allow (GemmArgs::use_amx; block_amx).
#pragma once

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "activation.h"
#include "gemm.h"
#include "scratch.h"
#include "simd.h"

namespace pyllm::cpu::PYLLM_ISA {
namespace {

using namespace simd;

constexpr int kNV = kLanes == 16 ? 4 : 2;  // vectors per panel row
constexpr int64_t kNR = int64_t{kNV} * kLanes;
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr int kMR = 6;
#else
constexpr int kMR = 4;
#endif
static_assert(kGemmColumnBlock % kNR == 0, "column blocks are whole panels");

inline int64_t gmin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t ground_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct GemmWorkspace {
  Scratch panel, panel2, tile, tile2, rows, partial, x_panels;
};

GemmWorkspace& gemm_workspace() {
  static thread_local GemmWorkspace w;
  return w;
}

// -- typed access ----------------------------------------------------------------------

template <typename T>
inline float element(const Operand& o, int64_t i, int64_t j) {
  return to_f32(static_cast<const T*>(o.data)[i * o.rs + j * o.cs]);
}

[[gnu::always_inline]] inline V load_typed(DType type, const void* base, int64_t offset, int c) {
  switch (type) {
    case DType::f32: {
      const float* p = static_cast<const float*>(base) + offset;
      return c == kLanes ? load(p) : load(p, c);
    }
    case DType::bf16: {
      const bf16* p = static_cast<const bf16*>(base) + offset;
      return c == kLanes ? load(p) : load(p, c);
    }
    case DType::f16: {
      const f16* p = static_cast<const f16*>(base) + offset;
      return c == kLanes ? load(p) : load(p, c);
    }
  }
  return zero();
}

[[gnu::always_inline]] inline void store_typed(DType type, void* base, int64_t offset, int c, V v) {
  switch (type) {
    case DType::f32: {
      float* p = static_cast<float*>(base) + offset;
      return c == kLanes ? store(p, v) : store(p, v, c);
    }
    case DType::bf16: {
      bf16* p = static_cast<bf16*>(base) + offset;
      return c == kLanes ? store(p, v) : store(p, v, c);
    }
    case DType::f16: {
      f16* p = static_cast<f16*>(base) + offset;
      return c == kLanes ? store(p, v) : store(p, v, c);
    }
  }
}

// -- packing ------------------------------------------------------------------------------

// B's columns [n, n + nr) as panel[k][kNR] (fp32, zero past nr).
template <typename T>
void pack_panel(const Operand& b, int64_t K, int64_t n, int64_t nr, float* panel) {
  const T* data = static_cast<const T*>(b.data);
  if (nr < kNR)
    for (int64_t k = 0; k < K; ++k) std::memset(panel + k * kNR + nr, 0, sizeof(float) * (kNR - nr));
  if (b.cs == 1) {  // rows of the panel are contiguous in B (dx = dz W, dW = dz^T x)
    for (int64_t k = 0; k < K; ++k) {
      const T* row = data + k * b.rs + n;
      float* dst = panel + k * kNR;
      int64_t j = 0;
      for (; j + kLanes <= nr; j += kLanes) store(dst + j, load(row + j));
      if (j < nr) store(dst + j, load(row + j, static_cast<int>(nr - j)), static_cast<int>(nr - j));
    }
  } else {  // columns contiguous along K (x W^T: the weight's rows)
    for (int64_t j = 0; j < nr; ++j) {
      const T* col = data + (n + j) * b.cs;
      for (int64_t k = 0; k < K; ++k) panel[k * kNR + j] = to_f32(col[k * b.rs]);
    }
  }
}

inline void pack(const Operand& b, int64_t K, int64_t n, int64_t nr, float* panel) {
  switch (b.type) {
    case DType::f32: return pack_panel<float>(b, K, n, nr, panel);
    case DType::bf16: return pack_panel<bf16>(b, K, n, nr, panel);
    case DType::f16: return pack_panel<f16>(b, K, n, nr, panel);
  }
}

// -- the micro-kernel ------------------------------------------------------------------------

// tile[R][kNR] = A rows [m, m + R) . panel, over K. K goes in blocks of
// kSumBlock, each summed from zero and then added to the tile: a block's sum
// plus the running total rounds less than one chain of K additions.
constexpr int64_t kSumBlock = 256;

// The blocked path's loop (block()): rows in chunks of kRowChunk, K in
// slices of kKSlice (whole blocks of kSumBlock, an even count: pairs).
constexpr int64_t kRowChunk = 96;
static_assert(kRowChunk == kGemmWeightRowChunk, "the weight-rows path's tasks are whole chunks");
constexpr int64_t kKSlice = 2 * kSumBlock;
static_assert(kRowChunk % 6 == 0 && kRowChunk % 4 == 0, "whole micro tiles a chunk");

template <typename T, int R, bool kIntoTile = false>
inline void micro(const Operand& a, int64_t m, int64_t K, const float* panel, float* tile) {
  const T* base = static_cast<const T*>(a.data) + m * a.rs;
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kSumBlock) {
    V acc[R][kNV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kNV; ++j) acc[r][j] = zero();
    const int64_t k1 = gmin(K, k0 + kSumBlock);
    for (int64_t k = k0; k < k1; ++k) {
      V bv[kNV];
      for (int j = 0; j < kNV; ++j) bv[j] = load(panel + k * kNR + j * kLanes);
      for (int r = 0; r < R; ++r) {
        const V ar = set1(to_f32(base[r * a.rs + k * a.cs]));
        for (int j = 0; j < kNV; ++j) acc[r][j] = fma(ar, bv[j], acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kNV; ++j) {
        float* out = tile + r * kNR + j * kLanes;
        store(out, k0 == 0 && !kIntoTile ? acc[r][j] : add(load(out), acc[r][j]));
      }
  }
}

template <typename T, bool kIntoTile>
void micro_rows(const Operand& a, int64_t m, int64_t rows, int64_t K, const float* panel,
                float* tile) {
  switch (rows) {
    case 6: if constexpr (kMR >= 6) return micro<T, 6, kIntoTile>(a, m, K, panel, tile); break;
    case 5: if constexpr (kMR >= 5) return micro<T, 5, kIntoTile>(a, m, K, panel, tile); break;
    case 4: return micro<T, 4, kIntoTile>(a, m, K, panel, tile);
    case 3: return micro<T, 3, kIntoTile>(a, m, K, panel, tile);
    case 2: return micro<T, 2, kIntoTile>(a, m, K, panel, tile);
    case 1: return micro<T, 1, kIntoTile>(a, m, K, panel, tile);
    default: break;
  }
}

// tile = (into ? tile + : ) A rows [m, m + rows) . panel over K.
template <bool kIntoTile = false>
inline void compute_tile(const Operand& a, int64_t m, int64_t rows, int64_t K, const float* panel,
                         float* tile) {
  switch (a.type) {
    case DType::f32: return micro_rows<float, kIntoTile>(a, m, rows, K, panel, tile);
    case DType::bf16: return micro_rows<bf16, kIntoTile>(a, m, rows, K, panel, tile);
    case DType::f16: return micro_rows<f16, kIntoTile>(a, m, rows, K, panel, tile);
  }
}

// A with its K index moved on by k (elements of A's type).
inline Operand skip_k(const Operand& a, int64_t k) {
  Operand o = a;
  const int64_t bytes = a.type == DType::f32 ? 4 : 2;
  o.data = static_cast<const char*>(a.data) + k * a.cs * bytes;
  return o;
}

// -- the epilogue ----------------------------------------------------------------------------

// Finishes C rows [m, m + rows) x columns [n, n + cols) from their fp32 tile
// (rows ld apart; tile2 for the two-product epilogues).
inline void finish(const GemmArgs& g, const float* tile, const float* tile2, int64_t ld, int64_t m,
                   int64_t rows, int64_t n, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int c = static_cast<int>(gmin(kLanes, cols - j));
      V z = c == kLanes ? load(tile + r * ld + j) : load(tile + r * ld + j, c);
      const int64_t at = (m + r) * g.ldo + n + j;
      if (g.epilogue == Epilogue::accumulate) {
        float* out = static_cast<float*>(g.out) + at;
        store_typed(DType::f32, out, 0, c, add(load_typed(DType::f32, out, 0, c), z));
        continue;
      }
      if (g.bias != nullptr) z = add(z, load_typed(g.bias_type, g.bias, n + j, c));
      V u = zero();
      if (two_products(g.epilogue)) {
        u = c == kLanes ? load(tile2 + r * ld + j) : load(tile2 + r * ld + j, c);
        if (g.bias2 != nullptr) u = add(u, load_typed(g.bias_type, g.bias2, n + j, c));
      }
      switch (g.epilogue) {
        case Epilogue::store:
          store_typed(g.out_type, g.out, at, c, activate(g.act, z));
          break;
        case Epilogue::swiglu:
          store_typed(g.out_type, g.out, at, c, mul(activate(Activation::silu, z), u));
          break;
        case Epilogue::grad_act: {
          const V gy = load_typed(g.grad_type, g.grad, (m + r) * g.ldg + n + j, c);
          store_typed(g.out_type, g.out, at, c, mul(gy, activate_derivative(g.act, z)));
          break;
        }
        case Epilogue::grad_swiglu: {
          const V gy = load_typed(g.grad_type, g.grad, (m + r) * g.ldg + n + j, c);
          V silu, derivative;
          silu_and_derivative(z, silu, derivative);
          store_typed(g.out_type, g.out, at, c, mul(mul(gy, u), derivative));
          store_typed(g.out_type, g.out2, at, c, mul(gy, silu));
          break;
        }
        case Epilogue::store_preact:
          store_typed(g.out_type, g.out, at, c, activate(g.act, z));
          store_typed(DType::f32, g.out2, at, c, z);
          break;
        case Epilogue::swiglu_preact:
          store_typed(g.out_type, g.out, at, c, mul(activate(Activation::silu, z), u));
          store_typed(DType::f32, g.out2, at, c, z);
          store_typed(DType::f32, g.out3, at, c, u);
          break;
        case Epilogue::accumulate:
          break;
      }
    }
  }
}

inline bool two_products(const GemmArgs& g) { return two_products(g.epilogue); }

#if defined(__AVX512BF16__)
// -- bf16 x bf16 on vdpbf16ps ------------------------------------------------------------------

// B's columns [n, n + nr) as pairs along K: panel[p][j] = (B[2p][n+j], B[2p+1][n+j]).
void pack_panel_pairs(const Operand& b, int64_t K, int64_t n, int64_t nr, uint32_t* panel) {
  const uint16_t* data = static_cast<const uint16_t*>(b.data);
  const int64_t KP = (K + 1) / 2;
  for (int64_t j = 0; j < kNR; ++j) {
    if (j >= nr) {
      for (int64_t p = 0; p < KP; ++p) panel[p * kNR + j] = 0;
      continue;
    }
    const uint16_t* col = data + (n + j) * b.cs;
    for (int64_t p = 0; p < KP; ++p) {
      const uint32_t lo = col[2 * p * b.rs];
      const uint32_t hi = 2 * p + 1 < K ? col[(2 * p + 1) * b.rs] : 0u;
      panel[p * kNR + j] = lo | (hi << 16);
    }
  }
}

// B's columns [n, n + nr) as pairs along K (pack_panel_pairs' layout; the
// vdpbf16ps and AMX paths alike), for
// B = W^T with W's rows contiguous (b.rs == 1): 16 rows of W x 16 pairs are
// loaded and transposed as 32-bit words. Pair rows [KP, KPpad) are zero;
// KPpad is a multiple of 16.
void pack_panel_pairs_rows(const Operand& b, int64_t K, int64_t n, int64_t nr, uint32_t* panel,
                           int64_t KPpad) {
  const uint16_t* data = static_cast<const uint16_t*>(b.data);
  for (int64_t j0 = 0; j0 < kNR; j0 += 16) {
    for (int64_t p0 = 0; p0 < KPpad; p0 += 16) {
      const int64_t k = 2 * p0, left = gmin(32, K - k);
      const __mmask32 mask = left <= 0 ? 0 : left >= 32 ? ~__mmask32{0}
                                                         : ((__mmask32{1} << left) - 1);
      V rows[16];
      for (int r = 0; r < 16; ++r)
        rows[r] = j0 + r < nr && mask != 0
                      ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(
                            mask, data + (n + j0 + r) * b.cs + k))
                      : zero();
      transpose16(rows);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(panel + (p0 + i) * kNR + j0, _mm512_castps_si512(rows[i]));
    }
  }
}

// The same panel for B with its rows contiguous along N (b.cs == 1: dX = dZ
// W, dW = dZ^T X): rows 2p and 2p + 1 interleaved 16 bits at a time.
void pack_panel_pairs_cols(const Operand& b, int64_t K, int64_t n, int64_t nr, uint32_t* panel,
                           int64_t KPpad) {
  const uint16_t* data = static_cast<const uint16_t*>(b.data);
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                          40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                          32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int64_t KP = (K + 1) / 2;
  for (int64_t p = 0; p < KPpad; ++p) {
    uint32_t* out = panel + p * kNR;
    if (p >= KP) {
      std::memset(out, 0, 4 * kNR);
      continue;
    }
    const uint16_t* r0 = data + 2 * p * b.rs + n;
    const uint16_t* r1 = 2 * p + 1 < K ? r0 + b.rs : nullptr;
    for (int64_t j = 0; j < kNR; j += 32) {
      const int64_t left = gmin(32, nr - j);
      const __mmask32 mask = left <= 0 ? 0 : left >= 32 ? ~__mmask32{0}
                                                         : ((__mmask32{1} << left) - 1);
      const __m512i x = _mm512_maskz_loadu_epi16(mask, r0 + j);
      const __m512i y = r1 != nullptr ? _mm512_maskz_loadu_epi16(mask, r1 + j) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + j, _mm512_permutex2var_epi16(x, lo_idx, y));
      _mm512_storeu_si512(out + j + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
    }
  }
}

// B's columns [n, n + nr) as a pair panel [KPpad][kNR] from any layout of B.
void pack_pairs(const Operand& b, int64_t K, int64_t n, int64_t nr, uint32_t* panel,
                int64_t KPpad) {
  if (b.rs == 1) {
    pack_panel_pairs_rows(b, K, n, nr, panel, KPpad);
  } else if (b.cs == 1) {
    pack_panel_pairs_cols(b, K, n, nr, panel, KPpad);
  } else {
    pack_panel_pairs(b, K, n, nr, panel);
    const int64_t KP = (K + 1) / 2;
    std::memset(panel + KP * kNR, 0, 4 * (KPpad - KP) * kNR);
  }
}

// tile[R][kNR] = A rows [m, m + R) . panel over K, A's rows bf16 with pairs
// contiguous (a.cs == 1).
template <int R, bool kIntoTile = false>
inline void micro_bf16(const Operand& a, int64_t m, int64_t K, const uint32_t* panel, float* tile) {
  const uint16_t* base = static_cast<const uint16_t*>(a.data) + m * a.rs;
  const int64_t KP = (K + 1) / 2, block = kSumBlock / 2;
  for (int64_t p0 = 0; p0 < KP || p0 == 0; p0 += block) {
    __m512 acc[R][kNV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kNV; ++j) acc[r][j] = _mm512_setzero_ps();
    const int64_t p1 = gmin(KP, p0 + block);
    for (int64_t p = p0; p < p1; ++p) {
      __m512bh bv[kNV];
      for (int j = 0; j < kNV; ++j)
        bv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * kNR + j * 16));
      for (int r = 0; r < R; ++r) {
        // The last pair of an odd K holds one element (the panel's other half is 0).
        uint32_t pair = base[r * a.rs + 2 * p];
        if (2 * p + 1 < K) std::memcpy(&pair, base + r * a.rs + 2 * p, 4);
        const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
        for (int j = 0; j < kNV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], ar, bv[j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kNV; ++j) {
        float* out = tile + r * kNR + j * kLanes;
        _mm512_storeu_ps(out, p0 == 0 && !kIntoTile ? acc[r][j]
                                                   : _mm512_add_ps(_mm512_loadu_ps(out), acc[r][j]));
      }
  }
}

inline void compute_tile_bf16(const Operand& a, int64_t m, int64_t rows, int64_t K,
                              const uint32_t* panel, float* tile, bool into = false) {
#define PYLLM_BF16_ROWS(R)                                                     \
  case R:                                                                      \
    return into ? micro_bf16<R, true>(a, m, K, panel, tile)                    \
                : micro_bf16<R, false>(a, m, K, panel, tile);
  switch (rows) {
    PYLLM_BF16_ROWS(6)
    PYLLM_BF16_ROWS(5)
    PYLLM_BF16_ROWS(4)
    PYLLM_BF16_ROWS(3)
    PYLLM_BF16_ROWS(2)
    PYLLM_BF16_ROWS(1)
    default: break;
  }
#undef PYLLM_BF16_ROWS
}
#endif

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
// -- bf16 x bf16 on AMX tiles ------------------------------------------------------------------
//
// A tile instruction multiplies A[16][32 bf16] by B[16 pairs][16 columns] into
// C[16][16] fp32. A 16 x kNR (64) block of C is four C tiles (tmm0-3); per 32
// of K it takes one A tile (tmm4: 16 rows of A) and four B tiles (tmm5-7,
// reused) from the vdpbf16ps panel (pairs along K, kNR columns a row: a B
// tile is 16 of its columns, rows 256 bytes apart). K goes in blocks of
// kSumBlock, each summed from zero in the tiles and added to the fp32 tile in
// memory, as micro() does; a row's sums do not depend on the other rows in
// its tile (padding rows are zero and their results dropped).
constexpr int64_t kAmxRows = 16, kAmxK = 32;
static_assert(kNR == 64, "four 16-column B tiles a panel");

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void amx_configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// tile[16][kNR] (fp32, rows kNR apart) = A rows [m, m + rows) . panel over K.
inline void amx_tile(const Operand& a, int64_t m, int64_t rows, int64_t K, const uint32_t* panel,
                     float* tile, uint16_t* edge) {
  const uint16_t* base = static_cast<const uint16_t*>(a.data) + m * a.rs;
  for (int64_t kb = 0; kb < K; kb += kSumBlock) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t ke = gmin(K, kb + kSumBlock);
    for (int64_t k = kb; k < ke; k += kAmxK) {
      if (rows == kAmxRows && k + kAmxK <= K) {
        _tile_loadd(4, base + k, a.rs * 2);
      } else {  // edge rows or the K tail: zero-padded copy
        const int64_t cols = gmin(kAmxK, K - k);
        for (int64_t r = 0; r < kAmxRows; ++r) {
          if (r < rows) {
            std::memcpy(edge + r * kAmxK, base + r * a.rs + k, 2 * cols);
            std::memset(edge + r * kAmxK + cols, 0, 2 * (kAmxK - cols));
          } else {
            std::memset(edge + r * kAmxK, 0, 2 * kAmxK);
          }
        }
        _tile_loadd(4, edge, 2 * kAmxK);
      }
      const uint32_t* b = panel + (k / 2) * kNR;
      _tile_loadd(5, b, kNR * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + 16, kNR * 4);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b + 32, kNR * 4);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 48, kNR * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
    float* out = kb == 0 ? tile : tile + kAmxRows * kNR;  // the second half: a block's sum
    _tile_stored(0, out, kNR * 4);
    _tile_stored(1, out + 16, kNR * 4);
    _tile_stored(2, out + 32, kNR * 4);
    _tile_stored(3, out + 48, kNR * 4);
    if (kb != 0)
      for (int64_t i = 0; i < kAmxRows * kNR; i += kLanes)
        store(tile + i, add(load(tile + i), load(out + i)));
  }
}

// block() on AMX: A bf16 with pairs contiguous (a.cs == 1), B and B2 bf16.
void block_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  GemmWorkspace& w = gemm_workspace();
  const bool two = two_products(g);
  const int64_t KPpad = ground_up((g.K + 1) / 2, 16);
  uint32_t* panel = reinterpret_cast<uint32_t*>(w.panel.get(KPpad * kNR));
  uint32_t* panel2 = two ? reinterpret_cast<uint32_t*>(w.panel2.get(KPpad * kNR)) : nullptr;
  float* tile = w.tile.get(2 * kAmxRows * kNR);
  float* tile2 = w.tile2.get(2 * kAmxRows * kNR);
  uint16_t* edge = reinterpret_cast<uint16_t*>(w.rows.get(kAmxRows * kAmxK / 2));
  amx_configure();
  for (int64_t n = n0; n < n1; n += kNR) {
    const int64_t nr = gmin(kNR, n1 - n);
    const uint32_t* p1 = panel;
    const uint32_t* p2 = panel2;
    if (g.packed != nullptr) {
      p1 = static_cast<const uint32_t*>(g.packed) + (n / kNR) * KPpad * kNR;
      if (two) p2 = static_cast<const uint32_t*>(g.packed2) + (n / kNR) * KPpad * kNR;
    } else {
      pack_pairs(g.b, g.K, n, nr, panel, KPpad);
      if (two) pack_pairs(g.b2, g.K, n, nr, panel2, KPpad);
    }
    for (int64_t m = m0; m < m1; m += kAmxRows) {
      const int64_t rows = gmin(kAmxRows, m1 - m);
      amx_tile(g.a, m, rows, g.K, p1, tile, edge);
      if (two) amx_tile(g.a, m, rows, g.K, p2, tile2, edge);
      finish(g, tile, tile2, kNR, m, rows, n, nr);
    }
  }
  _tile_release();
}
#endif

// The tiles of one row chunk: acc = A rows [r0, r1) . panel (and acc2 =
// A2 rows . panel2 with two products), micro tiles of kMR rows kNR apart
// from acc, over all of K in slices of kKSlice: a slice of the panels
// (64-128 KB) stays in L2 while every micro tile of the chunk uses it, where
// the whole panel (K x kNR, 1.4 MB at K = 5632 in fp32) would be read from
// further out once per micro tile. The sums are those of one pass over K
// (slices are whole blocks of kSumBlock, each summed from zero and added to
// the tile in order). Pairs: the panels hold bf16 pairs (vdpbf16ps).
[[gnu::always_inline]] inline void chunk_tiles(const Operand& a, const Operand& a2, int64_t r0, int64_t r1, int64_t K,
                        const float* panel, const float* panel2, [[maybe_unused]] bool pairs,
                        bool two, float* acc, float* acc2) {
  for (int64_t kb = 0; kb < K || kb == 0; kb += kKSlice) {
    const int64_t kc = gmin(kKSlice, K - kb);
    const Operand as = skip_k(a, kb), as2 = skip_k(a2, kb);
    for (int64_t r = r0; r < r1; r += kMR) {
      const int64_t rows = gmin(kMR, r1 - r);
      float* t = acc + (r - r0) * kNR;
      float* t2 = acc2 + (r - r0) * kNR;
#if defined(__AVX512BF16__)
      if (pairs) {
        const uint32_t* p = reinterpret_cast<const uint32_t*>(panel) + kb / 2 * kNR;
        compute_tile_bf16(as, r, rows, kc, p, t, kb > 0);
        if (two) {
          const uint32_t* p2 = reinterpret_cast<const uint32_t*>(panel2) + kb / 2 * kNR;
          compute_tile_bf16(as2, r, rows, kc, p2, t2, kb > 0);
        }
        continue;
      }
#endif
      if (kb == 0) {
        compute_tile(as, r, rows, kc, panel, t);
        if (two) compute_tile(as2, r, rows, kc, panel2, t2);
      } else {
        compute_tile<true>(as, r, rows, kc, panel + kb * kNR, t);
        if (two) compute_tile<true>(as2, r, rows, kc, panel2 + kb * kNR, t2);
      }
    }
  }
}

void block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  GemmWorkspace& w = gemm_workspace();
  const bool two = two_products(g);
  float* acc = w.tile.get(kRowChunk * kNR);
  float* acc2 = w.tile2.get(kRowChunk * kNR);
#if defined(__AVX512BF16__)
  const bool pairs = g.a.type == DType::bf16 && g.b.type == DType::bf16 && g.a.cs == 1 &&
                     (!two || g.b2.type == DType::bf16);
#else
  constexpr bool pairs = false;
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (pairs && g.use_amx) return block_amx(g, m0, m1, n0, n1);
#endif
  // Pairs: rows up to a multiple of 16 (the packers' 16 x 16 transposes).
  const int64_t KPpad = ground_up((g.K + 1) / 2, 16);
  const int64_t panel_floats = pairs ? KPpad * kNR : g.K * kNR;
  const bool packed = g.packed != nullptr;
  float* own = packed ? nullptr : w.panel.get(panel_floats);
  float* own2 = two && !packed ? w.panel2.get(panel_floats) : nullptr;
  for (int64_t n = n0; n < n1; n += kNR) {
    const int64_t nr = gmin(kNR, n1 - n);
    const float* panel = own;
    const float* panel2 = own2;
    if (packed) {
      panel = static_cast<const float*>(g.packed) + (n / kNR) * panel_floats;
      if (two) panel2 = static_cast<const float*>(g.packed2) + (n / kNR) * panel_floats;
    }
#if defined(__AVX512BF16__)
    else if (pairs) {
      pack_pairs(g.b, g.K, n, nr, reinterpret_cast<uint32_t*>(own), KPpad);
      if (two) pack_pairs(g.b2, g.K, n, nr, reinterpret_cast<uint32_t*>(own2), KPpad);
    }
#endif
    else {
      pack(g.b, g.K, n, nr, own);
      if (two) pack(g.b2, g.K, n, nr, own2);
    }
    // Rows in chunks of kRowChunk, K in slices of kKSlice (chunk_tiles).
    for (int64_t mc = m0; mc < m1; mc += kRowChunk) {
      const int64_t mc_end = gmin(m1, mc + kRowChunk);
      chunk_tiles(g.a, g.a, mc, mc_end, g.K, panel, panel2, pairs, two, acc, acc2);
      for (int64_t m = mc; m < mc_end; m += kMR)
        finish(g, acc + (m - mc) * kNR, acc2 + (m - mc) * kNR, kNR, m, gmin(kMR, mc_end - m), n,
               nr);
    }
  }
}

// -- the blocked path with the weight in place ----------------------------------------------
//
// x @ W^T computed as C^T = W . x^T: the weight's rows are the micro-kernel's
// A operand (read in place, an element or pair broadcast at a time) and x's
// rows are packed as the panels (x^T), once per call and thread, instead of
// every weight panel. Each output is block()'s sum, bit for bit: the same
// products in the same order (K in slices of kKSlice, blocks of kSumBlock
// from zero), the micro-kernel's rows being weight rows and its columns rows
// of x. The C^T tile is transposed back for finish(), so every epilogue
// (bias, activations, SwiGLU's second weight as a second A operand, the
// training outputs) runs unchanged. Output columns [n0, n1) of all M rows.
void block_weight_rows(const GemmArgs& g, int64_t n0, int64_t n1) {
  GemmWorkspace& w = gemm_workspace();
  const bool two = two_products(g);
  const int64_t M = g.M, K = g.K;
#if defined(__AVX512BF16__)
  const bool pairs = g.a.type == DType::bf16 && g.b.type == DType::bf16 &&
                     (!two || g.b2.type == DType::bf16);
#else
  constexpr bool pairs = false;
#endif
  // x^T as the panels' operand (k, m), the weights as A operands (n, k).
  const Operand xt{g.a.data, g.a.cs, g.a.rs, g.a.type};
  const Operand wa{g.b.data, g.b.cs, g.b.rs, g.b.type};
  const Operand wa2{g.b2.data, g.b2.cs, g.b2.rs, g.b2.type};
  const int64_t KPpad = ground_up((K + 1) / 2, 16);
  const int64_t panel_floats = pairs ? KPpad * kNR : K * kNR;
  const int64_t panels = (M + kNR - 1) / kNR;
  float* xp = w.x_panels.get(panels * panel_floats);
  for (int64_t i = 0; i < panels; ++i) {
    float* panel = xp + i * panel_floats;
    const int64_t mr = gmin(kNR, M - i * kNR);
#if defined(__AVX512BF16__)
    if (pairs) {
      pack_pairs(xt, K, i * kNR, mr, reinterpret_cast<uint32_t*>(panel), KPpad);
      continue;
    }
#endif
    pack(xt, K, i * kNR, mr, panel);
  }
  float* acc = w.tile.get(kRowChunk * kNR);
  float* acc2 = w.tile2.get(kRowChunk * kNR);
  float* out = w.panel.get(kNR * kRowChunk);  // the tiles as C: [m][n], kRowChunk apart
  float* out2 = w.panel2.get(kNR * kRowChunk);
  for (int64_t nc = n0; nc < n1; nc += kRowChunk) {
    const int64_t nn = gmin(kRowChunk, n1 - nc);
    for (int64_t i = 0; i < panels; ++i) {
      const float* panel = xp + i * panel_floats;
      const int64_t mi = i * kNR, mr = gmin(kNR, M - mi);
      chunk_tiles(wa, wa2, nc, nc + nn, K, panel, panel, pairs, two, acc, acc2);
      for (int64_t r = 0; r < nn; ++r)
        for (int64_t j = 0; j < mr; ++j) {
          out[j * kRowChunk + r] = acc[r * kNR + j];
          if (two) out2[j * kRowChunk + r] = acc2[r * kNR + j];
        }
      finish(g, out, out2, kRowChunk, mi, mr, nc, nn);
    }
  }
}

// -- the skinny path -----------------------------------------------------------------------

// kLanes output columns at a time: each W row streams once through L1 in
// blocks of kSkinnyBlock, every row of x uses it, and the kLanes partial dot
// products of a row of x are reduced together at the end.
constexpr int64_t kSkinnyBlock = 256;

#if defined(__AVX512F__)
// The skinny path for 2..16 rows: per kNR output columns and K-slice of
// kSkinnyBlock, the weight rows are transposed (16 x 16 blocks in registers)
// into a panel that stays in L1, and every row of x uses it through the
// micro-kernel's broadcasts, so each weight element is loaded once.
template <typename T>
void skinny_panel(const GemmArgs& g, int64_t n0, int64_t n1) {
  GemmWorkspace& w = gemm_workspace();
  const int64_t M = g.M, K = g.K;
  const bool two = two_products(g);
  const bool packed = g.packed != nullptr;
  float* panel = packed ? nullptr : w.panel.get(kSkinnyBlock * kNR);
  float* tile = w.tile.get(kGemmSkinnyRows * kNR);
  float* tile2 = w.tile2.get(kGemmSkinnyRows * kNR);
  // A pre-packed weight: panel n / kNR of g.packed, K-slice k0 at row k0 (fp32)
  // or pair row k0 / 2 (bf16 pairs).
  [[maybe_unused]] const int64_t KPpad = ground_up((K + 1) / 2, 16);
  for (int64_t n = n0; n < n1; n += kNR) {
    const int64_t nr = gmin(kNR, n1 - n);
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      const Operand& b = half == 0 ? g.b : g.b2;
      float* out = half == 0 ? tile : tile2;
      const T* weights = static_cast<const T*>(b.data);
      for (int64_t k0 = 0; k0 < K; k0 += kSkinnyBlock) {
        const int64_t kc = gmin(kSkinnyBlock, K - k0);
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, bf16>) {
          // Pairs of bf16 (one 32-bit lane each) transposed like floats,
          // into the vdpbf16ps panel layout [pair][kNR].
          const uint32_t* pairs = reinterpret_cast<const uint32_t*>(panel);
          if (packed)
            pairs = static_cast<const uint32_t*>(half == 0 ? g.packed : g.packed2) +
                    ((n / kNR) * KPpad + k0 / 2) * kNR;
          for (int64_t j0 = 0; j0 < kNR && !packed; j0 += 16) {
            for (int64_t k = 0; k < kc; k += 32) {  // 16 pairs of 16 rows
              const int64_t left = gmin(32, kc - k);
              const __mmask32 mask = left == 32 ? ~__mmask32{0} : ((__mmask32{1} << left) - 1);
              V block[16];
              for (int r = 0; r < 16; ++r) {
                if (j0 + r < nr) {
                  const T* row = weights + (n + j0 + r) * b.cs + k0 + k;
                  // Into L2, as below.
                  if (k0 + k + kSkinnyBlock < K) __builtin_prefetch(row + kSkinnyBlock, 0, 2);
                  block[r] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, row));
                } else {
                  block[r] = zero();
                }
              }
              transpose16(block);
              for (int64_t p = 0; p < (left + 1) / 2; ++p)
                _mm512_storeu_si512(reinterpret_cast<uint32_t*>(panel) + (k / 2 + p) * kNR + j0,
                                    _mm512_castps_si512(block[p]));
            }
          }
          Operand slice = g.a;
          slice.data = static_cast<const T*>(g.a.data) + k0;
          for (int64_t m = 0; m < M; m += kMR) {
            const int64_t rows = gmin(kMR, M - m);
            float* t = out + m * kNR;
            const bool first = k0 == 0;
#define PYLLM_SKINNY_ROWS(R)                                                   \
  case R:                                                                      \
    first ? micro_bf16<R, false>(slice, m, kc, pairs, t)                        \
          : micro_bf16<R, true>(slice, m, kc, pairs, t);                        \
    break;
            switch (rows) {
              PYLLM_SKINNY_ROWS(6)
              PYLLM_SKINNY_ROWS(5)
              PYLLM_SKINNY_ROWS(4)
              PYLLM_SKINNY_ROWS(3)
              PYLLM_SKINNY_ROWS(2)
              PYLLM_SKINNY_ROWS(1)
              default: break;
            }
#undef PYLLM_SKINNY_ROWS
          }
          continue;
        }
#endif
        const float* slice_panel = panel;
        if (packed)
          slice_panel = static_cast<const float*>(half == 0 ? g.packed : g.packed2) +
                        ((n / kNR) * K + k0) * kNR;
        for (int64_t j0 = 0; j0 < kNR && !packed; j0 += 16) {  // 16 weight rows
          for (int64_t k = 0; k < kc; k += 16) {                // 16 of their columns
            const int c = static_cast<int>(gmin(16, kc - k));
            V block[16];
            for (int r = 0; r < 16; ++r) {
              if (j0 + r < nr) {
                const T* row = weights + (n + j0 + r) * b.cs + k0 + k;
                // Sixteen rows stream at once, more than the hardware
                // prefetchers follow: request the next K-slice's line now,
                // into L2 (prefetcht1): rows 4 KiB apart share an L1 set,
                // and sixteen lines prefetched into it evicted each other
                // (bf16 4096^2 at 2 rows: 1.7 -> 0.9 ms).
                if (k0 + k + kSkinnyBlock < K) __builtin_prefetch(row + kSkinnyBlock, 0, 2);
                block[r] = c == 16 ? load(row) : load(row, c);
              } else {
                block[r] = zero();
              }
            }
            transpose16(block);
            for (int r = 0; r < c; ++r) store(panel + (k + r) * kNR + j0, block[r]);
          }
        }
        Operand slice = g.a;
        slice.data = static_cast<const T*>(g.a.data) + k0;
        for (int64_t m = 0; m < M; m += kMR) {
          const int64_t rows = gmin(kMR, M - m);
          float* t = out + m * kNR;
          const bool first = k0 == 0;
#define PYLLM_SKINNY_ROWS(R)                                                   \
  case R:                                                                      \
    first ? micro<T, R, false>(slice, m, kc, slice_panel, t)                    \
          : micro<T, R, true>(slice, m, kc, slice_panel, t);                    \
    break;
          switch (rows) {
            PYLLM_SKINNY_ROWS(6)
            PYLLM_SKINNY_ROWS(5)
            PYLLM_SKINNY_ROWS(4)
            PYLLM_SKINNY_ROWS(3)
            PYLLM_SKINNY_ROWS(2)
            PYLLM_SKINNY_ROWS(1)
            default: break;
          }
#undef PYLLM_SKINNY_ROWS
        }
      }
    }
    finish(g, tile, tile2, kNR, 0, M, n, nr);
  }
}

// The skinny path for 2..16 rows of an unpacked fp32 weight, or a bf16 one on
// AVX512-BF16, without transposing it: x's rows lie across the lanes (x^T,
// one lane per row of x, made once per call) and each weight element (bf16:
// pair) is broadcast straight from its row against them (an FMA's or
// vdpbf16ps's broadcast memory operand). Sixteen weight rows stream side by
// side, one accumulator each. Every output is skinny_panel's sum, bit for
// bit: the same products (x * w = w * x) in the same order, K-slices of
// kSkinnyBlock each from zero and added in order; a lane is a row of x where
// skinny_panel's lane is a column of W. L lanes: 16, or 8 (ymm) for bf16 with
// at most 8 rows of x.
template <typename T, int L>
struct RowLanes;

template <>
struct RowLanes<float, 16> {
  using R = __m512;
  using X = float;  // one x element per lane and step
  static constexpr int kStep = 1;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const X* x) { return _mm512_load_ps(x); }
  static void store(float* p, R v) { _mm512_store_ps(p, v); }
  static R load_sum(const float* p) { return _mm512_load_ps(p); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R step(R acc, R x, const float* w) { return _mm512_fmadd_ps(x, _mm512_set1_ps(*w), acc); }
};

#if defined(__AVX512BF16__)
inline uint32_t bf16_pair(const bf16* w) {
  uint32_t pair;
  std::memcpy(&pair, w, 4);
  return pair;
}
inline uint32_t bf16_half_pair(const bf16* w) {  // an odd K's last pair: the other half 0
  uint16_t one;
  std::memcpy(&one, w, 2);
  return one;
}

template <>
struct RowLanes<bf16, 16> {
  using R = __m512;
  using X = uint32_t;  // a pair of x's bf16 per lane and step
  static constexpr int kStep = 2;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const X* x) { return _mm512_castsi512_ps(_mm512_load_si512(x)); }
  static void store(float* p, R v) { _mm512_store_ps(p, v); }
  static R load_sum(const float* p) { return _mm512_load_ps(p); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R dp(R acc, R x, uint32_t pair) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(x),
                            reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair))));
  }
  static R step(R acc, R x, const bf16* w) { return dp(acc, x, bf16_pair(w)); }
};

template <>
struct RowLanes<bf16, 8> {
  using R = __m256;
  using X = uint32_t;
  static constexpr int kStep = 2;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const X* x) { return _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(x))); }
  static void store(float* p, R v) { _mm256_store_ps(p, v); }
  static R load_sum(const float* p) { return _mm256_load_ps(p); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R dp(R acc, R x, uint32_t pair) {
    return _mm256_dpbf16_ps(acc, reinterpret_cast<__m256bh>(x),
                            reinterpret_cast<__m256bh>(_mm256_set1_epi32(static_cast<int>(pair))));
  }
  static R step(R acc, R x, const bf16* w) { return dp(acc, x, bf16_pair(w)); }
};
#endif

// x^T for skinny_rows: xt[s][l] = step s of row l of x (fp32: x[l][s]; bf16:
// the pair x[l][2s], x[l][2s + 1], its upper half 0 past K), zero for l >= M.
template <typename T, int L>
void transpose_rows(const GemmArgs& g, typename RowLanes<T, L>::X* xt) {
  using X = typename RowLanes<T, L>::X;
  constexpr int64_t S = RowLanes<T, L>::kStep;
  const int64_t M = g.M, K = g.K, steps = (K + S - 1) / S;
  const T* x = static_cast<const T*>(g.a.data);
  int64_t s0 = 0;
  // 16 steps of 16 rows through the registers (32-bit elements: floats or pairs).
  for (; (s0 + 16) * S <= K; s0 += 16) {
    V block[16];
    for (int r = 0; r < 16; ++r)
      block[r] = r < M ? _mm512_castsi512_ps(_mm512_loadu_si512(x + r * g.a.rs + s0 * S)) : zero();
    transpose16(block);
    for (int s = 0; s < 16; ++s) {
      if constexpr (L == 16) _mm512_store_ps(reinterpret_cast<float*>(xt + (s0 + s) * L), block[s]);
      else _mm256_store_ps(reinterpret_cast<float*>(xt + (s0 + s) * L), _mm512_castps512_ps256(block[s]));
    }
  }
  for (; s0 < steps; ++s0) {
    for (int64_t l = 0; l < L; ++l) {
      X v{};
      if (l < M) {
        const T* at = x + l * g.a.rs + s0 * S;
        if constexpr (S == 2) v = s0 * S + 1 < K ? bf16_pair(at) : bf16_half_pair(at);
        else v = *at;
      }
      xt[s0 * L + l] = v;
    }
  }
}

template <typename T, int L>
void skinny_rows(const GemmArgs& g, int64_t n0, int64_t n1) {
  using Lanes = RowLanes<T, L>;
  using R = typename Lanes::R;
  using X = typename Lanes::X;
  constexpr int64_t S = Lanes::kStep;
  GemmWorkspace& w = gemm_workspace();
  const int64_t M = g.M, K = g.K, steps = (K + S - 1) / S;
  X* xt = reinterpret_cast<X*>(w.rows.get(steps * L));
  transpose_rows<T, L>(g, xt);
  const bool two = two_products(g);
  float* tile = w.tile.get(kGemmSkinnyRows * kNR);
  float* tile2 = w.tile2.get(kGemmSkinnyRows * kNR);
  alignas(64) float sums[16][L];
  // 128 bytes of each of the 16 rows at a time, rows 192 bytes apart.
  constexpr int64_t kChunk = 128 / sizeof(T), kStageLd = 192 / sizeof(T);
  T* stage = reinterpret_cast<T*>(w.panel.get(16 * 192 / 4));
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t n = n0; n < n1; n += kNR) {
    const int64_t nr = gmin(kNR, n1 - n);
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      const Operand& b = half == 0 ? g.b : g.b2;
      const T* weights = static_cast<const T*>(b.data);
      float* out = half == 0 ? tile : tile2;
      for (int64_t j0 = 0; j0 < nr; j0 += 16) {
        const T* rows[16];
        for (int r = 0; r < 16; ++r)
          rows[r] = weights + (n + gmin(j0 + r, nr - 1)) * b.cs;  // past nr: a real row, dropped
        for (int64_t k0 = 0; k0 < K; k0 += kSkinnyBlock) {
          const int64_t k1 = gmin(K, k0 + kSkinnyBlock);
          // Sixteen rows stream at once, more than the hardware prefetchers
          // follow: request the next slice's lines now, into L2 (see
          // skinny_panel).
          for (int r = 0; r < 16; ++r)
            for (int64_t k = k1; k < gmin(K, k1 + kSkinnyBlock); k += kLine)
              __builtin_prefetch(rows[r] + k, 0, 2);
          R acc[16];
          for (int r = 0; r < 16; ++r) acc[r] = Lanes::zero();
          for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
            // The rows' next 128 bytes copied side by side first: 16 rows a
            // multiple of 4 KiB apart (any power-of-two K) share one L1 set,
            // and broadcasting from them in place evicts each line before
            // its last use.
            const int64_t bytes = (gmin(k1, c0 + kChunk) - c0) * int64_t{sizeof(T)};
            if (bytes == 128) {
              for (int r = 0; r < 16; ++r) {
                const char* src = reinterpret_cast<const char*>(rows[r] + c0);
                char* dst = reinterpret_cast<char*>(stage + r * kStageLd);
                _mm512_store_si512(dst, _mm512_loadu_si512(src));
                _mm512_store_si512(dst + 64, _mm512_loadu_si512(src + 64));
              }
            } else {
              const __mmask64 lo = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
              const __mmask64 hi = bytes <= 64 ? 0 : (__mmask64{1} << (bytes - 64)) - 1;
              for (int r = 0; r < 16; ++r) {
                const char* src = reinterpret_cast<const char*>(rows[r] + c0);
                char* dst = reinterpret_cast<char*>(stage + r * kStageLd);
                _mm512_store_si512(dst, _mm512_maskz_loadu_epi8(lo, src));
                _mm512_store_si512(dst + 64, _mm512_maskz_loadu_epi8(hi, src + 64));
              }
            }
            // Whole steps; an odd K's last pair reads the zero the masked
            // copy put past the row's end.
            const int64_t s1 = (c0 + bytes / int64_t{sizeof(T)} + S - 1) / S;
            for (int64_t s = c0 / S; s < s1; ++s) {
              const R xv = Lanes::load(xt + s * L);
              const int64_t at = s * S - c0;
              for (int r = 0; r < 16; ++r) acc[r] = Lanes::step(acc[r], xv, stage + r * kStageLd + at);
            }
          }
          for (int r = 0; r < 16; ++r)
            Lanes::store(sums[r], k0 == 0 ? acc[r] : Lanes::add(Lanes::load_sum(sums[r]), acc[r]));
        }
        for (int64_t r = 0; r < gmin(16, nr - j0); ++r)
          for (int64_t m = 0; m < M; ++m) out[m * kNR + j0 + r] = sums[r][m];
      }
    }
    finish(g, tile, tile2, kNR, 0, M, n, nr);
  }
}
#endif

// One row of x (decoding): the weight rows are read whole, one after the
// other, so each thread streams one contiguous region of W in memory order
// (the hardware prefetcher's best case); x (K floats) stays in L1.
constexpr int kGemvRows = kLanes < 8 ? kLanes : 8;  // rows streamed at once
template <typename T>
void gemv(const GemmArgs& g, int64_t n0, int64_t n1) {
  GemmWorkspace& w = gemm_workspace();
  const int64_t K = g.K;
  float* x = w.rows.get(ground_up(K, kLanes));
  for (int64_t k = 0; k < K; k += kLanes) {
    const int c = static_cast<int>(gmin(kLanes, K - k));
    store(x + k, load_typed(g.a.type, g.a.data, k, c));
  }
  const bool two = two_products(g);
  float* sums = w.tile.get(2 * kLanes);
  for (int64_t n = n0; n < n1; n += kLanes) {
    const int64_t cols = gmin(kLanes, n1 - n);
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      const T* weights = static_cast<const T*>(half == 0 ? g.b.data : g.b2.data);
      V parts[kLanes];
      // kGemvRows rows at a time: several streams in flight keep more of memory's
      // bandwidth busy than one row after another (a bf16 GEMV went from
      // 17 to 24.5 GB/s from memory on 2 cores, PyTorch 22).
      for (int j0 = 0; j0 < kLanes; j0 += kGemvRows) {
        const T* rows[kGemvRows];
        for (int r = 0; r < kGemvRows; ++r)
          rows[r] = weights + (n + gmin(j0 + r, cols - 1)) * g.b.cs;  // past cols: a real row, dropped
        V a0[kGemvRows], a1[kGemvRows];
        for (int r = 0; r < kGemvRows; ++r) a0[r] = a1[r] = zero();
        int64_t k = 0;
        for (; k + 2 * kLanes <= K; k += 2 * kLanes) {
          const V x0 = load(x + k), x1 = load(x + k + kLanes);
          for (int r = 0; r < kGemvRows; ++r) {
            a0[r] = fma(x0, load(rows[r] + k), a0[r]);
            a1[r] = fma(x1, load(rows[r] + k + kLanes), a1[r]);
          }
        }
        for (; k < K; k += kLanes) {
          const int c = static_cast<int>(gmin(kLanes, K - k));
          const V x0 = load(x + k, c);
          for (int r = 0; r < kGemvRows; ++r) a0[r] = fma(x0, load(rows[r] + k, c), a0[r]);
        }
        for (int r = 0; r < kGemvRows; ++r) parts[j0 + r] = j0 + r < cols ? add(a0[r], a1[r]) : zero();
      }
      store(sums + half * kLanes, reduce_add_lanes(parts));
    }
    finish(g, sums, sums + kLanes, kLanes, 0, 1, n, cols);
  }
}

template <typename T>
void skinny(const GemmArgs& g, int64_t n0, int64_t n1) {
  GemmWorkspace& w = gemm_workspace();
  const int64_t M = g.M, K = g.K, Kp = ground_up(K, kLanes);
  float* x = w.rows.get(M * Kp);  // A's rows as fp32, zero-padded to Kp
  for (int64_t m = 0; m < M; ++m) {
    float* dst = x + m * Kp;
    for (int64_t k = 0; k < K; k += kLanes) {
      const int c = static_cast<int>(gmin(kLanes, K - k));
      store(dst + k, load_typed(g.a.type, g.a.data, m * g.a.rs + k, c));
    }
    for (int64_t k = K; k < Kp; ++k) dst[k] = 0.f;
  }
  const bool two = two_products(g);
  float* partial = w.partial.get((two ? 2 : 1) * M * kLanes * kLanes);
  float* sums = w.tile.get(2 * M * kLanes);
  const T* b = static_cast<const T*>(g.b.data);
  const T* b2 = two ? static_cast<const T*>(g.b2.data) : nullptr;
  for (int64_t n = n0; n < n1; n += kLanes) {
    const int64_t cols = gmin(kLanes, n1 - n);
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      const T* weights = half == 0 ? b : b2;
      const T* row[kLanes];
      for (int j = 0; j < kLanes; ++j) row[j] = weights + (n + gmin(j, cols - 1)) * g.b.cs;
      float* part = partial + half * M * kLanes * kLanes;
      for (int64_t i = 0; i < M * kLanes * kLanes; ++i) part[i] = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += kSkinnyBlock) {
        const int64_t k1 = gmin(K, k0 + kSkinnyBlock);
        for (int j = 0; j < kLanes; ++j)
          for (int64_t k = k1; k < gmin(K, k1 + kSkinnyBlock); k += 64 / sizeof(T))
            __builtin_prefetch(row[j] + k, 0, 3);
        for (int64_t m = 0; m < M; ++m) {
          V acc[kLanes];
          float* pm = part + m * kLanes * kLanes;
          for (int j = 0; j < kLanes; ++j) acc[j] = load(pm + j * kLanes);
          const float* xm = x + m * Kp;
          int64_t k = k0;
          for (; k + kLanes <= k1; k += kLanes) {
            const V xv = load(xm + k);
            for (int j = 0; j < kLanes; ++j) acc[j] = fma(xv, load(row[j] + k), acc[j]);
          }
          if (k < k1) {
            const int c = static_cast<int>(k1 - k);
            const V xv = load(xm + k);  // zero past K
            for (int j = 0; j < kLanes; ++j) acc[j] = fma(xv, load(row[j] + k, c), acc[j]);
          }
          for (int j = 0; j < kLanes; ++j) store(pm + j * kLanes, acc[j]);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        V parts[kLanes];
        for (int j = 0; j < kLanes; ++j) parts[j] = load(part + (m * kLanes + j) * kLanes);
        store(sums + (half * M + m) * kLanes, reduce_add_lanes(parts));
      }
    }
    finish(g, sums, sums + M * kLanes, kLanes, 0, M, n, cols);
  }
}

}  // namespace

void gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  block(g, m0, m1, n0, n1);
}

void gemm_block_weight_rows(const GemmArgs& g, int64_t n0, int64_t n1) {
  block_weight_rows(g, n0, n1);
}

void gemm_epilogue(const GemmArgs& g, const float* c, const float* c2, int64_t m0, int64_t m1) {
  if (m0 >= m1 || g.N == 0) return;
  finish(g, c + m0 * g.N, c2 != nullptr ? c2 + m0 * g.N : nullptr, g.N, m0, m1 - m0, 0, g.N);
}

template <typename S, typename D>
void transpose_as(const S* src, int64_t rows, int64_t ld, int64_t r0, int64_t r1, int64_t c0,
                  int64_t c1, D* dst) {
  int64_t rb = r0;
#if defined(__AVX512F__)
  // 16 x 16 blocks through the registers (element by element, every store
  // went to another row of dst).
  for (; rb + kLanes <= r1; rb += kLanes) {
    int64_t c = c0;
    for (; c + kLanes <= c1; c += kLanes) {
      V block[kLanes];
      for (int i = 0; i < kLanes; ++i) block[i] = load(src + (rb + i) * ld + c);
      transpose16(block);
      for (int i = 0; i < kLanes; ++i) store(dst + (c + i) * rows + rb, block[i]);
    }
    for (; c < c1; ++c)
      for (int64_t r = rb; r < rb + kLanes; ++r) dst[c * rows + r] = from_f32<D>(to_f32(src[r * ld + c]));
  }
#endif
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = rb; r < r1; ++r) dst[c * rows + r] = from_f32<D>(to_f32(src[r * ld + c]));
}

void transpose(const void* src, DType src_type, int64_t rows, int64_t ld, int64_t r0, int64_t r1,
               int64_t c0, int64_t c1, DType dst_type, void* dst) {
  if (src_type == DType::f32 && dst_type == DType::bf16)
    return transpose_as(static_cast<const float*>(src), rows, ld, r0, r1, c0, c1, static_cast<bf16*>(dst));
  switch (src_type) {  // else the same type (the caller's contract)
    case DType::f32:
      return transpose_as(static_cast<const float*>(src), rows, ld, r0, r1, c0, c1, static_cast<float*>(dst));
    case DType::bf16:
      return transpose_as(static_cast<const bf16*>(src), rows, ld, r0, r1, c0, c1, static_cast<bf16*>(dst));
    case DType::f16:
      return transpose_as(static_cast<const f16*>(src), rows, ld, r0, r1, c0, c1, static_cast<f16*>(dst));
  }
}

int64_t gemm_panel_width() { return kNR; }

void gemm_pack_panel(const Operand& b, int64_t K, int64_t n, int64_t nr, bool pairs, void* panel) {
#if defined(__AVX512BF16__)
  if (pairs) return pack_pairs(b, K, n, nr, static_cast<uint32_t*>(panel), ground_up((K + 1) / 2, 16));
#endif
  (void)pairs;  // never asked for below avx512_bf16 (linear.cpp)
  pack(b, K, n, nr, static_cast<float*>(panel));
}

void gemm_skinny(const GemmArgs& g, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  // x and W share a dtype here (checked by the operator). skinny_panel sums
  // each output exactly as block() does (K-slices of kSumBlock, each from
  // zero, added to the tile), so it also serves one row when the blocked
  // order is asked for.
  // A pre-packed weight takes this path for every M (run() sends it here on
  // AVX-512 only): its panels are what skinny_panel would transpose.
  if (g.M >= 2 || g.blocked_order || g.packed != nullptr) {
    // An unpacked weight read in place (skinny_rows) where x's rows fill
    // most of its lanes: its vdpbf16ps or FMA count does not shrink with M
    // as skinny_panel's does, whose transposing costs the same at any M.
    // Measured on Zen 4 (4096 x 4096, 2 threads, interleaved): bf16 7-16
    // rows run faster read in place (16 rows: 1.77 against 2.28 ms; 8 rows:
    // 1.21 against 1.38), fp32 from 14 rows (16: 4.45 against 4.73 ms; 9-12
    // rows faster transposed).
    const bool unpacked = g.packed == nullptr;
#if defined(__AVX512BF16__)
    if (unpacked && g.b.type == DType::bf16 && g.M >= 7)
      return g.M <= 8 ? skinny_rows<bf16, 8>(g, n0, n1) : skinny_rows<bf16, 16>(g, n0, n1);
#endif
    if (unpacked && g.b.type == DType::f32 && g.M >= 14) return skinny_rows<float, 16>(g, n0, n1);
    switch (g.b.type) {
      case DType::f32: return skinny_panel<float>(g, n0, n1);
      case DType::bf16: return skinny_panel<bf16>(g, n0, n1);
      case DType::f16: return skinny_panel<f16>(g, n0, n1);
    }
  }
#endif
  if (g.M == 1) {
    switch (g.b.type) {
      case DType::f32: return gemv<float>(g, n0, n1);
      case DType::bf16: return gemv<bf16>(g, n0, n1);
      case DType::f16: return gemv<f16>(g, n0, n1);
    }
  }
  switch (g.b.type) {
    case DType::f32: return skinny<float>(g, n0, n1);
    case DType::bf16: return skinny<bf16>(g, n0, n1);
    case DType::f16: return skinny<f16>(g, n0, n1);
  }
}

}  // namespace pyllm::cpu::PYLLM_ISA
