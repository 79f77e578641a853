"""Plain-PyTorch reference implementations of every pyllm op.

These are the truth the kernels are held to (tests call them with float64
inputs) and the ``reference`` backend (any device, any floating dtype). Each
function takes the arguments of its op and returns what the op returns.
Half-precision inputs are computed in float32 and float32 inputs in float64,
each rounded once at the end (so that the reference backend stays accurate
where a composite of float32 ops would cancel, e.g. the gradient of a
one-element LayerNorm); float64 inputs are computed in float64.

Layouts follow the ops: normalisation over the last dimension; attention in
``(batch, seq, heads, head_dim)``, or ``(total_tokens, heads, head_dim)`` with
``cu_seqlens`` for variable-length batches; linear weights ``(out, in)`` as in
``torch.nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "rms_norm",
    "add_rms_norm",
    "layer_norm",
    "add_layer_norm",
    "linear",
    "swiglu",
    "attention",
    "attention_varlen",
    "attention_op",
    "rotary",
    "rotary_op",
    "cross_entropy_rows",
    "cross_entropy_op",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.float32) else torch.float32


def _stat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Statistics (mean, rstd, lse) are float32, float64 for float64 inputs."""
    return t if dtype == torch.float64 else t.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float):
    """RMSNorm over the last dimension.

    Args:
        x: ``(..., n)`` floating tensor.
        weight: ``(n,)`` or None.
        eps: added to the mean square.

    Returns:
        ``(y, rstd)``: ``y`` like ``x``; ``rstd = 1/sqrt(mean(x^2) + eps)`` with
        shape ``x.shape[:-1]``, float32 (float64 for float64 input).
    """
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(x.dtype), _stat(rstd.squeeze(-1), x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 eps: float):
    """RMSNorm of ``x + residual``, also returning the sum for the next residual.

    Returns:
        ``(y, sum, rstd)``; ``sum = x + residual`` rounded to ``x.dtype``, and
        ``y`` is the RMSNorm of that rounded sum.
    """
    total = (x.to(_compute_dtype(x.dtype)) + residual.to(_compute_dtype(x.dtype))).to(x.dtype)
    y, rstd = rms_norm(total, weight, eps)
    return y, total, rstd


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float):
    """LayerNorm over the last dimension.

    Args:
        x: ``(..., n)``; weight, bias: ``(n,)`` or None.

    Returns:
        ``(y, mean, rstd)``; mean and rstd have shape ``x.shape[:-1]``, float32
        (float64 for float64 input).
    """
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean) * rstd
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype), _stat(mean.squeeze(-1), x.dtype), _stat(rstd.squeeze(-1), x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float):
    """LayerNorm of ``x + residual``; returns ``(y, sum, mean, rstd)``."""
    total = (x.to(_compute_dtype(x.dtype)) + residual.to(_compute_dtype(x.dtype))).to(x.dtype)
    y, mean, rstd = layer_norm(total, weight, bias, eps)
    return y, total, mean, rstd


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu(x):
    # gelu(+inf) = +inf, as PyTorch computes it in float64 (its float32 CPU
    # kernel gives NaN there).
    return torch.where(torch.isposinf(x), x, F.gelu(x))


ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none"):
    """``act(x @ weight.T + bias)``.

    Args:
        x: ``(..., in)``; weight: ``(out, in)``; bias: ``(out,)`` or None.
        activation: one of ``"none"``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"``.

    Returns:
        ``(..., out)`` in ``x.dtype``.
    """
    ct = _compute_dtype(x.dtype)
    y = x.to(ct) @ weight.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return ACTIVATIONS[activation](y).to(x.dtype)


def swiglu(x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
           bias_gate: torch.Tensor | None = None, bias_up: torch.Tensor | None = None):
    """The SwiGLU gate: ``silu(x @ weight_gate.T + bias_gate) * (x @ weight_up.T + bias_up)``.

    Args:
        x: ``(..., in)``; weight_gate, weight_up: ``(out, in)``; biases ``(out,)`` or None.

    Returns:
        ``(..., out)`` in ``x.dtype``.
    """
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    gate = xf @ weight_gate.to(ct).T
    up = xf @ weight_up.to(ct).T
    if bias_gate is not None:
        gate = gate + bias_gate.to(ct)
    if bias_up is not None:
        up = up + bias_up.to(ct)
    return (F.silu(gate) * up).to(x.dtype)


