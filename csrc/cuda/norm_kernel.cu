// LayerNorm / RMSNorm forward and backward on CUDA, with the residual add
// fused. A row is handled by one warp (short rows) or by the whole CTA (long
// rows); rows are read with 16-byte vector accesses when the row length and
// the pointers allow it. Statistics and sums are fp32. The backward writes
// the parameter gradients as per-chunk partial sums that a second kernel adds
// up in a fixed order: no atomics, the same bits on every run.

#include "norm_kernel.h"

#include <algorithm>
#include <initializer_list>

#include "element.h"

namespace pyllm::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpRowsPerCta = 4;      // warp-per-row CTAs: 4 warps, 4 rows at a time
constexpr int64_t kMaxPacksPerWarp = 256;
constexpr int64_t kMaxGrid = 1 << 20;

// The threads that share a row. GROUP = 32: one warp per row; GROUP = 0: the
// whole CTA per row.
template <int GROUP>
struct RowGroup {
  __device__ static int size() { return GROUP ? GROUP : static_cast<int>(blockDim.x); }
  __device__ static int rank() { return static_cast<int>(GROUP ? threadIdx.x % 32 : threadIdx.x); }
  __device__ static int64_t first() {
    return GROUP ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
                 : static_cast<int64_t>(blockIdx.x);
  }
  __device__ static int64_t count() {
    return GROUP ? static_cast<int64_t>(gridDim.x) * (blockDim.x / 32) : gridDim.x;
  }
  // Sum over the group; every thread gets the total. A CTA-wide sum uses
  // scratch[32] and two barriers (so scratch can be reused right away).
  __device__ static float sum(float v, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
    if constexpr (GROUP == 32) return v;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
    __syncthreads();
    return v;
  }
};

template <class P, int VEC>
__device__ __forceinline__ void load_params(const void* p, int64_t pack, float (&out)[VEC],
                                            float absent) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = absent;
    return;
  }
  const Pack<P, VEC> v = reinterpret_cast<const Pack<P, VEC>*>(p)[pack];
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(v.v[j]);
}

template <class T, class P, int VEC, int GROUP>
__global__ void norm_forward_kernel(NormForward a) {
  __shared__ float scratch[32];
  using G = RowGroup<GROUP>;
  using TP = Pack<T, VEC>;
  const int64_t packs = a.n / VEC;
  const float inv_n = 1.f / static_cast<float>(a.n);
  for (int64_t row = G::first(); row < a.rows; row += G::count()) {
    const TP* x = reinterpret_cast<const TP*>(a.x) + row * packs;
    const TP* residual = a.residual ? reinterpret_cast<const TP*>(a.residual) + row * packs : nullptr;
    TP* sum = a.sum ? reinterpret_cast<TP*>(a.sum) + row * packs : nullptr;
    // Pass 1: s = x + residual (stored, rounded to T) and sum(s) or sum(s^2).
    float acc = 0.f;
    for (int64_t p = G::rank(); p < packs; p += G::size()) {
      TP s = x[p];
      if (residual != nullptr) {
        const TP r = residual[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) s.v[j] = from_float<T>(to_float(s.v[j]) + to_float(r.v[j]));
        sum[p] = s;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(s.v[j]);
        acc += a.rms ? f * f : f;
      }
    }
    const TP* src = sum != nullptr ? sum : x;  // this thread's own writes, read back
    float mean = 0.f, rstd;
    if (a.rms) {
      rstd = rsqrtf(G::sum(acc, scratch) * inv_n + a.eps);
    } else {
      mean = G::sum(acc, scratch) * inv_n;
      float var = 0.f;  // second pass: exact centring, no cancellation
      for (int64_t p = G::rank(); p < packs; p += G::size()) {
        const TP s = src[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = to_float(s.v[j]) - mean;
          var += d * d;
        }
      }
      rstd = rsqrtf(G::sum(var, scratch) * inv_n + a.eps);
    }
    if (G::rank() == 0) {
      a.rstd[row] = rstd;
      if (!a.rms) a.mean[row] = mean;
    }
    TP* y = reinterpret_cast<TP*>(a.y) + row * packs;
    for (int64_t p = G::rank(); p < packs; p += G::size()) {
      const TP s = src[p];
      float w[VEC], b[VEC];
      load_params<P, VEC>(a.weight, p, w, 1.f);
      load_params<P, VEC>(a.bias, p, b, 0.f);
      TP out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>((to_float(s.v[j]) - mean) * rstd * w[j] + b[j]);
      y[p] = out;
    }
  }
}

