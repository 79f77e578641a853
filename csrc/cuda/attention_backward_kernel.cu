// Attention backward on CUDA tensor cores: dK/dV per (64 keys, KV head,
// sequence), looping over the query heads of the group and their query
// blocks and recomputing S^T = K Q^T and P^T from the saved lse; then dQ per
// (64 queries, head, sequence). Each output element is written by one CTA:
// no atomics, the same bits on every run. head_dim 256 runs in two column
// slices so that the accumulators stay in registers.

#include "attention_tiles.cuh"

namespace pyllm::cuda {
namespace {

using namespace attention_detail;

// ---- backward ------------------------------------------------------------------------

// Output columns per backward CTA: head_dim 256 is done in two column slices
// (each recomputing the scores) so that the dK/dV or dQ accumulators fit in
// registers.
template <int D>
constexpr int kSliceCols = D < 128 ? D : 128;
// Queries per tile in the dK/dV kernel (32 from head_dim 128 on, for registers).
template <int D>
constexpr int kBackwardQueries = D < 128 ? 64 : 32;

// log2-domain probability of (row, key) from the saved lse; 0 when masked.
// slope: d score / d (q.k scale), the softcap's 1 - tanh^2 (else 1).
__device__ __forceinline__ float probability(const AttentionBackward& a, float score, int64_t s,
                                            int64_t h, int64_t query, int64_t key, int64_t lq,
                                            int64_t lk, float lse, float& slope) {
  const AttentionGeometry& g = a.g;
  const bool masked = query >= lq || key >= lk || key < g.key_lo(query, lk - lq) ||
                      key >= g.key_hi(query, lk - lq, lk) || lse == kInf;
  slope = 1.f;
  if (masked) return 0.f;
  float v;
  if (g.softcap > 0.f) {
    const float th = tanhf(score * (g.scale / g.softcap));
    slope = 1.f - th * th;
    v = g.softcap * th * kLog2e;
  } else {
    v = score * g.scale * kLog2e;
  }
  if (a.bias.data != nullptr) v += kLog2e * bias_at(a.bias, s, h, query, key);
  if (g.alibi != nullptr)  // ALiBi: -slope |query + shift - key|
    v -= kLog2e * g.alibi_slope(s, h) * fabsf(static_cast<float>(query + lk - lq - key));
  return exp2f(v - lse * kLog2e);
}

__device__ __forceinline__ float row_stat(const float* data, const LseLayout& l, int64_t s,
                                          int64_t h, int64_t token) {
  return data[s * l.batch_stride + h * l.head_stride + token];
}

template <class T, int SLICE>
__device__ __forceinline__ void store_rows(const TokenLayout& t, const float (&acc)[SLICE / 8][4],
                                           int64_t s, int64_t first_token, int64_t limit,
                                           int64_t head, int64_t row0, int col0, int64_t head_dim,
                                           float factor) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t row = row0 + lane / 4 + 8 * i;
    if (row >= limit) continue;
    T* out = static_cast<T*>(t.data) + s * t.batch_stride + (first_token + row) * t.token_stride +
             head * t.head_stride;
#pragma unroll
    for (int j = 0; j < SLICE / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col0 + 8 * j + 2 * (lane % 4) + e;
        if (col < head_dim) out[col] = from_float<T>(acc[j][2 * i + e] * factor);
      }
  }
}

