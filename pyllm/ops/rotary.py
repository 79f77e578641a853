"""Rotary position embeddings: :func:`rotary` (fused, in place on q and k),
:func:`rotary_tables` (the cos/sin tables, with the scaling types transformers
uses) and the Python registrations of ``pyllm::rotary``.

How an op is wired: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import math

import torch

from pyllm import backend as _backend
from pyllm.checks import check_tensor
from pyllm.ops.registry import declare

__all__ = ["rotary", "rotary_inv_freq", "rotary_tables", "ROPE_TYPES"]

#: The scaling types of :func:`rotary_inv_freq` (transformers' ``rope_type``).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_INDEX_DTYPES = (torch.int32, torch.int64)


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0, rope_parameters: dict | None = None,
                    *, max_position_embeddings: int | None = None, seq_len: int | None = None):
    """The inverse frequencies ``(rotary_dim // 2,)`` float32 and the attention
    factor (a float that scales cos and sin) of a rotary embedding.

    Args:
        rotary_dim: even, the rotated part of a head (``head_dim *
            partial_rotary_factor``).
        base: the frequency base (``rope_theta``).
        rope_parameters: transformers' rope parameters: ``rope_type`` one of
            :data:`ROPE_TYPES` (default ``"default"``) and that type's keys
            (``factor``; llama3: ``low_freq_factor``, ``high_freq_factor``,
            ``original_max_position_embeddings``; yarn: ``beta_fast``,
            ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``attention_factor``,
            ``original_max_position_embeddings``, ``truncate``).
        max_position_embeddings: the model's (dynamic and yarn need it).
        seq_len: dynamic NTK only: the sequence length the frequencies serve
            (they change past ``max_position_embeddings``).
    """
    params = dict(rope_parameters or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise NotImplementedError(f"pyllm.rotary_inv_freq: rope_type {kind!r} is not supported "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"pyllm.rotary_inv_freq: rotary_dim must be even and positive, got "
                         f"{rotary_dim}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    factor = params.get("factor")
    attention = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("pyllm.rotary_inv_freq: dynamic scaling needs max_position_embeddings")
        n = max(seq_len or max_position_embeddings, max_position_embeddings)
        scaled = base * ((factor * n / max_position_embeddings) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        inv_freq = 1.0 / (scaled ** exponents)
    elif kind == "llama3":
        old = params["original_max_position_embeddings"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        original = params["original_max_position_embeddings"]
        if factor is None:
            factor = max_position_embeddings / original

        def mscale_of(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = params.get("attention_factor")
        if attention is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = (float(mscale_of(factor, m) / mscale_of(factor, m_all)) if m and m_all
                         else mscale_of(factor))
        fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def correction_dim(rotations):
            return (rotary_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(fast), correction_dim(slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rotary_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        pos_freqs = base ** exponents
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.float(), float(attention)


def rotary_tables(rotary_dim: int, max_positions: int, base: float = 10000.0,
                  rope_parameters: dict | None = None, *, max_position_embeddings: int | None = None,
                  device=None):
    """``(cos, sin)``, each ``(max_positions, rotary_dim // 2)`` float32: the
    tables :func:`rotary` reads, angle ``position * inv_freq`` (of
    :func:`rotary_inv_freq`, arguments as there; dynamic NTK serves
    ``max_positions``), scaled by the attention factor."""
    inv_freq, attention = rotary_inv_freq(rotary_dim, base, rope_parameters,
                                          max_position_embeddings=max_position_embeddings,
                                          seq_len=max_positions)
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return ((angles.cos() * attention).to(device), (angles.sin() * attention).to(device))


def _check(op, q, k, cos, sin, positions):
    for name, t in (("q", q), ("k", k)):
        check_tensor(op, name, t, dim=4)
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{op}: {name} must have a contiguous last dimension (head_dim)")
    if k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"{op}: k must have q's dtype and device ({q.dtype}, {q.device}), got "
                        f"{k.dtype}, {k.device}")
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq "
                         "and head_dim")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, t, dtypes=(torch.float32,), dim=2)
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin must have one shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if not 1 <= 2 * cos.shape[1] <= q.shape[-1]:
        raise ValueError(f"{op}: cos/sin have {cos.shape[1]} columns: rotary_dim = 2 x that must "
                         f"be between 2 and head_dim {q.shape[-1]}")
    check_tensor(op, "positions", positions, dtypes=(torch.int64,), dim=2)
    if tuple(positions.shape) != tuple(q.shape[:2]) or positions.device != q.device:
        raise ValueError(f"{op}: positions must be int64 of shape {tuple(q.shape[:2])} on "
                         f"{q.device}, got {tuple(positions.shape)} on {positions.device}")


def _positions(op, q, positions, cu_seqlens, offset):
    """int64 (batch, seq) positions of q's tokens."""
    b, s = q.shape[:2]
    if cu_seqlens is not None:
        check_tensor(op, "cu_seqlens", cu_seqlens, dtypes=_INDEX_DTYPES, dim=1)
        if positions is not None:
            raise ValueError(f"{op}: give positions or cu_seqlens, not both")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        if cu.numel() < 1 or b != 1:
            raise ValueError(f"{op}: with cu_seqlens, q must be packed tokens (tokens, heads, "
                             "head_dim)")
        if (cu.device.type == "cpu" and not torch.compiler.is_compiling()) and (cu[0] != 0 or cu[-1] != s or (cu.diff() < 0).any()):
            raise ValueError(f"{op}: cu_seqlens must rise from 0 to the token count {s}, got "
                             f"{cu.tolist()}")
        token = torch.arange(s, device=q.device)
        sequence = torch.searchsorted(cu[1:], token, right=True)
        return (token - cu[sequence] + offset).view(1, s)
    if positions is None:
        return (torch.arange(s, device=q.device, dtype=torch.int64) + offset).expand(b, s).contiguous()
    check_tensor(op, "positions", positions, dtypes=_INDEX_DTYPES)
    positions = positions.to(device=q.device, dtype=torch.int64)
    if positions.dim() == 1:
        positions = positions.expand(b, -1)
    if tuple(positions.shape) != (b, s):
        raise ValueError(f"{op}: positions must have shape ({s},) or ({b}, {s}), got "
                         f"{tuple(positions.shape)}")
    return (positions + offset).contiguous()


def _no_heads(x):
    """An empty (batch, seq, 0, head_dim) partner for a call that rotates one tensor."""
    return x.new_empty((*x.shape[:2], 0, x.shape[3]))


class _Rotary(torch.autograd.Function):
    """One tensor rotated in place, differentiably (autograd supports an
    in-place Function on a view only with a single output: q and k go through
    one each, two launches; without autograd they share one)."""

    @staticmethod
    def forward(ctx, x, cos, sin, positions, interleaved, fn):
        fn(x, _no_heads(x), cos, sin, positions, interleaved, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.fn = interleaved, fn
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        # The rotation is orthogonal: its gradient is the rotation by minus the angle.
        g = grad.clone(memory_format=torch.contiguous_format)
        ctx.fn(g, _no_heads(g), cos, sin, positions, ctx.interleaved, True)
        return g, None, None, None, None, None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
           offset: int = 0, interleaved: bool = False, inplace: bool = True,
           backend: str | None = None):
    """Rotary position embedding of q and k in one pass, in place.

    Each head's first ``rotary_dim = 2 * cos.shape[1]`` elements are rotated
    by the angles of the token's position (the rest pass through, partial
    rotary): ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` with pairs
    ``(i, i + rotary_dim / 2)`` (GPT-NeoX, LLaMA; ``interleaved=False``) or
    ``(2i, 2i + 1)`` (GPT-J). Computed in float32, rounded once.

    Args:
        q: ``(batch, seq, heads, head_dim)`` or packed ``(tokens, heads,
            head_dim)``; float16, bfloat16, float32 (float64 on the reference
            backend); head_dim contiguous, other strides free.
        k: like q with ``heads_kv`` heads.
        cos, sin: ``(max_positions, rotary_dim // 2)`` float32 on q's device
            (:func:`rotary_tables`; any scaling is in them).
        positions: ``(seq,)`` or ``(batch, seq)`` int32/int64 positions; default
            ``arange(seq)``. Must lie in ``[0, max_positions)``: out-of-range
            positions raise on the CPU and give NaN in the rotated part on GPUs
            (never an out-of-bounds read).
        cu_seqlens: packed sequences (q 3-D): int32/int64 ``(batch + 1,)``
            cumulative lengths; each sequence's positions start at 0.
        offset: added to every position (tokens after a KV cache's).
        inplace: False rotates copies and leaves q and k unchanged.
        backend: see :mod:`pyllm.backend`.

    Returns:
        ``(q, k)`` rotated: the same tensors when ``inplace``. Differentiable in
        q and k (their gradients are rotated back); in place, q and k must not
        be leaves that require grad (as for any in-place op).
    """
    op = "pyllm.rotary"
    for name, t in (("q", q), ("k", k)):
        if type(t).__name__ == "DTensor":
            raise TypeError(f"{op}: {name} is a DTensor; rotary writes into q and k and has no "
                            "sharding rule (a redistributed copy would take the write): rotate "
                            "the local shards (to_local()) with their own positions")
        check_tensor(op, name, t, min_dim=3)
    if q.dim() != k.dim() or q.dim() > 4:
        raise ValueError(f"{op}: q and k must both be (batch, seq, heads, head_dim) or both "
                         f"(tokens, heads, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    packed = q.dim() == 3
    q4, k4 = (q.unsqueeze(0), k.unsqueeze(0)) if packed else (q, k)
    if not inplace:
        q4, k4 = q4.clone(), k4.clone()
    pos = _positions(op, q4, positions, cu_seqlens, offset)
    copies = [t.contiguous() if t.stride(-1) != 1 and t.shape[-1] > 1 else t for t in (q4, k4)]
    cos, sin = (t.contiguous() if isinstance(t, torch.Tensor) else t for t in (cos, sin))
    _check(op, copies[0], copies[1], cos, sin, pos)
    fn = _backend.route("rotary", q4, backend)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        rotated = []
        for t in copies:
            if t.requires_grad:
                rotated.append(_Rotary.apply(t, cos, sin, pos, interleaved, fn))
            else:
                fn(t, _no_heads(t), cos, sin, pos, interleaved, False)
                rotated.append(t)
        rq, rk = rotated
    else:
        fn(copies[0], copies[1], cos, sin, pos, interleaved, False)
        rq, rk = copies
    for src, dst in ((rq, q4), (rk, k4)):
        if src is not dst and src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    if packed:
        return q4.squeeze(0), k4.squeeze(0)
    return q4, k4


# -- fake kernel (torch.compile / FakeTensor) ---------------------------------

def _rotary_fake(q, k, cos, sin, positions, interleaved, conjugate):
    _check("pyllm::rotary", q, k, cos, sin, positions)


declare("rotary", fake=_rotary_fake, reference="rotary_op")
