// Building blocks of pyllm's CUDA attention kernels
// (attention_forward_kernel.cu, attention_backward_kernel.cu): tile shapes,
// warp-level tensor-core products on shared-memory tiles, tile loads, and
// the per-call configuration. Device code only; included by those two files.
#pragma once

#include <algorithm>
#include <cstring>

#include "attention_kernel.h"
#include "element.h"
#include "ptx.h"

namespace pyllm::cuda::attention_detail {


constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();
constexpr int kWarps = 4;  // per CTA, 16 query (or key) rows each
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA (16 per warp)
// Occupancy the main kernels are compiled for: two CTAs of 128 threads per SM
// leave up to 255 registers per thread (without it ptxas chose 128 for some
// tiles and spilled).
constexpr int kMinCtasPerSm = 2;

template <int D_, int BN_>
struct Tile {
  static constexpr int D = D_;          // padded head_dim
  static constexpr int BN = BN_;        // keys per tile
  static constexpr int ROW = D + 8;     // shared-memory row, padded by 16 bytes
  static constexpr int FORWARD_SHARED = (kBlockM + 4 * BN) * ROW * 2;  // Q + 2 x (K, V)
};

// ---- tensor-core building blocks (one warp) ---------------------------------

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  uint16_t ua, ub;
  std::memcpy(&ua, &a, 2);
  std::memcpy(&ub, &b, 2);
  return ua | static_cast<uint32_t>(ub) << 16;
}

// acc[NT] (a 16 x 8*NT fp32 tile) += A (16 x 16*KS, rows of `a` ROW apart)
// times B^T, B being 8*NT rows of 16*KS (rows of `b` ROW apart): both
// operands k-contiguous in shared memory.
template <class T, int NT, int KS, int ROW>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a, const T* b) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * ROW + 16 * ks + (lane / 16) * 8);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (8 * j + lane % 8 + (lane / 16) * 8) * ROW + 16 * ks + ((lane / 8) % 2) * 8);
      const uint32_t lo[2] = {bf[0], bf[1]}, hi[2] = {bf[2], bf[3]};
      mma_16816<T>(acc[j], af, lo);
      mma_16816<T>(acc[j + 1], af, hi);
    }
  }
}

// acc[NT] += A (16 x 16*KS, from registers) times B (16*KS x 8*NT, row-major
// in shared memory: rows of `b` ROW apart, n contiguous).
template <class T, int NT, int KS, int ROW>
__device__ __forceinline__ void mma_ab(float (&acc)[NT][4], const uint32_t (&a)[KS][4],
                                       const T* b) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (16 * ks + lane % 8 + ((lane / 8) % 2) * 8) * ROW + 8 * j +
                                (lane / 16) * 8);
      const uint32_t lo[2] = {bf[0], bf[1]}, hi[2] = {bf[2], bf[3]};
      mma_16816<T>(acc[j], a[ks], lo);
      mma_16816<T>(acc[j + 1], a[ks], hi);
    }
}

