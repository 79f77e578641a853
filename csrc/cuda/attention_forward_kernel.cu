// Attention forward on CUDA tensor cores, FlashAttention-2 style: a CTA of 4
// warps per (64 query rows, head, sequence), each warp owning 16 rows. K/V
// tiles of BN rows pass through a two-deep ring of shared-memory buffers
// filled with cp.async while the previous tile is used; S = Q K^T and
// O += P V run on mma.sync m16n8k16 with fp32 accumulators, the online
// softmax in registers (log2 domain); P goes from the accumulator layout
// straight into A fragments. Decode (few queries, long keys): the same
// kernel with the rows of a CTA being every (query head of one KV group,
// query) pair and the keys split across CTAs; each writes an unnormalised
// partial (o, m, l) that a second kernel combines.
// head_dim is padded to D = 32, 64, 128 or 256 with zeros in shared memory;
// with head_dim and every stride a multiple of 8 elements (16 bytes) the
// tiles are loaded with cp.async, else with predicated element loads.

#include "attention_tiles.cuh"

namespace pyllm::cuda {
namespace {

using namespace attention_detail;

// ---- forward -----------------------------------------------------------------------

// Rows of a forward CTA. Prefill: queries [r0, r0 + 64) of head h. Decode:
// the group x len_q (<= 64) pairs (head of KV group hk, query), row
// r = head_in_group * len_q + query.
struct ForwardRows {
  bool decode;
  int64_t s, h, hk, group, lq, lk, r0, rows;
  __device__ int64_t head(int64_t r) const { return decode ? hk * group + r / lq : h; }
  __device__ int64_t query(int64_t r) const { return decode ? r % lq : r; }
};

// Key block `block` of a CTA's key range (rows of k_rows / v_rows from its
// start, `keys` of them valid) into one stage of the K and V buffers.
template <class T, int D, int ROW, int BN, bool ASYNC>
__device__ __forceinline__ void load_key_tiles(T* sk, T* sv, RowMap<T> k_rows, RowMap<T> v_rows,
                                               int64_t head_dim, int64_t keys, int64_t block) {
  const int64_t k0 = block * BN;
  const int valid = static_cast<int>(std::min<int64_t>(BN, keys - k0));
  k_rows.advance(k0);
  v_rows.advance(k0);
  k_rows.valid = v_rows.valid = valid;
  load_rows<T, D, ROW, ASYNC>(sk, BN, head_dim, k_rows);
  load_rows<T, D, ROW, ASYNC>(sv, BN, head_dim, v_rows);
}

template <class T, class C, bool DECODE, bool ASYNC>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) attention_forward_kernel(AttentionForward a,
                                                                     float* partial, int splits) {
  constexpr int D = C::D, BN = C::BN, ROW = C::ROW, NT = BN / 8, DT = D / 8;
  PYLLM_DYNAMIC_SHARED(T, smem);
  T* sq = smem;
  T* sk = sq + kBlockM * ROW;  // two stages of K then two of V
  T* sv = sk + 2 * BN * ROW;
  const AttentionGeometry g = a.g;  // a copy: no address of the parameter is taken
  ForwardRows rows_of{DECODE, blockIdx.z, 0, 0, g.heads / g.heads_kv, g.len_q(blockIdx.z),
                      g.len_k(blockIdx.z), 0, 0};
  int64_t k_lo = 0, k_hi = rows_of.lk;
  if constexpr (DECODE) {
    rows_of.hk = blockIdx.y;
    rows_of.rows = rows_of.group * rows_of.lq;
    const int64_t per = ((rows_of.lk + splits - 1) / splits + BN - 1) / BN * BN;
    k_lo = std::min<int64_t>(rows_of.lk, blockIdx.x * per);
    k_hi = std::min<int64_t>(rows_of.lk, k_lo + per);
    if (rows_of.rows == 0) return;
  } else {
    rows_of.h = blockIdx.y;
    rows_of.hk = rows_of.h / rows_of.group;
    rows_of.r0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
    rows_of.rows = rows_of.lq;
    if (rows_of.r0 >= rows_of.lq) return;
  }
  const ForwardRows& R = rows_of;
  const int64_t shift = R.lk - R.lq;  // query i sees keys key_lo(i) .. key_hi(i) - 1
  // The keys any row of this CTA sees: a window skips the others.
  const int64_t first = DECODE ? 0 : R.r0;
  const int64_t last = DECODE ? R.lq - 1 : std::min<int64_t>(R.r0 + kBlockM, R.lq) - 1;
  k_lo = g.walk_start(std::max<int64_t>(k_lo, g.key_lo(first, shift)), BN);
  const int64_t k_end = std::max<int64_t>(k_lo, std::min<int64_t>(k_hi, g.key_hi(last, shift, R.lk)));
  const int64_t blocks = (k_end - k_lo + BN - 1) / BN;

  RowMap<T> q_rows;
  if constexpr (DECODE) {  // row r: head hk * group + r / lq, query r % lq
    q_rows = RowMap<T>{token_row<T>(a.q, R.s, g.first_q(R.s), R.hk * R.group),
                       static_cast<int>(R.rows), static_cast<int>(R.lq), a.q.head_stride,
                       a.q.token_stride};
  } else {
    q_rows = token_rows<T>(a.q, R.s, g.first_q(R.s) + R.r0, g.first_q(R.s) + R.lq, R.h, kBlockM);
  }
  load_rows<T, D, ROW, ASYNC>(sq, kBlockM, g.head_dim, q_rows);
  cp_async_commit();
  const int64_t first_k = g.first_k(R.s);
  const RowMap<T> k_rows = token_rows<T>(a.k, R.s, first_k + k_lo, first_k + k_end, R.hk, BN);
  const RowMap<T> v_rows = token_rows<T>(a.v, R.s, first_k + k_lo, first_k + k_end, R.hk, BN);
  if (blocks > 0)
    load_key_tiles<T, D, ROW, BN, ASYNC>(sk, sv, k_rows, v_rows, g.head_dim, k_end - k_lo, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = a.g.scale * kLog2e;
  float m[2] = {-kInf, -kInf}, l[2] = {0.f, 0.f};
  float o[DT][4] = {};
  for (int64_t block = 0; block < blocks; ++block) {
    if (block + 1 < blocks)
      load_key_tiles<T, D, ROW, BN, ASYNC>(sk + ((block + 1) % 2) * BN * ROW,
                                           sv + ((block + 1) % 2) * BN * ROW, k_rows, v_rows,
                                           g.head_dim, k_end - k_lo, block + 1);
    cp_async_commit();
    cp_async_wait<1>();  // Q and this block have landed (this thread's copies)
    __syncthreads();     // ... and everyone's
    const int stage = static_cast<int>(block % 2);
    float s[NT][4] = {};
    mma_abt<T, NT, D / 16, ROW>(s, sq + 16 * warp * ROW, sk + stage * BN * ROW);

    // Scale, bias and mask in the log2 domain; online softmax per row.
    float row_max[2] = {-kInf, -kInf};
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = R.r0 + 16 * warp + lane / 4 + 8 * (e / 2);
        const int64_t key = k_lo + block * BN + 8 * j + 2 * (lane % 4) + e % 2;
        float v = g.softcap > 0.f ? g.softcap * kLog2e * tanhf(s[j][e] * (g.scale / g.softcap))
                                  : s[j][e] * scale;
        bool masked = key >= k_end || row >= R.rows;
        if (!masked)
          masked = key < g.key_lo(R.query(row), shift) || key >= g.key_hi(R.query(row), shift, R.lk);
        if (!masked && a.bias.data != nullptr)
          v += kLog2e * bias_at(a.bias, R.s, R.head(row), R.query(row), key);
        if (!masked && g.alibi != nullptr)  // ALiBi: -slope |query + shift - key|
          v -= kLog2e * g.alibi_slope(R.s, R.head(row)) *
               fabsf(static_cast<float>(R.query(row) + shift - key));
        s[j][e] = masked ? -kInf : v;
        row_max[e / 2] = fmaxf(row_max[e / 2], s[j][e]);
      }
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m[i], quad_max(row_max[i]));
      const float base = m_new == -kInf ? 0.f : m_new;  // a row with no key yet
      alpha[i] = exp2f(m[i] - base);
      m[i] = m_new;
      row_max[i] = base;
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - row_max[e / 2]);
        l[e / 2] += s[j][e];
      }
