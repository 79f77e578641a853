"""Attention in Triton (FlashAttention-2): forward, split-KV decode, backward.

Layouts as pyllm::attention: dense (batch, seq, heads, head_dim) or packed
variable-length (tokens, heads, head_dim) with int32 cumulative lengths; the
head dimension contiguous, other strides free (a KV-cache slice works). GQA:
query head h reads kv head h // (heads / heads_kv), nothing repeated. Causal
masks are aligned to the bottom-right (query i sees keys j <= i + len_k -
len_q). head_dim is padded to a power of two inside the kernels, masked.

Variants: a sliding window (query i sees keys i + offset - window_left ..
i + offset + window_right; WINDOW_LEFT / WINDOW_RIGHT say which edges exist,
causal is window_right = 0; key blocks outside every row's window are skipped,
not masked) and Gemma 2's softcap (scores softcap * tanh(s / softcap)).

Forward: a program per (query block, head, sequence) walks the key blocks with
an online softmax in fp32 (exp2 of log2-scaled scores): no seq_q x seq_k
matrix. A query that sees no key gives zeros and lse = +inf.
Decode (<= 8 queries): the keys of each (sequence, head) are split across
programs, each leaving an unnormalised (o, m, l); a second kernel combines
them (flash-decoding).
Backward: P is recomputed from the saved lse; one kernel accumulates dK and dV
per key block (summing the query heads of its group), another dQ per query
block: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyllm.invariance import is_batch_invariant
from pyllm.kernels.cross_entropy import _tanh_and_derivative
from pyllm.kernels.launch import interpreter_tiles, on_device, register

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DECODE_MAX_QUERIES = 8


_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}

# Tiles per padded head_dim, each the fastest of those that compile for sm_80
# and sm_90 in fp16 and bf16, with bias, causal and varlen, without register
# spills on every Triton that torch 2.11-2.15 pin (3.6-3.9: Triton 3.9 spilled
# at 128 x 32 keys for head_dim 128, 64 x 32 for 256 and 32 x 32 for the dK/dV
# of 64, hence the narrower tiles; with the window and softcap code, the
# dK/dV of 32 spilled at 64 x 32 under 3.9 and 32 x 32 under 3.8: 16 x 16;
# tests/test_triton_compile.py checks every one, and tools/torch_matrix.py
# runs it under each Triton).
_FORWARD = {32: (128, 32, 8, 3), 64: (128, 64, 8, 3), 128: (128, 16, 8, 3), 256: (64, 16, 8, 2)}
_DECODE = {32: (16, 64, 4, 3), 64: (16, 64, 4, 3), 128: (16, 32, 4, 3), 256: (16, 16, 8, 2)}
_BACKWARD_KV = {32: (16, 16, 4, 2), 64: (16, 32, 4, 2), 128: (32, 32, 4, 2), 256: (32, 32, 8, 1)}
_BACKWARD_Q = {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (32, 64, 8, 2), 256: (32, 64, 8, 2)}


def _config(table: dict, block_d: int) -> dict:
    if interpreter_tiles():
        return dict(_INTERPRETER_CONFIG)
    block_m, block_n, warps, stages = table[block_d]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def forward_config(block_d: int) -> dict:
    """Launch parameters of the prefill forward for a padded head_dim (16..256)."""
    return _config(_FORWARD, max(32, block_d))


def decode_config(block_d: int, alibi: bool = False) -> dict:
    """Launch parameters of the split-KV decode forward (``alibi``: under ALiBi)."""
    return _config(_DECODE_ALIBI if alibi else _DECODE, max(32, block_d))


#: dK/dV tiles under a window's left edge, a right edge past the diagonal or a
#: softcap (their masks and tanh cost registers: the causal tiles spill there,
#: at head_dim 64 on sm_90 and 128 on sm_80 with Triton 3.6, 32 on sm_80 with
#: 3.8); at head_dim 32 with a softcap 16 x 32 (16 x 16 spills with Triton 3.6,
#: 16 x 32 without a softcap with 3.9). tests/test_triton_compile.py checks
#: each under the Triton it runs with, tools/torch_matrix.py under each.
_BACKWARD_KV_VARIANT = {32: (16, 16, 4, 2), 64: (16, 16, 4, 2), 128: (16, 16, 4, 2),
                        256: (32, 32, 8, 1)}
_BACKWARD_KV_SOFTCAP = {**_BACKWARD_KV_VARIANT, 32: (16, 32, 4, 2)}
#: Under ALiBi (alone or with a window and a softcap; its distance term costs
#: registers too): the variant tiles spilled at head_dim 32 on sm_90 (Triton
#: 3.8) and 64 on sm_80 (3.6, where 16 x 32 spills in the causal case too);
#: one pipeline stage for 32 and 64. The split-KV decode at head_dim 128
#: spilled on sm_90 under 3.9 with 32 keys a block: 16.
_BACKWARD_KV_ALIBI = {32: (32, 16, 4, 1), 64: (16, 32, 4, 1), 128: (16, 16, 4, 2),
                      256: (32, 32, 8, 1)}
_DECODE_ALIBI = {**_DECODE, 128: (16, 16, 4, 3)}


def backward_kv_config(block_d: int, variant: bool = False, softcap: bool = False,
                       alibi: bool = False) -> dict:
    """Launch parameters of the dK/dV kernel (BLOCK_N keys per program);
    ``variant``: a sliding window or a softcap, ``softcap``: a softcap,
    ``alibi``: ALiBi, with or without the others (narrower tiles)."""
    table = (_BACKWARD_KV_ALIBI if alibi else _BACKWARD_KV_SOFTCAP if softcap
             else _BACKWARD_KV_VARIANT if variant else _BACKWARD_KV)
    return _config(table, max(32, block_d))


def backward_q_config(block_d: int, softcap: bool = False) -> dict:
    """Launch parameters of the dQ kernel (BLOCK_M queries per program); a
    softcap's tanh and its derivative need narrower key blocks (64 spills
    on sm_80)."""
    config = _config(_BACKWARD_Q, max(32, block_d))
    if softcap and not interpreter_tiles():
        config["BLOCK_N"] = min(config["BLOCK_N"], 32)
    return config


@triton.jit
def _sequence(CU, b, seq_len, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence b."""
    if IS_VARLEN:
        first = tl.load(CU + b)
        length = tl.load(CU + b + 1) - first
    else:
        first = 0
        length = seq_len
    return first, length


