"""Attention: :func:`attention`, :func:`attention_varlen` and the Python
registrations (fake kernels) of ``pyllm::attention`` and
``pyllm::attention_backward``.

How an op is wired, file by file: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import math

import torch

from pyllm import backend as _backend
from pyllm.ops.attention_sinks import attention_with_sinks, check_sinks
from pyllm.ops.registry import declare
from pyllm.checks import INT32_MAX, check_float, check_float_vector, check_tensor

__all__ = ["attention", "attention_varlen", "attention_paged", "MAX_HEAD_DIM"]

#: The largest head dimension the kernels take.
MAX_HEAD_DIM = 256


def _check_qkv(op, q, k, v, dim):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dim=dim)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"{op}: q, k and v must share head_dim {d}, got k {k.shape[-1]} and "
                         f"v {v.shape[-1]}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    heads, heads_kv = q.shape[-2], k.shape[-2]
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(f"{op}: the heads of k and v ({heads_kv}) must divide the heads of q "
                         f"({heads}) (grouped-query attention)")


def _check_scale(op, scale, head_dim) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_float(op, "scale", scale)


def _check_bias(op, bias, q, full_shape):
    """An additive float bias, or a bool mask (True = attend), broadcastable to
    (batch, heads, seq_q, seq_k); returns the additive bias."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor, got {type(bias).__name__}")
    if bias.device != q.device:
        raise ValueError(f"{op}: bias must be on q's device {q.device}, got {bias.device}")
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill_(
            ~bias, float("-inf"))
    elif bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{op}: bias must be {q.dtype}, float32 or bool, got {bias.dtype}")
    if bias.dim() > 4:
        raise ValueError(f"{op}: bias must broadcast to (batch, heads, seq_q, seq_k) = "
                         f"{full_shape}, got shape {tuple(bias.shape)}")
    try:
        broadcast = torch.broadcast_shapes(bias.shape, full_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(full_shape):
        raise ValueError(f"{op}: bias must broadcast to (batch, heads, seq_q, seq_k) = "
                         f"{full_shape}, got shape {tuple(bias.shape)}")
    if bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: bias gets no gradient from the attention kernels; pass "
                         f"bias.detach()")
    return bias