def _attention_one(q, k, v, causal, scale, bias, window=(-1, -1), softcap=0.0, sinks=None,
                   alibi=None):
    """q: (h, sq, d), k/v: (h, sk, d) already expanded to q's heads; bias (h, sq, sk) or None;
    sinks (h,) or None: one more logit per row, with a zero value; alibi (h,) slopes or None."""
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    sq, sk = q.shape[-2], k.shape[-2]
    left, right = window[0], 0 if causal else window[1]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # bottom-right aligned
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi is not None:
        s = s - alibi.to(s.dtype).view(-1, 1, 1) * (i - j).abs().to(s.dtype)
    if right >= 0:  # query i sees keys j <= i + (sk - sq) + right
        s = s.masked_fill(j > i + right, float("-inf"))
    if left >= 0:
        s = s.masked_fill(j < i - left, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(s, dim=-1)
    else:
        column = sinks.to(s.dtype).view(-1, 1, 1).expand(*s.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([s, column], dim=-1), dim=-1)
    # A score of +inf (an Inf in q or k) makes the row NaN, and its lse too:
    # lse = +inf is kept for rows that see no key.
    lse = lse.masked_fill(torch.isposinf(lse), float("nan"))
    empty = torch.isneginf(lse)  # rows that see no key at all
    p = torch.exp(s - lse.masked_fill(empty, 0.0)[..., None])
    p = p.masked_fill(empty[..., None], 0.0)
    out = p @ v
    return out, lse.masked_fill(empty, float("inf"))


def _expand_kv(k, heads):
    """(..., heads_kv, d) -> (..., heads, d): each kv head serves heads/heads_kv q heads."""
    return k.repeat_interleave(heads // k.shape[-2], dim=-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, bias: torch.Tensor | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None):
    """Scaled dot-product attention.

    Args:
        q: ``(batch, seq_q, heads, head_dim)``.
        k, v: ``(batch, seq_k, heads_kv, head_dim)``; ``heads_kv`` divides ``heads``
            (grouped-query / multi-query attention).
        causal: mask aligned to the bottom-right: query ``i`` sees keys
            ``j <= i + seq_k - seq_q`` (as flash-attn).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        bias: additive, broadcastable to ``(batch, heads, seq_q, seq_k)``
            (``-inf`` masks a position).
        window_size: ``(left, right)``: query ``i`` sees keys ``i + seq_k -
            seq_q - left <= j <= i + seq_k - seq_q + right`` (-1: unbounded;
            causal is right = 0).
        softcap: > 0: scores ``softcap * tanh(scores / softcap)`` before the bias.
        sinks: ``(heads,)``: a logit per head that joins every row's softmax
            with a zero value (gpt-oss); ``lse`` includes it.
        alibi_slopes: ``(heads,)`` or ``(batch, heads)``: ``-slope * |i +
            seq_k - seq_q - j|`` added to the scores (after the softcap).

    Returns:
        ``(out, lse)``: ``out`` ``(batch, seq_q, heads, head_dim)`` in ``q.dtype``;
        ``lse`` ``(batch, heads, seq_q)`` float32 (float64 for float64 input), the
        log-sum-exp of the scaled scores. A row that sees no key gives zeros in
        ``out`` and ``+inf`` in ``lse``.
    """
    ct = _compute_dtype(q.dtype)
    b, sq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.to(ct).transpose(1, 2)
    kf = _expand_kv(k.to(ct), h).transpose(1, 2)
    vf = _expand_kv(v.to(ct), h).transpose(1, 2)
    bf = None
    if bias is not None:
        bf = bias.to(ct).expand(b, h, sq, k.shape[1])
    if alibi_slopes is None:
        out, lse = _attention_one(qf, kf, vf, causal, scale, bf, window_size, softcap,
                                  None if sinks is None else sinks.to(ct))
    else:  # slopes per sequence: one batch entry at a time
        slopes = alibi_slopes.to(ct).expand(b, h)
        parts = [_attention_one(qf[n], kf[n], vf[n], causal, scale,
                                None if bf is None else bf[n], window_size, softcap,
                                None if sinks is None else sinks.to(ct), slopes[n])
                 for n in range(b)]
        out = torch.stack([o for o, _ in parts]) if parts else qf.new_zeros(qf.shape)
        lse = torch.stack([l for _, l in parts]) if parts else qf.new_zeros(qf.shape[:-1])
    return out.transpose(1, 2).to(q.dtype), _stat(lse, q.dtype)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
                     causal: bool = False, scale: float | None = None,
                     bias: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, sinks: torch.Tensor | None = None,
                     alibi_slopes: torch.Tensor | None = None):
    """Attention over a batch of sequences of different lengths, packed.

    Args:
        q: ``(total_q, heads, head_dim)``; k, v: ``(total_k, heads_kv, head_dim)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 cumulative lengths,
            starting at 0; sequence ``i`` is rows ``cu[i]:cu[i+1]``.
        bias: broadcastable to ``(batch, heads, max_seqlen_q, max_seqlen_k)``;
            sequence ``i`` uses its top-left ``(len_q_i, len_k_i)`` corner.

    Returns:
        ``(out, lse)``: ``out`` ``(total_q, heads, head_dim)``; ``lse``
        ``(heads, total_q)``. Same conventions as :func:`attention`.
    """
    ct = _compute_dtype(q.dtype)
    h, d = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    batch = len(cq) - 1
    out = torch.zeros(q.shape, dtype=ct, device=q.device)
    lse = torch.zeros((h, q.shape[0]), dtype=ct, device=q.device)
    max_q = max((cq[i + 1] - cq[i] for i in range(batch)), default=0)
    max_k = max((ck[i + 1] - ck[i] for i in range(batch)), default=0)
    full_bias = None
    if bias is not None:
        full_bias = bias.to(ct).expand(batch, h, max_q, max_k)
    for i in range(batch):
        qs = q[cq[i]:cq[i + 1]].to(ct).transpose(0, 1)
        ks = _expand_kv(k[ck[i]:ck[i + 1]].to(ct), h).transpose(0, 1)
        vs = _expand_kv(v[ck[i]:ck[i + 1]].to(ct), h).transpose(0, 1)
        bi = None
        if full_bias is not None:
            bi = full_bias[i, :, :qs.shape[1], :ks.shape[1]]
        o, l = _attention_one(qs, ks, vs, causal, scale, bi, window_size, softcap,
                              None if sinks is None else sinks.to(ct),
                              None if alibi_slopes is None else alibi_slopes.to(ct).expand(
                                  batch, h)[i])
        out[cq[i]:cq[i + 1]] = o.transpose(0, 1)
        lse[:, cq[i]:cq[i + 1]] = l
    return out.to(q.dtype), _stat(lse, q.dtype)


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor,
                 seqlens: torch.Tensor) -> torch.Tensor:
    """The keys (or values) of a paged cache packed by sequence: ``(sum(seqlens),
    heads, head_dim)`` from ``pages`` ``(pages, page_size, heads, head_dim)``,
    ``block_table`` ``(batch, pages_per_sequence)`` and ``seqlens`` ``(batch,)``."""
    page_size = pages.shape[1]
    rows = []
    for s, length in enumerate(seqlens.tolist()):
        positions = torch.arange(length, device=pages.device)
        page = block_table[s].long()[positions // page_size]
        rows.append(pages[page, positions % page_size])
    if not rows:
        return pages.new_empty((0, *pages.shape[2:]))
    return torch.cat(rows)


def attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, scale,
                 causal, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                 block_table=None, sinks=None):
    """:func:`attention` or :func:`attention_varlen` with the arguments of the
    ``pyllm::attention`` op (the reference backend's implementation of it),
    and the sinks that the kernels' callers fold in (pyllm.ops.attention_sinks).
    With a block_table, k and v are pages, gathered first."""
    variant = dict(window_size=(window_left, window_right), softcap=softcap, sinks=sinks,
                   alibi_slopes=alibi_slopes)
    if block_table is not None:
        seqlens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        k = gather_pages(k, block_table, seqlens)
        v = gather_pages(v, block_table, seqlens)
    if cu_seqlens_q is None:
        return attention(q, k, v, causal=causal, scale=scale, bias=bias, **variant)
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                            bias=bias, **variant)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
           interleaved: bool = False, conjugate: bool = False) -> torch.Tensor:
    """Rotary position embedding of ``x`` (a new tensor).

    Args:
        x: ``(batch, seq, heads, head_dim)``.
        cos, sin: ``(max_positions, rotary_dim // 2)``, ``rotary_dim <= head_dim``.
        positions: ``(batch, seq)`` integers in ``[0, max_positions)``.
        interleaved: pairs ``(2i, 2i + 1)`` (GPT-J) instead of ``(i, i +
            rotary_dim // 2)`` (GPT-NeoX, LLaMA).
        conjugate: rotate by minus the angle.

    Returns ``x`` rotated, ``x.dtype``: computed in float64 for float64 input,
    else float32, rounded once; the last ``head_dim - rotary_dim`` elements of
    every head unchanged.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[-1]
    c = cos.to(ct)[positions][:, :, None, :]  # (batch, seq, 1, half)
    s = sin.to(ct)[positions][:, :, None, :]
    if conjugate:
        s = -s
    rot = x[..., :2 * half].to(ct)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    y = torch.stack([y1, y2], dim=-1).flatten(-2) if interleaved else torch.cat([y1, y2], dim=-1)
    return torch.cat([y.to(x.dtype), x[..., 2 * half:]], dim=-1)


def paged_kv_append_op(k_pages, v_pages, k, v, slots, cos, sin, positions, interleaved):
    """pyllm::paged_kv_append's signature: k (rotated by :func:`rotary` when
    cos is given) and v written to rows ``slots % page_size`` of pages
    ``slots // page_size`` (slots < 0 skipped)."""
    if cos is not None:
        k = rotary(k[None], cos, sin, positions[None], interleaved=interleaved)[0]
    keep = slots >= 0
    page_size = k_pages.shape[1]
    page, row = slots[keep] // page_size, slots[keep] % page_size
    k_pages[page, row] = k[keep]
    v_pages[page, row] = v[keep]