// dK, dV for keys [k0, k0 + 64) of KV head hk, column slice blockIdx.x %
// slices: over every query head of the group and every query block that can
// see these keys, S^T = K Q^T, P^T from the lse, dV += P^T dO,
// dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
template <class T, class C, bool ASYNC>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) attention_backward_kv_kernel(AttentionBackward a) {
  constexpr int D = C::D, BQ = kBackwardQueries<D>, ROW = C::ROW, SLICE = kSliceCols<D>;
  constexpr int slices = D / SLICE;
  PYLLM_DYNAMIC_SHARED(T, smem);
  T* sk = smem;
  T* sv = sk + kBlockM * ROW;
  T* sq = sv + kBlockM * ROW;
  T* sdo = sq + BQ * ROW;
  const AttentionGeometry g = a.g;  // a copy: no address of the parameter is taken
  const int64_t s = blockIdx.z, hk = blockIdx.y, group = g.heads / g.heads_kv;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x / slices) * kBlockM;
  const int col0 = static_cast<int>(blockIdx.x % slices) * SLICE;
  const int64_t lq = g.len_q(s), lk = g.len_k(s), shift = lk - lq;
  if (k0 >= lk) return;
  const int64_t first_k = g.first_k(s), first_q = g.first_q(s);
  load_rows<T, D, ROW, ASYNC>(sk, kBlockM, g.head_dim,
                              token_rows<T>(a.k, s, first_k + k0, first_k + lk, hk, kBlockM));
  load_rows<T, D, ROW, ASYNC>(sv, kBlockM, g.head_dim,
                              token_rows<T>(a.v, s, first_k + k0, first_k + lk, hk, kBlockM));
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float dk[SLICE / 8][4] = {}, dv[SLICE / 8][4] = {};
  // The queries that see any of these keys (causal or a window: not all).
  const int64_t q_first = g.query_lo(k0, shift) / BQ * BQ;
  const int64_t q_stop = g.query_hi(std::min<int64_t>(k0 + kBlockM, lk), shift, lq);
  for (int64_t hg = 0; hg < group; ++hg) {
    const int64_t h = hk * group + hg;
    for (int64_t q0 = q_first; q0 < q_stop; q0 += BQ) {
      load_rows<T, D, ROW, ASYNC>(sq, BQ, g.head_dim,
                                  token_rows<T>(a.q, s, first_q + q0, first_q + lq, h, BQ));
      load_rows<T, D, ROW, ASYNC>(sdo, BQ, g.head_dim,
                                  token_rows<T>(a.grad_out, s, first_q + q0, first_q + lq, h, BQ));
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float st[BQ / 8][4] = {}, dpt[BQ / 8][4] = {};
      mma_abt<T, BQ / 8, D / 16, ROW>(st, sk + 16 * warp * ROW, sq);
      mma_abt<T, BQ / 8, D / 16, ROW>(dpt, sv + 16 * warp * ROW, sdo);
#pragma unroll
      for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = k0 + 16 * warp + lane / 4 + 8 * (e / 2);
          const int64_t query = q0 + 8 * j + 2 * (lane % 4) + e % 2;
          const int64_t token = g.first_q(s) + query;
          const bool valid = query < lq;
          const float lse = valid ? row_stat(a.lse.data, a.lse, s, h, token) : kInf;
          float slope;
          const float p = probability(a, st[j][e], s, h, query, key, lq, lk, lse, slope);
          const float delta = valid ? row_stat(a.delta, a.lse, s, h, token) : 0.f;
          st[j][e] = p;
          dpt[j][e] = p * (dpt[j][e] - delta) * slope;
        }
      uint32_t pf[BQ / 16][4], dsf[BQ / 16][4];
      to_a_fragments<T, BQ / 8>(st, pf);
      to_a_fragments<T, BQ / 8>(dpt, dsf);
      mma_ab<T, SLICE / 8, BQ / 16, ROW>(dv, pf, sdo + col0);
      mma_ab<T, SLICE / 8, BQ / 16, ROW>(dk, dsf, sq + col0);
      __syncthreads();  // sq and sdo are refilled next
    }
  }
  cp_async_wait<0>();
  store_rows<T, SLICE>(a.grad_k, dk, s, g.first_k(s), lk, hk, k0 + 16 * warp, col0, g.head_dim,
                       g.scale);
  store_rows<T, SLICE>(a.grad_v, dv, s, g.first_k(s), lk, hk, k0 + 16 * warp, col0, g.head_dim,
                       1.f);
}