#pragma unroll
    for (int j = 0; j < DT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e / 2];
    uint32_t p[NT / 2][4];
    to_a_fragments<T, NT>(s, p);
    mma_ab<T, DT, NT / 2, ROW>(o, p, sv + stage * BN * ROW);
    __syncthreads();  // this stage is refilled two blocks from now
  }
  cp_async_wait<0>();

  const float l_row[2] = {quad_sum(l[0]), quad_sum(l[1])};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t row = R.r0 + 16 * warp + lane / 4 + 8 * i;
    if (row >= R.rows) continue;
    if constexpr (DECODE) {
      float* out = partial + ((((R.s * g.heads_kv + R.hk) * splits + blockIdx.x) * kBlockM) + row) *
                                 (D + 2);
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        out[8 * j + 2 * (lane % 4)] = o[j][2 * i];
        out[8 * j + 2 * (lane % 4) + 1] = o[j][2 * i + 1];
      }
      if (lane % 4 == 0) {
        out[D] = m[i];
        out[D + 1] = l_row[i];
      }
    } else {
      const int64_t h = R.head(row), token = g.first_q(R.s) + R.query(row);
      T* out = const_cast<T*>(token_row<T>(a.out, R.s, token, h));
      // l = 0 exactly when the row saw no key: zeros and lse = +inf (as
      // flash-attn). A NaN l (a NaN or infinite score) is not that: it makes
      // the row and its lse NaN, as in PyTorch.
      const bool seen = l_row[i] != 0.f;
      const float inv = 1.f / l_row[i];
#pragma unroll
      for (int j = 0; j < DT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + 2 * (lane % 4) + e;
          if (col < g.head_dim) out[col] = from_float<T>(seen ? o[j][2 * i + e] * inv : 0.f);
        }
      if (lane % 4 == 0)
        a.lse.data[R.s * a.lse.batch_stride + h * a.lse.head_stride + token] =
            seen ? (m[i] + log2f(l_row[i])) * kLn2 : kInf;
    }
  }
}

