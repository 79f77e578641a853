// GEMM with a fused epilogue on the tensor cores (mma.sync m16n8k16, fp32
// accumulators). A CTA computes a BM x BN tile of the output; its warps split
// the tile into WM x WN pieces. K advances BK = 32 at a time through a
// STAGES-deep ring of shared-memory buffers filled with cp.async (16-byte
// copies, zero-filled past the edges), so the next tiles are in flight while
// the current one is multiplied. Operands reach the tensor cores through
// ldmatrix from rows padded by 16 bytes (no bank conflicts). When k, the row
// strides or the pointers are not 16-byte multiples, the same kernel fills
// the buffers with predicated element loads instead. CTAs walk the output in
// groups of 8 tile rows, so neighbouring CTAs share operand tiles in L2.

#include "gemm_kernel.h"

#include <algorithm>

#include "element.h"
#include "ptx.h"

namespace pyllm::cuda {
namespace {

constexpr int kBK = 32;
constexpr int kPad = 8;              // elements of padding per shared-memory row
constexpr int kRow = kBK + kPad;     // shared-memory row length in elements
constexpr int kChunksPerRow = kBK / 8;  // 16-byte chunks per tile row
constexpr int kGroupRows = 8;        // tile rows per group of CTAs (L2 reuse)

template <int BM_, int BN_, int WM_, int WN_, int STAGES_, bool TWO_>
struct Config {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr bool TWO = TWO_;  // a second weight (SwiGLU)
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;  // mma tiles per warp
  static constexpr int B_ROWS = TWO ? 2 * BN : BN;
  static constexpr int STAGE_ELEMS = (BM + B_ROWS) * kRow;
  static constexpr int SHARED_BYTES = STAGES * STAGE_ELEMS * 2;
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BM % WM == 0 && BN % WN == 0);
};

using BigTile = Config<128, 128, 64, 32, 3, false>;    // 8 warps, 60 KB
using SmallTile = Config<64, 64, 32, 32, 4, false>;    // 4 warps, 40 KB: m <= 64
using SwigluTile = Config<64, 64, 32, 32, 3, true>;    // 4 warps, 45 KB

// Fills `rows` rows of a tile (row r of the tile is global row row0 + r, of
// `limit` rows) with columns [k0, k0 + BK) of a row-major [*, k] operand.
template <class T, int THREADS, bool ASYNC>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t ld, int64_t row0,
                                          int64_t limit, int rows, int64_t k0, int64_t k) {
  for (int c = threadIdx.x; c < rows * kChunksPerRow; c += THREADS) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    T* dst = smem + r * kRow + col;
    const int64_t row = row0 + r, kk = k0 + col;
    const bool inside = row < limit && kk < k;
    if constexpr (ASYNC) {
      // k % 8 == 0 here, so a chunk is either wholly inside or wholly past k.
      cp_async_16(dst, inside ? src + row * ld + kk : src, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        dst[j] = inside && kk + j < k ? src[row * ld + kk + j] : from_float<T>(0.f);
    }
  }
}

template <class T>
__device__ __forceinline__ float epilogue_value(const Gemm& g, float acc, float acc2, int64_t row,
                                                int64_t col, float* second) {
  switch (g.epilogue) {
    case GemmEpilogue::forward: return activate(g.activation, acc);
    case GemmEpilogue::swiglu: return activate(Activation::silu, acc) * acc2;
    case GemmEpilogue::act_grad: {
      const float gy = to_float(static_cast<const T*>(g.grad)[row * g.ldg + col]);
      return gy * activate_derivative(g.activation, acc);
    }
    case GemmEpilogue::swiglu_grad: {
      const float gy = to_float(static_cast<const T*>(g.grad)[row * g.ldg + col]);
      *second = gy * activate(Activation::silu, acc);
      return gy * acc2 * activate_derivative(Activation::silu, acc);
    }
  }
  return acc;
}