@triton.jit
def _multiple(x, MULTIPLE: tl.constexpr):
    """x, a multiple of MULTIPLE, written so that the compiler knows it:
    (x // M) * M is x itself, and Triton's divisibility analysis sees the
    factor M (tl.multiple_of can't mark a kernel argument). At 16 nothing is
    needed: the JIT marks arguments that are multiples of 16 itself."""
    if MULTIPLE > 1 and MULTIPLE < 16:
        x = x // MULTIPLE * MULTIPLE
    return x


@triton.jit
def _multiples(batch, token, head, MULTIPLE: tl.constexpr):
    """A tensor's (batch, token, head) strides through _multiple."""
    return _multiple(batch, MULTIPLE), _multiple(token, MULTIPLE), _multiple(head, MULTIPLE)


@triton.jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr):
    """(scores in log2 units, d score / d (q.k scale)) of a tile: q.k scale,
    softcapped when SOFTCAP."""
    s = _dot(q, k, tl.zeros([q.shape[0], k.shape[1]], dtype=tl.float32))
    if SOFTCAP:  # (one return statement: the compiler wants one return type)
        t, slope = _tanh_and_derivative(s * scale / softcap)
        s = softcap * t * 1.4426950408889634
    else:
        s = s * (scale * 1.4426950408889634)
        slope = tl.full(s.shape, 1.0, tl.float32)
    return s, slope


@triton.jit
def _window(visible, offs_m, n, offset, window_left, window_right, WINDOW_LEFT: tl.constexpr,
            WINDOW_RIGHT: tl.constexpr):
    """visible & (query m sees key n) under the window's edges."""
    if WINDOW_RIGHT:
        visible = visible & (n[None, :] <= offs_m[:, None] + offset + window_right)
    if WINDOW_LEFT:
        visible = visible & (n[None, :] >= offs_m[:, None] + offset - window_left)
    return visible