// Combines the decode partials of (sequence, head): m = max m_i over the
// splits that saw a key (l_i != 0; a NaN l_i counts, and a NaN m_i sticks, so
// that a NaN input shows in the row), l = sum l_i 2^(m_i - m),
// o = sum o_i 2^(m_i - m) / l.
template <class T, int D>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) attention_combine_kernel(AttentionForward a,
                                                                     const float* partial,
                                                                     int splits) {
  const AttentionGeometry g = a.g;  // a copy: no address of the parameter is taken
  const int64_t s = blockIdx.y, h = blockIdx.x, group = g.heads / g.heads_kv;
  const int64_t lq = g.len_q(s), hk = h / group;
  for (int64_t i = 0; i < lq; ++i) {
    const int64_t row = (h % group) * lq + i;
    auto slice = [&](int split) {
      return partial + (((s * g.heads_kv + hk) * splits + split) * kBlockM + row) * (D + 2);
    };
    float m = -kInf;
    bool seen = false;
    for (int split = 0; split < splits; ++split) {
      if (slice(split)[D + 1] == 0.f) continue;
      seen = true;
      const float ms = slice(split)[D];
      if (m == m && !(ms <= m)) m = ms;  // m == m: m is not NaN
    }
    float l = 0.f;
    for (int split = 0; split < splits && seen; ++split)
      if (slice(split)[D + 1] != 0.f) l += slice(split)[D + 1] * exp2f(slice(split)[D] - m);
    const int64_t token = g.first_q(s) + i;
    T* out = const_cast<T*>(token_row<T>(a.out, s, token, h));
    const float inv = 1.f / l;
    for (int64_t d = threadIdx.x; d < g.head_dim; d += kThreads) {
      float acc = 0.f;
      for (int split = 0; split < splits && seen; ++split)
        if (slice(split)[D + 1] != 0.f) acc += slice(split)[d] * exp2f(slice(split)[D] - m);
      out[d] = from_float<T>(seen ? acc * inv : 0.f);
    }
    if (threadIdx.x == 0)
      a.lse.data[s * a.lse.batch_stride + h * a.lse.head_stride + token] =
          seen ? (m + log2f(l)) * kLn2 : kInf;
  }
}