// The accumulator tile c (16 x 8*NT) as A fragments of a 16 x 8*NT operand.
template <class T, int NT>
__device__ __forceinline__ void to_a_fragments(const float (&c)[NT][4], uint32_t (&a)[NT / 2][4]) {
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    a[ks][0] = pack2<T>(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = pack2<T>(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = pack2<T>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = pack2<T>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

// Sum over the four lanes that share an accumulator row.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

// ---- tiles from global memory --------------------------------------------------

// Where row r of a tile comes from: base + (r / div) * outer + (r % div) *
// inner for r < valid, zeros beyond. Consecutive tokens: div > every r,
// inner = the token stride. The decode path's (head, query) rows: div =
// len_q, outer = the head stride.
// Paged rows (table not null): row r is token first + r of a sequence whose
// pages are listed in table, base + table[(first + r) / page_size] *
// page_stride + ((first + r) % page_size) * inner.
template <class T>
struct RowMap {
  const T* base;
  int valid;
  int div;
  int64_t outer, inner;
  const int32_t* table = nullptr;
  int64_t page_size = 1, page_stride = 0, first = 0;
  __device__ __forceinline__ const T* row(int r) const {
    if (table != nullptr) {
      const int64_t token = first + r;
      return base + static_cast<int64_t>(table[token / page_size]) * page_stride +
             (token % page_size) * inner;
    }
    return base + static_cast<int64_t>(r / div) * outer + static_cast<int64_t>(r % div) * inner;
  }
  // The map of the rows from row `rows` on (consecutive tokens only).
  __device__ __forceinline__ void advance(int64_t rows) {
    if (table != nullptr)
      first += rows;
    else
      base += rows * inner;
  }
};

// Rows [first, first + count) of a token layout for one head, as a RowMap
// of `limit` - first valid rows (at most the tile's).
template <class T>
__device__ __forceinline__ RowMap<T> token_rows(const TokenLayout& t, int64_t s, int64_t first,
                                                int64_t limit, int64_t head, int tile_rows) {
  const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(limit - first, tile_rows));
  if (t.block_table != nullptr)
    return RowMap<T>{static_cast<const T*>(t.data) + head * t.head_stride,
                     static_cast<int>(valid), tile_rows, 0, t.token_stride,
                     t.block_table + s * t.table_stride, t.page_size, t.batch_stride, first};
  return RowMap<T>{static_cast<const T*>(t.data) + s * t.batch_stride + first * t.token_stride +
                       head * t.head_stride,
                   static_cast<int>(valid), tile_rows, 0, t.token_stride};
}

// Fills rows [0, rows) of a tile with D columns from `map`, columns past
// head_dim and rows past map.valid with zeros. `base` is any valid address of
// the tensor (the source operand of a zero-byte cp.async).
template <class T, int D, int ROW, bool ASYNC>
__device__ __forceinline__ void load_rows(T* smem, int rows, int64_t head_dim, const RowMap<T> map) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    T* dst = smem + r * ROW + col;
    const bool inside = r < map.valid && col < head_dim;
    const T* src = inside ? map.row(r) + col : map.base;
    if constexpr (ASYNC) {
      cp_async_16(dst, src, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        dst[j] = inside && col + j < head_dim ? src[j] : from_float<T>(0.f);
    }
  }
}

template <class T>
__device__ __forceinline__ const T* token_row(const TokenLayout& t, int64_t s, int64_t token,
                                              int64_t head) {
  return static_cast<const T*>(t.data) + s * t.batch_stride + token * t.token_stride +
         head * t.head_stride;
}

__device__ __forceinline__ float bias_at(const BiasLayout& b, int64_t s, int64_t h, int64_t i,
                                         int64_t j) {
  const int64_t at = s * b.batch_stride + h * b.head_stride + i * b.q_stride + j * b.k_stride;
  switch (b.type) {
    case DType::f32: return static_cast<const float*>(b.data)[at];
    case DType::f16: return to_float(static_cast<const __half*>(b.data)[at]);
    case DType::bf16: return to_float(static_cast<const __nv_bfloat16*>(b.data)[at]);
  }
  return 0.f;
}

// ---- configuration ----------------------------------------------------------------

inline int padded_head_dim(int64_t head_dim) {
  int d = 32;
  while (d < head_dim) d *= 2;
  return d;
}

inline bool tokens_aligned(const TokenLayout& t, int64_t head_dim) {
  return head_dim % 8 == 0 && t.batch_stride % 8 == 0 && t.token_stride % 8 == 0 &&
         t.head_stride % 8 == 0 && aligned16(t.data);
}

template <class Kernel>
cudaError_t allow_shared(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Calls f.template operator()<T, Tile>() for the call's element type and
// padded head_dim.
template <class F>
cudaError_t with_tile(DType type, int64_t head_dim, F&& f) {
  auto by_dim = [&]<class T>() -> cudaError_t {
    switch (padded_head_dim(head_dim)) {
      case 32: return f.template operator()<T, Tile<32, 64>>();
      case 64: return f.template operator()<T, Tile<64, 64>>();
      case 128: return f.template operator()<T, Tile<128, 64>>();
      case 256: return f.template operator()<T, Tile<256, 32>>();
    }
    return cudaErrorInvalidValue;
  };
  switch (type) {
    case DType::f16: return by_dim.template operator()<__half>();
    case DType::bf16: return by_dim.template operator()<__nv_bfloat16>();
    case DType::f32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyllm::cuda::attention_detail