@triton.jit
def _alibi_slope(ALIBI, b64, alibi_stride, h, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (sequence, head) in log2 units (0 without ALiBi)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b64 * alibi_stride + h) * 1.4426950408889634
    return slope


@triton.jit
def _alibi(s, slope, offs_m, n, offset):
    """Scores (log2 units) of queries offs_m x keys n less slope * |query +
    offset - key| (ALiBi)."""
    distance = (offs_m[:, None] + offset - n[None, :]).to(tl.float32)
    return s - slope * tl.abs(distance)


@triton.jit
def _key_rows(n, n_ok, TABLE, b64, table_stride, page_size, stride_kb, stride_kt, stride_vb,
              stride_vt, PAGED: tl.constexpr):
    """The element offsets of keys n of a sequence in K and in V, from its
    first key: token strides apart, or (PAGED: K/V are (pages, page_size,
    heads, head_dim), batch strides = page strides) row n % page_size of page
    TABLE[b, n // page_size]."""
    if PAGED:
        page = tl.load(TABLE + b64 * table_stride + n // page_size, mask=n_ok, other=0).to(tl.int64)
        within = (n % page_size).to(tl.int64)
        k_rows = page * stride_kb + within * stride_kt
        v_rows = page * stride_vb + within * stride_vt
    else:
        k_rows = n * stride_kt
        v_rows = n * stride_vt
    return k_rows, v_rows


@triton.jit
def attention_forward_kernel(
        Q, K, V, BIAS, ALIBI, O, LSE, CU_Q, CU_K, PARTIAL, TABLE,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
        stride_bb, stride_bh, stride_bq, stride_bk, stride_lb, stride_lh,
        seq_q, seq_k, group, head_dim, scale, keys_per_split, window_left, window_right, softcap,
        alibi_stride, table_stride, page_size,
        IS_VARLEN: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
        SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, D_MULTIPLE: tl.constexpr, PAGED: tl.constexpr = False,
        ALIGN_KEYS: tl.constexpr = False):
    # Program: (query block, or key split when SPLIT), head, sequence.
    # head_dim and the q/k/v/o strides are multiples of D_MULTIPLE (the
    # launcher's _vector_multiple): 16-byte loads where head_dim is not a
    # multiple of 16 (40, 72, ...), which Triton's own specialisation misses.
    head_dim = _multiple(head_dim, D_MULTIPLE)
    stride_qb, stride_qt, stride_qh = _multiples(stride_qb, stride_qt, stride_qh, D_MULTIPLE)
    stride_kb, stride_kt, stride_kh = _multiples(stride_kb, stride_kt, stride_kh, D_MULTIPLE)
    stride_vb, stride_vt, stride_vh = _multiples(stride_vb, stride_vt, stride_vh, D_MULTIPLE)
    stride_ob, stride_ot, stride_oh = _multiples(stride_ob, stride_ot, stride_oh, D_MULTIPLE)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group
    q_first, len_q = _sequence(CU_Q, b, seq_q, IS_VARLEN)
    k_first, len_k = _sequence(CU_K, b, seq_k, IS_VARLEN)
    if SPLIT:
        block_m = 0
        k_lo = pid * keys_per_split
        k_hi = tl.minimum(len_k, k_lo + keys_per_split)
    else:
        block_m = pid
        k_lo = 0
        k_hi = len_k
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < len_q
    offset = len_k - len_q
    if WINDOW_RIGHT:  # the block's last query sees up to its key + window_right
        k_hi = tl.minimum(k_hi, (block_m + 1) * BLOCK_M + offset + window_right)
    if WINDOW_LEFT:  # its first query from key - window_left on
        k_lo = tl.maximum(k_lo, block_m * BLOCK_M + offset - window_left)
        if ALIGN_KEYS:  # batch-invariant mode: the same key blocks for every query block
            k_lo = k_lo // BLOCK_N * BLOCK_N
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + tl.cast(q_first, tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    if PAGED:  # the block table places each key (CU_K gives the counts only)
        k_base = K + hk.to(tl.int64) * stride_kh
        v_base = V + hk.to(tl.int64) * stride_vh
    else:
        k_base = K + b64 * stride_kb + tl.cast(k_first, tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + tl.cast(k_first, tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias_base = BIAS + b64 * stride_bb + h.to(tl.int64) * stride_bh
    alibi = _alibi_slope(ALIBI, b64, alibi_stride, h, HAS_ALIBI)
    for start in range(k_lo, k_hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < k_hi
        k_rows, v_rows = _key_rows(n, n_ok, TABLE, b64, table_stride, page_size, stride_kb,
                                   stride_kt, stride_vb, stride_vt, PAGED)
        k = tl.load(k_base + k_rows[None, :] + offs_d[:, None],
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s, _ = _scores(q, k, scale, softcap, SOFTCAP)
        if HAS_BIAS:
            s += tl.load(bias_base + offs_m[:, None] * stride_bq + n[None, :] * stride_bk,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        if HAS_ALIBI:
            s = _alibi(s, alibi, offs_m, n, offset)
        visible = _window(n_ok[None, :], offs_m, n, offset, window_left, window_right, WINDOW_LEFT,
                          WINDOW_RIGHT)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing keeps m = -inf: exponents against 0 then.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc)
        m_i = m_new
    if SPLIT:
        # Unnormalised partial result: [sequence][head][split][row] (o..., m, l).
        splits = tl.num_programs(0)
        row = ((b64 * tl.num_programs(1) + h) * splits + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
        stride = BLOCK_D + 2
        tl.store(PARTIAL + row[:, None] * stride + offs_d[None, :], acc)
        tl.store(PARTIAL + row * stride + BLOCK_D, m_i)
        tl.store(PARTIAL + row * stride + BLOCK_D + 1, l_i)
    else:
        # l = 0 exactly when the row saw no key: zeros and lse = +inf. A NaN l
        # (a NaN or infinite score) is not that: the row and lse are NaN.
        seen = l_i != 0.0
        out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("inf"))
        o_base = O + b64 * stride_ob + tl.cast(q_first, tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_first
        tl.store(lse_base + offs_m, lse, mask=m_ok)


@triton.jit
def attention_combine_kernel(PARTIAL, O, LSE, CU_Q, stride_ob, stride_ot, stride_oh, stride_lb,
                             stride_lh, seq_q, head_dim, splits, IS_VARLEN: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = sum_i o_i 2^(m_i - m) / sum_i l_i 2^(m_i - m), m = max m_i, per row."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_first, len_q = _sequence(CU_Q, b, seq_q, IS_VARLEN)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    stride = BLOCK_D + 2
    b64 = b.to(tl.int64)
    base = (b64 * tl.num_programs(1) + h) * splits * BLOCK_M
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for i in range(0, splits):
        m = tl.maximum(m, tl.load(PARTIAL + (base + i * BLOCK_M + offs_m) * stride + BLOCK_D))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, splits):
        rows = base + i * BLOCK_M + offs_m
        w = tl.math.exp2(tl.load(PARTIAL + rows * stride + BLOCK_D) - m_safe)
        l += tl.load(PARTIAL + rows * stride + BLOCK_D + 1) * w
        acc += tl.load(PARTIAL + rows[:, None] * stride + offs_d[None, :]) * w[:, None]
    seen = l != 0.0  # NaN counts as seen, as in the forward kernel
    out = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m + tl.math.log2(tl.where(seen, l, 1.0))) * 0.6931471805599453,
                   float("inf"))
    m_ok = offs_m < len_q
    o_base = O + b64 * stride_ob + tl.cast(q_first, tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_first + offs_m, lse, mask=m_ok)


@triton.jit
def _probabilities(q, k, bias_ptrs, bias_mask, lse, offs_m, n, m_ok, n_ok, offset, scale,
                   window_left, window_right, softcap, alibi, HAS_BIAS: tl.constexpr,
                   WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr):
    """(P[m][n] = exp(s - lse) recomputed for a (queries x keys) tile, and
    d s / d (q.k scale): the softcap's 1 - tanh^2, or 1)."""
    s, slope = _scores(q, k, scale, softcap, SOFTCAP)
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_ALIBI:
        s = _alibi(s, alibi, offs_m, n, offset)
    visible = _window(m_ok[:, None] & n_ok[None, :], offs_m, n, offset, window_left, window_right,
                      WINDOW_LEFT, WINDOW_RIGHT)
    return tl.where(visible, tl.math.exp2(s - lse[:, None] * 1.4426950408889634), 0.0), slope


@triton.jit
def attention_backward_kv_kernel(
        Q, K, V, DO, BIAS, ALIBI, LSE, DELTA, DK, DV, CU_Q, CU_K,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
        stride_bb, stride_bh, stride_bq, stride_bk, stride_lb, stride_lh,
        seq_q, seq_k, group, head_dim, scale, window_left, window_right, softcap, alibi_stride,
        IS_VARLEN: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
        SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        D_MULTIPLE: tl.constexpr):
    """dK, dV for key block program_id(0) of kv head program_id(1), sequence
    program_id(2), summing over the query heads of its group. DO's strides
    are O's (grad_out is allocated like out)."""
    # head_dim and the q/k/v/o strides are multiples of D_MULTIPLE (the
    # launcher's _vector_multiple): 16-byte loads where head_dim is not a
    # multiple of 16 (40, 72, ...), which Triton's own specialisation misses.
    head_dim = _multiple(head_dim, D_MULTIPLE)
    stride_qb, stride_qt, stride_qh = _multiples(stride_qb, stride_qt, stride_qh, D_MULTIPLE)
    stride_kb, stride_kt, stride_kh = _multiples(stride_kb, stride_kt, stride_kh, D_MULTIPLE)
    stride_vb, stride_vt, stride_vh = _multiples(stride_vb, stride_vt, stride_vh, D_MULTIPLE)
    stride_ob, stride_ot, stride_oh = _multiples(stride_ob, stride_ot, stride_oh, D_MULTIPLE)
    block_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_first, len_q = _sequence(CU_Q, b, seq_q, IS_VARLEN)
    k_first, len_k = _sequence(CU_K, b, seq_k, IS_VARLEN)
    if block_n * BLOCK_N >= len_k:
        return
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_ok = offs_n < len_k
    offset = len_k - len_q
    b64 = b.to(tl.int64)
    k_base = K + b64 * stride_kb + tl.cast(k_first, tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + tl.cast(k_first, tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Queries that see any of these keys: t + offset + window_right >= the
    # first key, t + offset - window_left <= the last.
    m_lo = 0
    m_hi = len_q
    if WINDOW_RIGHT:
        m_lo = tl.maximum(block_n * BLOCK_N - offset - window_right, 0) // BLOCK_M * BLOCK_M
    if WINDOW_LEFT:
        m_hi = tl.minimum(len_q, (block_n + 1) * BLOCK_N - offset + window_left)
    for h in range(hk * group, (hk + 1) * group):
        h64 = tl.cast(h, tl.int64)
        q_base = Q + b64 * stride_qb + tl.cast(q_first, tl.int64) * stride_qt + h64 * stride_qh
        do_base = DO + b64 * stride_ob + tl.cast(q_first, tl.int64) * stride_ot + h64 * stride_oh
        stat = b64 * stride_lb + h64 * stride_lh + q_first
        alibi = _alibi_slope(ALIBI, b64, alibi_stride, h64, HAS_ALIBI)
        for start in range(m_lo, m_hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < len_q
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_ot + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + stat + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
            bias_ptrs = BIAS
            if HAS_BIAS:
                bias_ptrs = BIAS + b64 * stride_bb + h64 * stride_bh + offs_m[:, None] * stride_bq + \
                    offs_n[None, :] * stride_bk
            p, slope = _probabilities(q, tl.trans(k), bias_ptrs, m_ok[:, None] & n_ok[None, :],
                                      lse, offs_m, offs_n, m_ok, n_ok, offset, scale, window_left,
                                      window_right, softcap, alibi, HAS_BIAS, WINDOW_LEFT,
                                      WINDOW_RIGHT, SOFTCAP, HAS_ALIBI)
            dv = _dot(tl.trans(p).to(do.dtype), do, dv)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
            ds = p * (dp - delta[:, None]) * scale * slope
            dk = _dot(tl.trans(ds).to(q.dtype), q, dk)
    store_mask = n_ok[:, None] & d_ok[None, :]
    dk_base = DK + b64 * stride_kb + tl.cast(k_first, tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    dv_base = DV + b64 * stride_vb + tl.cast(k_first, tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    tl.store(dk_base + offs_n[:, None] * stride_kt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=store_mask)
    tl.store(dv_base + offs_n[:, None] * stride_vt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=store_mask)


@triton.jit
def attention_backward_q_kernel(
        Q, K, V, DO, BIAS, ALIBI, LSE, DELTA, DQ, CU_Q, CU_K,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
        stride_bb, stride_bh, stride_bq, stride_bk, stride_lb, stride_lh,
        seq_q, seq_k, group, head_dim, scale, window_left, window_right, softcap, alibi_stride,
        IS_VARLEN: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
        SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        D_MULTIPLE: tl.constexpr):
    """dQ for query block program_id(0) of head program_id(1), sequence
    program_id(2). DQ's strides are Q's."""
    # head_dim and the q/k/v/o strides are multiples of D_MULTIPLE (the
    # launcher's _vector_multiple): 16-byte loads where head_dim is not a
    # multiple of 16 (40, 72, ...), which Triton's own specialisation misses.
    head_dim = _multiple(head_dim, D_MULTIPLE)
    stride_qb, stride_qt, stride_qh = _multiples(stride_qb, stride_qt, stride_qh, D_MULTIPLE)
    stride_kb, stride_kt, stride_kh = _multiples(stride_kb, stride_kt, stride_kh, D_MULTIPLE)
    stride_vb, stride_vt, stride_vh = _multiples(stride_vb, stride_vt, stride_vh, D_MULTIPLE)
    stride_ob, stride_ot, stride_oh = _multiples(stride_ob, stride_ot, stride_oh, D_MULTIPLE)
    block_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group
    q_first, len_q = _sequence(CU_Q, b, seq_q, IS_VARLEN)
    k_first, len_k = _sequence(CU_K, b, seq_k, IS_VARLEN)
    if block_m * BLOCK_M >= len_q:
        return
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < len_q
    offset = len_k - len_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + tl.cast(q_first, tl.int64) * stride_qt + h64 * stride_qh
    do_base = DO + b64 * stride_ob + tl.cast(q_first, tl.int64) * stride_ot + h64 * stride_oh
    k_base = K + b64 * stride_kb + tl.cast(k_first, tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + tl.cast(k_first, tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=q_mask, other=0.0)
    stat = b64 * stride_lb + h64 * stride_lh + q_first
    lse = tl.load(LSE + stat + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    alibi = _alibi_slope(ALIBI, b64, alibi_stride, h64, HAS_ALIBI)
    k_lo = 0
    k_hi = len_k
    if WINDOW_RIGHT:
        k_hi = tl.minimum(len_k, (block_m + 1) * BLOCK_M + offset + window_right)
    if WINDOW_LEFT:
        k_lo = tl.maximum(0, block_m * BLOCK_M + offset - window_left)
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < len_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        bias_ptrs = BIAS
        if HAS_BIAS:
            bias_ptrs = BIAS + b64 * stride_bb + h64 * stride_bh + offs_m[:, None] * stride_bq + \
                offs_n[None, :] * stride_bk
        p, slope = _probabilities(q, tl.trans(k), bias_ptrs, m_ok[:, None] & n_ok[None, :], lse,
                                  offs_m, offs_n, m_ok, n_ok, offset, scale, window_left,
                                  window_right, softcap, alibi, HAS_BIAS, WINDOW_LEFT,
                                  WINDOW_RIGHT, SOFTCAP, HAS_ALIBI)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        ds = p * (dp - delta[:, None]) * scale * slope
        dq = _dot(ds.to(k.dtype), k, dq)
    dq_base = DQ + b64 * stride_qb + tl.cast(q_first, tl.int64) * stride_qt + h64 * stride_qh
    tl.store(dq_base + offs_m[:, None] * stride_qt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


# -- launchers ----------------------------------------------------------------

def _geometry(q, k, cu_q, cu_k, max_q, max_k):
    """(batch, seq_q, seq_k, heads, group, head_dim, token strides per tensor)."""
    varlen = cu_q is not None
    if varlen:
        batch, seq_q, seq_k = cu_q.numel() - 1, max_q, max_k
    else:
        batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    heads, heads_kv, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    return varlen, batch, seq_q, seq_k, heads, heads // heads_kv, head_dim


def _strides(t, varlen):
    """(batch, token, head) strides of q/k/v/out; batch 0 for varlen."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _vector_multiple(head_dim, *tensors):
    """The largest power of two, at most 16, that divides head_dim and every
    stride of ``tensors`` but the last (unit) one: the D_MULTIPLE hint."""
    values = [head_dim] + [s for t in tensors for s in t.stride()[:-1]]
    multiple = 16
    while multiple > 1 and any(v % multiple for v in values):
        multiple //= 2
    return multiple


def _bias_strides(bias):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _lse_strides(lse, varlen, heads, seq_q):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _head_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias(bias, batch, heads, seq_q, seq_k):
    return bias.expand(batch, heads, seq_q, seq_k) if bias is not None else None


def _variant(causal, window_left, window_right, softcap, alibi):
    """(runtime window/softcap/ALiBi arguments, their constexpr flags)."""
    right = 0 if causal else int(window_right)
    alibi_stride = alibi.shape[-1] if alibi is not None and alibi.dim() == 2 else 0
    args = (int(window_left), right, float(softcap) if softcap > 0 else 1.0, alibi_stride)
    flags = dict(WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=right >= 0, SOFTCAP=softcap > 0,
                 HAS_ALIBI=alibi is not None)
    return args, flags


def _alibi_slopes(alibi, q, batch, heads):
    """ALiBi slopes as the kernels read them: float32 (heads,) or (batch,
    heads), contiguous (checked as the C++ operators check them)."""
    if alibi is None:
        return None
    if alibi.dtype != torch.float32 or alibi.device != q.device or alibi.shape not in (
            (heads,), (batch, heads)):
        raise ValueError(f"pyllm::attention_triton: alibi_slopes must be float32 (heads,) = "
                         f"({heads},) or (batch, heads) = ({batch}, {heads}) on {q.device}, got "
                         f"{alibi.dtype} {tuple(alibi.shape)} on {alibi.device}")
    return alibi.contiguous()


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, scale,
              causal, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
              block_table=None):
    """The pyllm::attention_triton implementation: (out, lse) as pyllm::attention
    (block_table: k and v are (pages, page_size, heads_kv, head_dim) pages)."""
    q, k, v = _head_last(q), _head_last(k), _head_last(v)
    varlen, batch, seq_q, seq_k, heads, group, head_dim = _geometry(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (heads, q.shape[0]) if varlen else (batch, heads, seq_q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if batch == 0 or heads == 0 or seq_q == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    bias = _bias(bias, batch, heads, seq_q, seq_k)
    alibi = _alibi_slopes(alibi_slopes, q, batch, heads)
    alibi_arg = alibi if alibi is not None else lse  # a never-read placeholder
    cu_q = cu_seqlens_q if varlen else lse  # a never-read placeholder when dense
    cu_k = cu_seqlens_k if varlen else lse
    paged = block_table is not None
    kv_layout = varlen and not paged  # pages: (page, token, head) strides
    common = (*_strides(q, varlen), *_strides(k, kv_layout), *_strides(v, kv_layout),
              *_strides(out, varlen), *_bias_strides(bias), *_lse_strides(lse, varlen, heads, seq_q))
    variant, variant_flags = _variant(causal, window_left, window_right, softcap, alibi)
    table = block_table if paged else lse  # a never-read placeholder
    variant = (*variant, block_table.stride(0) if paged else 0, k.shape[1] if paged else 1)
    flags = dict(IS_VARLEN=varlen, HAS_BIAS=bias is not None, BLOCK_D=block_d,
                 D_MULTIPLE=_vector_multiple(head_dim, q, k, v, out), PAGED=paged, **variant_flags)
    invariant = is_batch_invariant()
    with on_device(q):
        # Batch-invariant mode: no split-KV decode; a decode query goes through
        # the prefill kernel, its key blocks aligned (ALIGN_KEYS), as in a prefill.
        if seq_q <= DECODE_MAX_QUERIES and not invariant:
            config = decode_config(block_d, alibi is not None)
            block_n = config["BLOCK_N"]
            # Splits: enough programs to fill the device, each at least 256 keys.
            programs = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count
                            if q.is_cuda else 1)
            splits = max(1, min(triton.cdiv(programs, batch * heads), triton.cdiv(seq_k, 256)))
            per_split = triton.cdiv(triton.cdiv(max(seq_k, 1), splits), block_n) * block_n
            splits = max(1, triton.cdiv(max(seq_k, 1), per_split))
            partial = torch.empty((batch, heads, splits, config["BLOCK_M"], block_d + 2),
                                  dtype=torch.float32, device=q.device)
            attention_forward_kernel[(splits, heads, batch)](
                q, k, v, bias if bias is not None else q, alibi_arg, out, lse, cu_q, cu_k, partial, table, *common,
                seq_q, seq_k, group, head_dim, scale, per_split, *variant, SPLIT=True, **flags,
                ALIGN_KEYS=False, **config)
            attention_combine_kernel[(1, heads, batch)](
                partial, out, lse, cu_q, *_strides(out, varlen),
                *_lse_strides(lse, varlen, heads, seq_q), seq_q, head_dim, splits,
                IS_VARLEN=varlen, BLOCK_M=config["BLOCK_M"], BLOCK_D=block_d)
        else:
            config = forward_config(block_d)
            grid = (triton.cdiv(seq_q, config["BLOCK_M"]), heads, batch)
            attention_forward_kernel[grid](
                q, k, v, bias if bias is not None else q, alibi_arg, out, lse, cu_q, cu_k, lse, table, *common,
                seq_q, seq_k, group, head_dim, scale, 0, *variant, SPLIT=False, **flags,
                ALIGN_KEYS=invariant and variant_flags["WINDOW_LEFT"], **config)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, bias, scale, causal, window_left=-1, window_right=-1,
                       softcap=0.0, alibi_slopes=None):
    """The pyllm::attention_backward_triton implementation: (dq, dk, dv)."""
    # Contiguous: the gradients are written with their inputs' strides, and
    # grad_out with out's.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    varlen, batch, seq_q, seq_k, heads, group, head_dim = _geometry(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O), laid out like lse
    delta = (delta.t() if varlen else delta.permute(0, 2, 1)).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if batch == 0 or heads == 0:
        return dq, dk, dv
    block_d = max(16, triton.next_power_of_2(head_dim))
    bias = _bias(bias, batch, heads, seq_q, seq_k)
    alibi = _alibi_slopes(alibi_slopes, q, batch, heads)
    alibi_arg = alibi if alibi is not None else lse  # a never-read placeholder
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    common = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
              *_strides(grad_out, varlen), *_bias_strides(bias),
              *_lse_strides(lse, varlen, heads, seq_q), seq_q, seq_k, group, head_dim, scale)
    variant, variant_flags = _variant(causal, window_left, window_right, softcap, alibi)
    common = (*common, *variant)
    flags = dict(IS_VARLEN=varlen, HAS_BIAS=bias is not None, BLOCK_D=block_d,
                 D_MULTIPLE=_vector_multiple(head_dim, q, k, v, grad_out), **variant_flags)
    bias_arg = bias if bias is not None else q
    variant = window_left >= 0 or (window_right >= 0 and not causal) or softcap > 0
    kv_config = backward_kv_config(block_d, variant, softcap > 0, alibi is not None)
    q_config = backward_q_config(block_d, softcap > 0)
    with on_device(q):
        attention_backward_kv_kernel[(triton.cdiv(max(seq_k, 1), kv_config["BLOCK_N"]),
                                      heads // group, batch)](
            q, k, v, grad_out, bias_arg, alibi_arg, lse, delta, dk, dv, cu_q, cu_k, *common, **flags,
            **kv_config)
        attention_backward_q_kernel[(triton.cdiv(max(seq_q, 1), q_config["BLOCK_M"]), heads,
                                     batch)](
            q, k, v, grad_out, bias_arg, alibi_arg, lse, delta, dq, cu_q, cu_k, *common, **flags, **q_config)
    return dq, dk, dv


register("attention_triton", attention)
register("attention_backward_triton", attention_backward)