constexpr int64_t kDecodeMinKeys = 256;  // keys at least, for the split path
constexpr int64_t kDecodeKeysPerSplit = 128;
constexpr int64_t kDecodeTargetCtas = 256;

// Not in batch-invariant mode: there a decode query goes through the prefill
// kernel, as it would in a prefill (the splits depend on the batch).
bool takes_decode_path(const AttentionGeometry& g) {
  return !g.batch_invariant && g.seq_q * (g.heads / g.heads_kv) <= kBlockM && g.seq_k >= kDecodeMinKeys;
}

int64_t decode_splits(const AttentionGeometry& g) {
  const int64_t by_keys = (g.seq_k + kDecodeKeysPerSplit - 1) / kDecodeKeysPerSplit;
  const int64_t by_ctas = (kDecodeTargetCtas + g.batch * g.heads_kv - 1) /
                          std::max<int64_t>(1, g.batch * g.heads_kv);
  return std::max<int64_t>(1, std::min<int64_t>({by_keys, by_ctas, 64}));
}

template <class T, class C>
cudaError_t forward_with(const AttentionForward& a, float* workspace, cudaStream_t stream) {
  const AttentionGeometry g = a.g;  // a copy: no address of the parameter is taken
  const bool aligned =
      tokens_aligned(a.q, g.head_dim) && tokens_aligned(a.k, g.head_dim) && tokens_aligned(a.v, g.head_dim);
  if (g.batch > 65535 || g.heads > 65535) return cudaErrorInvalidValue;
  if (takes_decode_path(g)) {
    const int splits = static_cast<int>(decode_splits(g));
    auto kernel = aligned ? &attention_forward_kernel<T, C, true, true>
                          : &attention_forward_kernel<T, C, true, false>;
    cudaError_t e = allow_shared(kernel, C::FORWARD_SHARED);
    if (e != cudaSuccess) return e;
    e = PYLLM_LAUNCH(kernel, dim3(splits, static_cast<unsigned>(g.heads_kv),
                                  static_cast<unsigned>(g.batch)),
                     dim3(kThreads), C::FORWARD_SHARED, stream, a, workspace, splits);
    if (e != cudaSuccess) return e;
    auto combine = &attention_combine_kernel<T, C::D>;
    return PYLLM_LAUNCH(combine, dim3(static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch)),
                        dim3(kThreads), 0, stream, a, static_cast<const float*>(workspace), splits);
  }
  const int64_t q_blocks = (g.seq_q + kBlockM - 1) / kBlockM;
  if (q_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  auto kernel = aligned ? &attention_forward_kernel<T, C, false, true>
                        : &attention_forward_kernel<T, C, false, false>;
  const cudaError_t e = allow_shared(kernel, C::FORWARD_SHARED);
  if (e != cudaSuccess) return e;
  return PYLLM_LAUNCH(kernel, dim3(static_cast<unsigned>(q_blocks), static_cast<unsigned>(g.heads),
                                   static_cast<unsigned>(g.batch)),
                      dim3(kThreads), C::FORWARD_SHARED, stream, a, workspace, 1);
}

}  // namespace

int64_t attention_forward_workspace(const AttentionGeometry& g) {
  if (!takes_decode_path(g)) return 0;
  return g.batch * g.heads_kv * decode_splits(g) * kBlockM * (padded_head_dim(g.head_dim) + 2);
}

cudaError_t launch_attention_forward(const AttentionForward& a, float* workspace,
                                     cudaStream_t stream) {
  if (a.g.batch == 0 || a.g.heads == 0) return cudaSuccess;
  if (a.g.head_dim < 1 || a.g.head_dim > 256) return cudaErrorInvalidValue;
  return with_tile(a.type, a.g.head_dim, [&]<class T, class C>() {
    return forward_with<T, C>(a, workspace, stream);
  });
}

}  // namespace pyllm::cuda