template <class T, class P, int VEC, int GROUP>
__global__ void norm_backward_kernel(NormBackward a) {
  __shared__ float scratch[32];
  using G = RowGroup<GROUP>;
  using TP = Pack<T, VEC>;
  const int64_t packs = a.n / VEC;
  const float inv_n = 1.f / static_cast<float>(a.n);
  const int64_t chunk = G::first();
  if (chunk >= a.rows) {  // a chunk without rows still owns its partial row
    for (int64_t p = G::rank(); p < packs; p += G::size())
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (a.partial_weight) a.partial_weight[chunk * a.n + p * VEC + j] = 0.f;
        if (a.partial_bias) a.partial_bias[chunk * a.n + p * VEC + j] = 0.f;
      }
    return;
  }
  for (int64_t row = chunk; row < a.rows; row += G::count()) {
    const TP* gy = reinterpret_cast<const TP*>(a.grad_y) + row * packs;
    const TP* x = reinterpret_cast<const TP*>(a.x) + row * packs;
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    // Pass 1: sum(g w xhat) and sum(g w).
    float s1 = 0.f, s2 = 0.f;
    for (int64_t p = G::rank(); p < packs; p += G::size()) {
      const TP gv = gy[p], xv = x[p];
      float w[VEC];
      load_params<P, VEC>(a.weight, p, w, 1.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gw = to_float(gv.v[j]) * w[j];
        s1 += gw * ((to_float(xv.v[j]) - mean) * rstd);
        s2 += gw;
      }
    }
    const float c1 = G::sum(s1, scratch) * inv_n;
    const float c2 = a.rms ? 0.f : G::sum(s2, scratch) * inv_n;
    // Pass 2: grad_x = rstd (g w - c2 - xhat c1) + grad_sum; partial sums.
    const bool first = row == chunk;
    for (int64_t p = G::rank(); p < packs; p += G::size()) {
      const TP gv = gy[p], xv = x[p];
      float w[VEC];
      load_params<P, VEC>(a.weight, p, w, 1.f);
      TP dx;
      TP gs;
      if (a.grad_sum) gs = reinterpret_cast<const TP*>(a.grad_sum)[row * packs + p];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = to_float(gv.v[j]);
        const float xhat = (to_float(xv.v[j]) - mean) * rstd;
        float d = rstd * (g * w[j] - c2 - xhat * c1);
        if (a.grad_sum) d += to_float(gs.v[j]);
        dx.v[j] = from_float<T>(d);
        const int64_t col = chunk * a.n + p * VEC + j;
        if (a.partial_weight) a.partial_weight[col] = (first ? 0.f : a.partial_weight[col]) + g * xhat;
        if (a.partial_bias) a.partial_bias[col] = (first ? 0.f : a.partial_bias[col]) + g;
      }
      if (a.grad_x) reinterpret_cast<TP*>(a.grad_x)[row * packs + p] = dx;
    }
  }
}

__global__ void column_sum_kernel(const float* __restrict__ partial, int64_t chunks, int64_t n,
                                  float* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float acc = 0.f;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * n + j];
  out[j] = acc;
}

// How a call is laid out: elements per access, warp or CTA per row, threads.
struct Layout {
  int vec;
  bool warp_per_row;
  int threads;
};