def _check_variant(op, causal, window_size, softcap):
    """(window_left, window_right, softcap) as the op takes them."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        raise TypeError(f"{op}: window_size must be a pair of ints (left, right), got "
                        f"{window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"{op}: window_size entries must be -1 (unbounded) or >= 0, got "
                         f"{tuple(window_size)}")
    if causal and right not in (-1, 0):
        raise ValueError(f"{op}: causal is window_size[1] = 0; got causal=True with "
                         f"window_size {tuple(window_size)}")
    softcap = check_float(op, "softcap", softcap, minimum=0.0)
    return int(left), int(right), float(softcap)


def _check_alibi(op, slopes, q, batch, heads):
    """ALiBi slopes as the kernels take them: float32 ``(heads,)`` or
    ``(batch, heads)`` (any float dtype given is converted), or None."""
    if slopes is None:
        return None
    check_float_vector(op, "alibi_slopes", slopes, q, [(heads,), (batch, heads)],
                       f"(heads,) = ({heads},) or (batch, heads) = ({batch}, {heads})")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: alibi_slopes get no gradient from the attention kernels; pass "
                         f"alibi_slopes.detach()")
    return slopes.float().contiguous()


def _check_index_range(op, what, tokens, heads, head_dim):
    if tokens * heads * head_dim > INT32_MAX:
        raise ValueError(f"{op}: {what} has {tokens} x {heads} x {head_dim} elements per "
                         f"sequence, more than the 2**31 - 1 that the kernels' 32-bit indexing "
                         f"allows")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, bias: torch.Tensor | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
              return_lse: bool = False, backend: str | None = None):
    """Scaled dot-product attention, FlashAttention-style (no seq_q x seq_k matrix).

    ``softmax(q k^T * scale + bias) v`` per head, over every key, or over
    keys ``j <= i + seq_k - seq_q`` for query ``i`` when causal (aligned to the
    bottom-right, as flash-attn: with a KV cache the last query sees every key).

    Args:
        q: ``(batch, seq_q, heads, head_dim)``, float16, bfloat16 or float32
            (float64 on the reference backend); head_dim at most 256.
        k, v: ``(batch, seq_k, heads_kv, head_dim)``, q's dtype; ``heads_kv``
            divides ``heads`` (grouped-query / multi-query attention, k and v
            not repeated in memory). Any strides with a contiguous head_dim
            (e.g. a slice of a larger KV cache).
        causal: mask the future (bottom-right aligned).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        bias: additive float (q's dtype or float32, ``-inf`` masks) or bool
            (True = attend) mask, broadcastable to ``(batch, heads, seq_q,
            seq_k)``; it gets no gradient.
        window_size: ``(left, right)`` sliding window, as flash-attn: query
            ``i`` sees keys ``i + seq_k - seq_q - left .. i + seq_k - seq_q +
            right``; -1 leaves that side unbounded; causal is ``right = 0``
            (Mistral, Gemma 2/3, gpt-oss: ``(W - 1, 0)`` for a window of W
            keys). Key blocks outside every query's window are skipped: the
            cost grows with ``seq x window``.
        softcap: Gemma 2's attention softcapping: scores become ``softcap *
            tanh(scores / softcap)`` (before the bias); 0 = none.
        sinks: attention sinks (gpt-oss's ``s_aux``): ``(heads,)``, any float
            dtype, a logit per head that joins every query's softmax with a
            zero value (not scaled); differentiable. ``lse`` then includes it.
        alibi_slopes: ALiBi (BLOOM, MPT), as flash-attn's: ``(heads,)`` or
            ``(batch, heads)`` slopes; ``-slope * |i + seq_k - seq_q - j|`` is
            added to query ``i``'s score of key ``j`` (after the softcap),
            computed in the kernels (no bias tensor); no gradient.
        return_lse: also return the log-sum-exp of the scaled scores.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``out``: ``(batch, seq_q, heads, head_dim)``, q's dtype; with
        ``return_lse``, ``(out, lse)`` with ``lse`` ``(batch, heads, seq_q)``
        float32. A query that sees no key (all masked) gives zeros and
        ``lse = +inf`` (``lse = sink`` with sinks). Differentiable in q, k and v.
    """
    op = "pyllm.attention"
    _check_qkv(op, q, k, v, 4)
    batch, seq_q, heads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{op}: q and k must have one batch size, got {batch} and {k.shape[0]}")
    seq_k = k.shape[1]
    _check_index_range(op, "q", seq_q, heads, head_dim)
    _check_index_range(op, "k", seq_k, k.shape[2], head_dim)
    scale = _check_scale(op, scale, head_dim)
    bias = _check_bias(op, bias, q, (batch, heads, seq_q, seq_k))
    variant = _check_variant(op, causal, window_size, softcap)
    sinks = check_sinks(op, sinks, q, heads)
    alibi = _check_alibi(op, alibi_slopes, q, batch, heads)
    fn = _backend.route("attention", q, backend)
    args = (None, None, seq_q, seq_k, bias, scale, bool(causal), *variant, alibi)
    if sinks is None:
        out, lse = fn(q, k, v, *args)
    else:
        out, lse = attention_with_sinks(fn, q, k, v, sinks, args)
    return (out, lse) if return_lse else out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *,
                     causal: bool = False, scale: float | None = None,
                     bias: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, sinks: torch.Tensor | None = None,
                     alibi_slopes: torch.Tensor | None = None, return_lse: bool = False,
                     backend: str | None = None):
    """Attention over a batch of sequences of different lengths, packed without padding
    (as ``flash_attn_varlen_func``).

    Args:
        q: ``(total_q, heads, head_dim)``; k, v: ``(total_k, heads_kv, head_dim)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 on q's device,
            cumulative lengths from 0: sequence ``i`` is rows ``cu[i]:cu[i+1]``.
            A sequence may be empty.
        max_seqlen_q, max_seqlen_k: the longest lengths (computed when None).
        causal, scale, window_size, softcap, sinks, alibi_slopes, return_lse,
            backend: as :func:`attention`, per sequence (``(batch, heads)``
            slopes: one row per sequence).
        bias: broadcastable to ``(batch, heads, max_seqlen_q, max_seqlen_k)``;
            sequence ``i`` uses its top-left ``(len_q_i, len_k_i)`` corner.

    Returns:
        ``out`` ``(total_q, heads, head_dim)``; with ``return_lse``, ``(out,
        lse)`` with ``lse`` ``(heads, total_q)`` float32.
    """
    op = "pyllm.attention_varlen"
    _check_qkv(op, q, k, v, 3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(op, name, cu, dtypes=(torch.int32,), dim=1)
        if cu.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {cu.device}")
        if cu.shape[0] < 1:
            raise ValueError(f"{op}: {name} must hold batch + 1 >= 1 values")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), "
                         f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    lengths_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    if max_seqlen_q is None:
        max_seqlen_q = int(lengths_q.max()) if lengths_q.numel() else 0
    if max_seqlen_k is None:
        max_seqlen_k = int(lengths_k.max()) if lengths_k.numel() else 0
    batch, heads, head_dim = cu_seqlens_q.shape[0] - 1, q.shape[1], q.shape[2]
    _check_index_range(op, "q", max_seqlen_q, heads, head_dim)
    _check_index_range(op, "k", max_seqlen_k, k.shape[1], head_dim)
    scale = _check_scale(op, scale, head_dim)
    bias = _check_bias(op, bias, q, (batch, heads, max_seqlen_q, max_seqlen_k))
    variant = _check_variant(op, causal, window_size, softcap)
    sinks = check_sinks(op, sinks, q, heads)
    alibi = _check_alibi(op, alibi_slopes, q, batch, heads)
    fn = _backend.route("attention", q, backend)
    if type(q).__name__ == "DTensor":  # the index tensors replicated with it
        from pyllm.distributed import replicated_like

        cu_seqlens_q, cu_seqlens_k = (replicated_like(c, q) for c in (cu_seqlens_q, cu_seqlens_k))
    args = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bias, scale,
            bool(causal), *variant, alibi)
    if sinks is None:
        out, lse = fn(q, k, v, *args)
    else:
        out, lse = attention_with_sinks(fn, q, k, v, sinks, args)
    return (out, lse) if return_lse else out


def _check_pages(op, q, k_pages, v_pages, block_table, seqlens_k):
    """Checks the paged cache's tensors; returns (batch, page_size)."""
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        check_tensor(op, name, t, dim=4)
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"{op}: k_pages and v_pages must have one shape (pages, page_size, "
                         f"heads_kv, head_dim), got {tuple(k_pages.shape)} and "
                         f"{tuple(v_pages.shape)}")
    check_tensor(op, "block_table", block_table, dtypes=(torch.int32,), dim=2)
    check_tensor(op, "seqlens_k", seqlens_k, dtypes=(torch.int32,), dim=1)
    for name, t in (("block_table", block_table), ("seqlens_k", seqlens_k)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    batch = block_table.shape[0]
    if seqlens_k.shape[0] != batch:
        raise ValueError(f"{op}: seqlens_k must have one length per block_table row ({batch}), "
                         f"got {seqlens_k.shape[0]}")
    if k_pages.shape[1] < 1:
        raise ValueError(f"{op}: k_pages must hold pages of at least one token")
    return batch, k_pages.shape[1]


def _check_page_numbers(op, block_table, seqlens_k, page_size, pages):
    """The pages a sequence's keys use are pages of the cache (a host sync;
    the C++ operators check this themselves)."""
    if block_table.numel() == 0:
        return
    used = (seqlens_k.long() + page_size - 1) // page_size
    if bool((used > block_table.shape[1]).any()):
        s = int((used > block_table.shape[1]).nonzero()[0, 0])
        raise ValueError(f"{op}: sequence {s} has {int(seqlens_k[s])} keys, more than its "
                         f"{block_table.shape[1]} pages of {page_size} hold")
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    bad = (columns[None, :] < used[:, None]) & ((block_table < 0) | (block_table >= pages))
    if bool(bad.any()):
        s, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{op}: block_table[{s}, {i}] = {int(block_table[s, i])} is not a page "
                         f"(0 <= page < {pages})")


def attention_paged(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_table: torch.Tensor, seqlens_k: torch.Tensor, *,
                    cu_seqlens_q: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                    max_seqlen_k: int | None = None, causal: bool = False,
                    scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0, sinks: torch.Tensor | None = None,
                    alibi_slopes: torch.Tensor | None = None, return_lse: bool = False,
                    backend: str | None = None):
    """Attention over a paged KV cache (as ``flash_attn_with_kvcache`` with a
    ``block_table``, or FlashInfer's paged decode/prefill): decode and chunked
    prefill for a batch of sequences of different lengths, without padding.

    Sequence ``s``'s key ``i`` is row ``i % page_size`` of page
    ``block_table[s, i // page_size]``; its queries are its last keys'
    positions (causal and windows aligned to the bottom-right: with the new
    tokens appended first, query ``t`` of ``len_q`` sits at position
    ``seqlens_k[s] - len_q + t``).

    Args:
        q: ``(batch, seq_q, heads, head_dim)`` (``seq_q`` queries per
            sequence; 1 to decode), or ``(total_q, heads, head_dim)`` packed
            with ``cu_seqlens_q`` (chunks of different lengths). float16,
            bfloat16 or float32.
        k_pages, v_pages: ``(pages, page_size, heads_kv, head_dim)``, q's dtype;
            any page size (multiples of 16 read fastest); any strides with a
            contiguous head_dim.
        block_table: ``(batch, pages_per_sequence)`` int32, the pages of each
            sequence in order (entries past its keys are not read).
        seqlens_k: ``(batch,)`` int32, the keys of each sequence.
        cu_seqlens_q: ``(batch + 1,)`` int32 cumulative query counts (packed q).
        max_seqlen_q, max_seqlen_k: the longest counts (computed when None).
        causal, scale, window_size, softcap, sinks, alibi_slopes, return_lse,
            backend: as :func:`attention`.

    Returns:
        ``out`` shaped like q, q's dtype; with ``return_lse``, ``(out, lse)``,
        ``lse`` float32 ``(batch, heads, seq_q)`` (dense q) or ``(heads,
        total_q)`` (packed). Not differentiable (an inference path): q, k, v
        must not require a gradient where grad mode is on; sinks may.
    """
    op = "pyllm.attention_paged"
    packed = cu_seqlens_q is not None
    check_tensor(op, "q", q, dim=3 if packed else 4)
    batch, page_size = _check_pages(op, q, k_pages, v_pages, block_table, seqlens_k)
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if k_pages.shape[-1] != d:
        raise ValueError(f"{op}: q and the pages must share head_dim {d}, got "
                         f"{k_pages.shape[-1]}")
    heads, heads_kv = q.shape[-2], k_pages.shape[2]
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(f"{op}: the heads of the pages ({heads_kv}) must divide the heads of q "
                         f"({heads}) (grouped-query attention)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_pages, v_pages)):
        raise ValueError(f"{op}: no gradient through a paged KV cache; call it under "
                         f"torch.no_grad() or pass detached tensors")
    if packed:
        check_tensor(op, "cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), dim=1)
        if cu_seqlens_q.device != q.device:
            raise ValueError(f"{op}: cu_seqlens_q must be on q's device {q.device}, got "
                             f"{cu_seqlens_q.device}")
        if cu_seqlens_q.shape[0] != batch + 1:
            raise ValueError(f"{op}: cu_seqlens_q must hold batch + 1 = {batch + 1} values, got "
                             f"{cu_seqlens_q.shape[0]}")
        q_flat = q
    else:
        if q.shape[0] != batch:
            raise ValueError(f"{op}: q has {q.shape[0]} sequences, block_table {batch}")
        seq_q = q.shape[1]
        max_seqlen_q = seq_q
        cu_seqlens_q = torch.arange(0, (batch + 1) * seq_q, max(seq_q, 1), dtype=torch.int32,
                                    device=q.device)[:batch + 1]
        if seq_q == 0:
            cu_seqlens_q = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        q_flat = q.reshape(batch * seq_q, heads, d)
    if bool((seqlens_k < 0).any()) if seqlens_k.numel() else False:
        raise ValueError(f"{op}: seqlens_k must not be negative")
    cu_seqlens_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(seqlens_k, 0, out=cu_seqlens_k[1:])
    if max_seqlen_q is None:
        lengths_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        max_seqlen_q = int(lengths_q.max()) if batch else 0
    if max_seqlen_k is None:
        max_seqlen_k = int(seqlens_k.max()) if batch else 0
    _check_index_range(op, "q", max_seqlen_q, heads, d)
    scale = _check_scale(op, scale, d)
    variant = _check_variant(op, causal, window_size, softcap)
    sinks = check_sinks(op, sinks, q, heads)
    alibi = _check_alibi(op, alibi_slopes, q, batch, heads)
    block_table = block_table.contiguous()  # rows read as arrays by every kernel
    fn = _backend.route("attention", q, backend)
    if fn is not torch.ops.pyllm.attention.default:  # the C++ operators check it themselves
        _check_page_numbers(op, block_table, seqlens_k, page_size, k_pages.shape[0])
    args = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), None, scale,
            bool(causal), *variant, alibi, block_table)
    if sinks is None:
        out, lse = fn(q_flat, k_pages, v_pages, *args)
    else:
        out, lse = attention_with_sinks(fn, q_flat, k_pages, v_pages, sinks, args)
    if not packed:
        out = out.view(q.shape)
        lse = lse.view(heads, batch, q.shape[1]).permute(1, 0, 2)
    return (out, lse) if return_lse else out


# -- fake kernels -------------------------------------------------------------

def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, scale,
                    causal, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                    block_table=None):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32, device=q.device)
    return out, lse


def _attention_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, bias, scale, causal, window_left=-1,
                             window_right=-1, softcap=0.0, alibi_slopes=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


declare("attention", fake=_attention_fake, reference="attention_op",
        helpers={"attention_backward": _attention_backward_fake})