def rotary_op(q, k, cos, sin, positions, interleaved, conjugate):
    """pyllm::rotary's signature: q and k rotated in place by :func:`rotary`."""
    for x in (q, k):
        x.copy_(rotary(x, cos, sin, positions, interleaved=interleaved, conjugate=conjugate))


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                       label_smoothing: float = 0.0, z_loss: float = 0.0,
                       softcap: float | None = None):
    """Per-row cross-entropy (differentiable, plain autograd).

    Args:
        logits: ``(rows, vocab)``; target: ``(rows,)`` integers, ``ignore_index``
            marking rows without a loss.
        label_smoothing: PyTorch's: the target distribution is ``1 -
            label_smoothing`` on the target plus ``label_smoothing / vocab``
            everywhere.
        z_loss: adds ``z_loss * lse**2`` (PaLM's z-loss).
        softcap: logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).

    Returns ``(loss, lse)``, each ``(rows,)`` in float32 (float64 for float64
    logits); ignored rows give 0 and 0.
    """
    ct = _compute_dtype(logits.dtype)
    z = logits.to(ct)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target)).long()
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    nll = -logp.gather(1, safe[:, None])[:, 0]
    loss = (1 - label_smoothing) * nll + z_loss * lse * lse
    if label_smoothing:  # (not 0 x inf where a logit is -inf)
        loss = loss - label_smoothing * logp.mean(-1)
    zero = torch.zeros((), dtype=ct, device=logits.device)
    return torch.where(keep, loss, zero), torch.where(keep, lse, zero)


def cross_entropy_op(logits, target, ignore_index, label_smoothing, z_loss, softcap, want_grad):
    """pyllm::cross_entropy's signature: (loss, lse, grad of each row's loss)."""
    leaf = logits.detach().requires_grad_(want_grad)
    with torch.enable_grad():
        loss, lse = cross_entropy_rows(leaf, target, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, z_loss=z_loss,
                                       softcap=softcap or None)
        loss, lse = _stat(loss, logits.dtype), _stat(lse, logits.dtype)
        if not want_grad:
            return loss.detach(), lse.detach(), logits.new_empty(0)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), lse.detach(), grad.to(logits.dtype)