template <class T, class P>
Layout layout(int64_t n, std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / (sizeof(T) > sizeof(P) ? sizeof(T) : sizeof(P));
  bool vectorised = n % kVec == 0;
  for (const void* p : pointers) vectorised = vectorised && (p == nullptr || aligned16(p));
  const int vec = vectorised ? kVec : 1;
  const int64_t packs = n / vec;
  if (packs <= kMaxPacksPerWarp) return {vec, true, 32 * kWarpRowsPerCta};
  int threads = 64;  // about four packs per thread, at most 1024 threads
  while (threads < 1024 && threads * 4 < packs) threads *= 2;
  return {vec, false, threads};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T, class P, int VEC, int GROUP>
cudaError_t forward_with(const NormForward& a, const Layout& l, cudaStream_t stream) {
  const int64_t rows_per_cta = GROUP ? l.threads / 32 : 1;
  const auto grid = static_cast<unsigned>(std::min(ceil_div(a.rows, rows_per_cta), kMaxGrid));
  auto kernel = &norm_forward_kernel<T, P, VEC, GROUP>;
  return PYLLM_LAUNCH(kernel, dim3(grid), dim3(l.threads), 0, stream, a);
}

template <class T, class P, int VEC, int GROUP>
cudaError_t backward_with(const NormBackward& a, const Layout& l, cudaStream_t stream) {
  const int64_t rows_per_cta = GROUP ? l.threads / 32 : 1;
  const auto grid = static_cast<unsigned>(norm_backward_chunks(a.rows, a.n) / rows_per_cta);
  auto kernel = &norm_backward_kernel<T, P, VEC, GROUP>;
  return PYLLM_LAUNCH(kernel, dim3(grid), dim3(l.threads), 0, stream, a);
}

template <class T, class P, class Args, class Launch>
cudaError_t dispatch(const Args& a, const Layout& l, Launch&& launch) {
  constexpr int kVec = 16 / (sizeof(T) > sizeof(P) ? sizeof(T) : sizeof(P));
  if (l.vec == kVec)
    return l.warp_per_row ? launch.template operator()<T, P, kVec, 32>()
                          : launch.template operator()<T, P, kVec, 0>();
  return l.warp_per_row ? launch.template operator()<T, P, 1, 32>()
                        : launch.template operator()<T, P, 1, 0>();
}

// Calls f.template operator()<T, P>() for the (x, param) element types.
template <class F>
cudaError_t with_types(DType x_type, DType param_type, F&& f) {
  return with_element_type(x_type, [&](auto t) {
    using T = decltype(t);
    if (param_type == DType::f32) return f.template operator()<T, float>();
    return f.template operator()<T, T>();
  });
}

}  // namespace

int64_t norm_backward_chunks(int64_t rows, int64_t n) {
  // At most ~8M floats per partial buffer and 1024 chunks, rounded up to
  // whole CTAs of warps (for a warp per row; with a CTA per row the extra
  // chunks have no rows and write zeros).
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(1024, (int64_t{1} << 23) / n));
  const int64_t chunks = std::max<int64_t>(1, std::min(rows, cap));
  return ceil_div(chunks, kWarpRowsPerCta) * kWarpRowsPerCta;
}

cudaError_t launch_norm_forward(const NormForward& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return with_types(a.x_type, a.param_type, [&]<class T, class P>() {
    const Layout l = layout<T, P>(a.n, {a.x, a.residual, a.weight, a.bias, a.y, a.sum});
    return dispatch<T, P>(a, l, [&]<class T2, class P2, int VEC, int GROUP>() {
      return forward_with<T2, P2, VEC, GROUP>(a, l, stream);
    });
  });
}

cudaError_t launch_norm_backward(const NormBackward& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return with_types(a.x_type, a.param_type, [&]<class T, class P>() {
    const Layout l = layout<T, P>(a.n, {a.grad_y, a.x, a.weight, a.grad_sum, a.grad_x});
    return dispatch<T, P>(a, l, [&]<class T2, class P2, int VEC, int GROUP>() {
      return backward_with<T2, P2, VEC, GROUP>(a, l, stream);
    });
  });
}

cudaError_t launch_column_sum(const float* partial, int64_t chunks, int64_t n, float* out,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  auto kernel = &column_sum_kernel;
  return PYLLM_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(n, kThreads))), dim3(kThreads),
                      0, stream, partial, chunks, n, out);
}

}  // namespace pyllm::cuda