template <class T, class C, bool ASYNC>
__global__ void __launch_bounds__(C::THREADS) gemm_kernel(Gemm g) {
  PYLLM_DYNAMIC_SHARED(T, smem);
  const T* a = static_cast<const T*>(g.a);
  const T* b = static_cast<const T*>(g.b);
  const T* b2 = static_cast<const T*>(g.b2);

  // Grouped order: kGroupRows tile rows share each column of tiles.
  const int64_t tiles_m = (g.m + C::BM - 1) / C::BM, tiles_n = (g.n + C::BN - 1) / C::BN;
  const int64_t pid = blockIdx.x;
  const int64_t per_group = kGroupRows * tiles_n;
  const int64_t first_m = (pid / per_group) * kGroupRows;
  const int64_t group_m = std::min<int64_t>(tiles_m - first_m, kGroupRows);
  const int64_t tile_m = first_m + (pid % per_group) % group_m;
  const int64_t tile_n = (pid % per_group) / group_m;
  const int64_t m0 = tile_m * C::BM, n0 = tile_n * C::BN;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / C::WARPS_N) * C::WM, wn0 = (warp % C::WARPS_N) * C::WN;
  float acc[C::MT][C::NT][4] = {};
  float acc2[C::TWO ? C::MT : 1][C::TWO ? C::NT : 1][4] = {};

  auto stage_a = [&](int s) { return smem + s * C::STAGE_ELEMS; };
  auto stage_b = [&](int s) { return smem + s * C::STAGE_ELEMS + C::BM * kRow; };
  auto load_stage = [&](int s, int64_t kt) {
    const int64_t k0 = kt * kBK;
    load_tile<T, C::THREADS, ASYNC>(stage_a(s), a, g.lda, m0, g.m, C::BM, k0, g.k);
    load_tile<T, C::THREADS, ASYNC>(stage_b(s), b, g.ldb, n0, g.n, C::BN, k0, g.k);
    if constexpr (C::TWO)
      load_tile<T, C::THREADS, ASYNC>(stage_b(s) + C::BN * kRow, b2, g.ldb, n0, g.n, C::BN, k0,
                                      g.k);
  };

  const int64_t k_tiles = (g.k + kBK - 1) / kBK;
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();  // tile kt has landed (this thread's part)
    __syncthreads();                 // ... everyone's; and tile kt-1 is consumed
    const int64_t next = kt + C::STAGES - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % C::STAGES), next);
    cp_async_commit();

    const T* sa = stage_a(static_cast<int>(kt % C::STAGES));
    const T* sb = stage_b(static_cast<int>(kt % C::STAGES));
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[C::MT][4];
#pragma unroll
      for (int i = 0; i < C::MT; ++i)
        ldmatrix_x4(af[i], sa + (wm0 + 16 * i + lane % 16) * kRow + kk + (lane / 16) * 8);
#pragma unroll
      for (int w = 0; w < (C::TWO ? 2 : 1); ++w) {
        const T* sbw = sb + w * C::BN * kRow;
#pragma unroll
        for (int j = 0; j < C::NT; j += 2) {
          uint32_t bf[4];  // n-tiles j and j+1, k halves 0-7 and 8-15
          ldmatrix_x4(bf, sbw + (wn0 + 8 * j + lane % 8 + (lane / 16) * 8) * kRow + kk +
                              ((lane / 8) % 2) * 8);
          const uint32_t b_lo[2] = {bf[0], bf[1]}, b_hi[2] = {bf[2], bf[3]};
#pragma unroll
          for (int i = 0; i < C::MT; ++i) {
            if (w == 0) {
              mma_16816<T>(acc[i][j], af[i], b_lo);
              mma_16816<T>(acc[i][j + 1], af[i], b_hi);
            } else if constexpr (C::TWO) {
              mma_16816<T>(acc2[i][j], af[i], b_lo);
              mma_16816<T>(acc2[i][j + 1], af[i], b_hi);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue straight from the accumulator fragments: lane (g, t) holds rows
  // g and g + 8, columns 2t and 2t + 1 of each 16 x 8 tile.
  T* out = static_cast<T*>(g.out);
  T* out2 = static_cast<T*>(g.out2);
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + wm0 + 16 * i + lane / 4 + 8 * (e / 2);
        const int64_t col = n0 + wn0 + 8 * j + 2 * (lane % 4) + e % 2;
        if (row >= g.m || col >= g.n) continue;
        float v = acc[i][j][e] + (g.bias ? g.bias[col] : 0.f);
        float v2 = 0.f;
        if constexpr (C::TWO) v2 = acc2[i][j][e] + (g.bias2 ? g.bias2[col] : 0.f);
        float second = 0.f;
        const float y = epilogue_value<T>(g, v, v2, row, col, &second);
        out[row * g.ldc + col] = from_float<T>(y);
        if (g.epilogue == GemmEpilogue::swiglu_grad) out2[row * g.ldc + col] = from_float<T>(second);
      }
}

template <class T, class C>
cudaError_t launch_with(const Gemm& g, cudaStream_t stream) {
  const int64_t tiles = ((g.m + C::BM - 1) / C::BM) * ((g.n + C::BN - 1) / C::BN);
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const bool aligned = g.k % 8 == 0 && g.lda % 8 == 0 && g.ldb % 8 == 0 && aligned16(g.a) &&
                       aligned16(g.b) && (g.b2 == nullptr || aligned16(g.b2));
  auto kernel = aligned ? &gemm_kernel<T, C, true> : &gemm_kernel<T, C, false>;
  if (C::SHARED_BYTES > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               C::SHARED_BYTES);
    if (e != cudaSuccess) return e;
  }
  return PYLLM_LAUNCH(kernel, dim3(static_cast<unsigned>(tiles)), dim3(C::THREADS),
                      C::SHARED_BYTES, stream, g);
}

template <class T>
cudaError_t launch_typed(const Gemm& g, cudaStream_t stream) {
  const bool two = g.epilogue == GemmEpilogue::swiglu || g.epilogue == GemmEpilogue::swiglu_grad;
  if (two) return launch_with<T, SwigluTile>(g, stream);
  if (g.m <= 64) return launch_with<T, SmallTile>(g, stream);
  return launch_with<T, BigTile>(g, stream);
}

}  // namespace

cudaError_t launch_gemm(const Gemm& g, cudaStream_t stream) {
  if (g.m == 0 || g.n == 0) return cudaSuccess;
  switch (g.type) {
    case DType::f16: return launch_typed<__half>(g, stream);
    case DType::bf16: return launch_typed<__nv_bfloat16>(g, stream);
    case DType::f32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyllm::cuda