// dQ for queries [q0, q0 + 64) of head h, column slice blockIdx.x % slices:
// over the key blocks these queries see, S = Q K^T, P from the lse,
// dP = dO V^T, dS = P (dP - delta), dQ += dS K.
template <class T, class C, bool ASYNC>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) attention_backward_q_kernel(AttentionBackward a) {
  constexpr int D = C::D, BN = C::BN, ROW = C::ROW, SLICE = kSliceCols<D>;
  constexpr int slices = D / SLICE;
  PYLLM_DYNAMIC_SHARED(T, smem);
  T* sq = smem;
  T* sdo = sq + kBlockM * ROW;
  T* sk = sdo + kBlockM * ROW;
  T* sv = sk + BN * ROW;
  const AttentionGeometry g = a.g;  // a copy: no address of the parameter is taken
  const int64_t s = blockIdx.z, h = blockIdx.y, hk = h / (g.heads / g.heads_kv);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x / slices) * kBlockM;
  const int col0 = static_cast<int>(blockIdx.x % slices) * SLICE;
  const int64_t lq = g.len_q(s), lk = g.len_k(s), shift = lk - lq;
  if (q0 >= lq) return;
  const int64_t first_k = g.first_k(s), first_q = g.first_q(s);
  load_rows<T, D, ROW, ASYNC>(sq, kBlockM, g.head_dim,
                              token_rows<T>(a.q, s, first_q + q0, first_q + lq, h, kBlockM));
  load_rows<T, D, ROW, ASYNC>(sdo, kBlockM, g.head_dim,
                              token_rows<T>(a.grad_out, s, first_q + q0, first_q + lq, h, kBlockM));
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float lse[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t query = q0 + 16 * warp + lane / 4 + 8 * i;
    const int64_t token = g.first_q(s) + query;
    lse[i] = query < lq ? row_stat(a.lse.data, a.lse, s, h, token) : kInf;
    delta[i] = query < lq ? row_stat(a.delta, a.lse, s, h, token) : 0.f;
  }
  // The keys any of these queries sees (aligned to BN from the first).
  const int64_t k_start = g.key_lo(q0, shift) / BN * BN;
  const int64_t k_end = g.key_hi(std::min<int64_t>(q0 + kBlockM, lq) - 1, shift, lk);
  float dq[SLICE / 8][4] = {};
  for (int64_t k0 = k_start; k0 < k_end; k0 += BN) {
    load_rows<T, D, ROW, ASYNC>(sk, BN, g.head_dim,
                                token_rows<T>(a.k, s, first_k + k0, first_k + lk, hk, BN));
    load_rows<T, D, ROW, ASYNC>(sv, BN, g.head_dim,
                                token_rows<T>(a.v, s, first_k + k0, first_k + lk, hk, BN));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    float sc[BN / 8][4] = {}, dp[BN / 8][4] = {};
    mma_abt<T, BN / 8, D / 16, ROW>(sc, sq + 16 * warp * ROW, sk);
    mma_abt<T, BN / 8, D / 16, ROW>(dp, sdo + 16 * warp * ROW, sv);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t query = q0 + 16 * warp + lane / 4 + 8 * (e / 2);
        const int64_t key = k0 + 8 * j + 2 * (lane % 4) + e % 2;
        float slope;
        const float p = probability(a, sc[j][e], s, h, query, key, lq, lk, lse[e / 2], slope);
        dp[j][e] = p * (dp[j][e] - delta[e / 2]) * slope;
      }
    uint32_t dsf[BN / 16][4];
    to_a_fragments<T, BN / 8>(dp, dsf);
    mma_ab<T, SLICE / 8, BN / 16, ROW>(dq, dsf, sk + col0);
    __syncthreads();  // sk and sv are refilled next
  }
  cp_async_wait<0>();
  store_rows<T, SLICE>(a.grad_q, dq, s, g.first_q(s), lq, h, q0 + 16 * warp, col0, g.head_dim,
                       g.scale);
}

template <class T, class C>
cudaError_t backward_with(const AttentionBackward& a, cudaStream_t stream) {
  const AttentionGeometry g = a.g;  // a copy: no address of the parameter is taken
  const bool aligned = tokens_aligned(a.q, g.head_dim) && tokens_aligned(a.k, g.head_dim) &&
                       tokens_aligned(a.v, g.head_dim) && tokens_aligned(a.grad_out, g.head_dim);
  if (g.batch > 65535 || g.heads > 65535) return cudaErrorInvalidValue;
  constexpr int slices = C::D / kSliceCols<C::D>;
  // K, V (64 rows each) and Q, dO tiles; Q, dO (64 rows each) and K, V tiles.
  constexpr int kv_shared = (2 * kBlockM + 2 * kBackwardQueries<C::D>) * C::ROW * 2;
  constexpr int q_shared = (2 * kBlockM + 2 * C::BN) * C::ROW * 2;
  const int64_t key_blocks = (g.seq_k + kBlockM - 1) / kBlockM * slices;
  const int64_t query_blocks = (g.seq_q + kBlockM - 1) / kBlockM * slices;
  if (key_blocks > 0x7fffffff || query_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  auto kv = aligned ? &attention_backward_kv_kernel<T, C, true>
                    : &attention_backward_kv_kernel<T, C, false>;
  auto q = aligned ? &attention_backward_q_kernel<T, C, true>
                   : &attention_backward_q_kernel<T, C, false>;
  cudaError_t e = allow_shared(kv, kv_shared);
  if (e == cudaSuccess) e = allow_shared(q, q_shared);
  if (e != cudaSuccess) return e;
  if (key_blocks > 0) {
    e = PYLLM_LAUNCH(kv, dim3(static_cast<unsigned>(key_blocks), static_cast<unsigned>(g.heads_kv),
                              static_cast<unsigned>(g.batch)),
                     dim3(kThreads), kv_shared, stream, a);
    if (e != cudaSuccess) return e;
  }
  if (query_blocks == 0) return cudaSuccess;
  return PYLLM_LAUNCH(q, dim3(static_cast<unsigned>(query_blocks), static_cast<unsigned>(g.heads),
                              static_cast<unsigned>(g.batch)),
                      dim3(kThreads), q_shared, stream, a);
}

}  // namespace

cudaError_t launch_attention_backward(const AttentionBackward& a, cudaStream_t stream) {
  if (a.g.batch == 0 || a.g.heads == 0) return cudaSuccess;
  if (a.g.head_dim < 1 || a.g.head_dim > 256) return cudaErrorInvalidValue;
  return with_tile(a.type, a.g.head_dim, [&]<class T, class C>() {
    return backward_with<T, C>(a, stream);
  });
}

}  // namespace pyllm::cuda
