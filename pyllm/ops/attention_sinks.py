"""Attention sinks (gpt-oss's ``s_aux``): a learned logit per head that joins
every query's softmax denominator with a zero value, so that a query can
attend to "nothing".

A sink is one more key whose value is zero, so it changes no kernel: the
kernels compute ``(out0, lse0)`` without it and the sink folds in after,

    lse = logaddexp(lse0, sink),  out = out0 * exp(lse0 - lse),

which is exactly the attention with the sink. The backward kernels, given
that ``out`` and ``lse``, compute the exact dq, dk, dv of the attention with
the sink: their ``P = exp(scores - lse)`` and ``D = rowsum(dout * out)`` are
the sink attention's (the sink's own ``dP`` is zero, its value being zero).
The sink's gradient is ``dsink = -sum over rows of exp(sink - lse) * D``.
"""

from __future__ import annotations

import torch

from pyllm.checks import check_float_vector

__all__ = ["check_sinks", "fold", "sink_grad", "attention_with_sinks"]


def check_sinks(op: str, sinks, q: torch.Tensor, heads: int):
    """``sinks`` as given (a float tensor ``(heads,)`` on q's device), or None."""
    if sinks is None:
        return None
    check_float_vector(op, "sinks", sinks, q, [(heads,)], f"(heads,) = ({heads},)")
    return sinks


def _per_row(sinks: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """sinks (heads,) in float64, shaped to broadcast over lse: dense (batch,
    heads, seq_q), varlen (heads, total_q)."""
    s = sinks.double()
    return s.view(1, -1, 1) if lse.dim() == 3 else s.view(-1, 1)


def _as_out(factor: torch.Tensor) -> torch.Tensor:
    """A per-row factor in lse's layout, shaped to broadcast over out."""
    if factor.dim() == 3:  # (batch, heads, seq_q) -> (batch, seq_q, heads, 1)
        return factor.transpose(1, 2).unsqueeze(-1)
    return factor.t().unsqueeze(-1)  # (heads, total_q) -> (total_q, heads, 1)


def fold(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """``(out, lse)`` of attention without sinks -> with them.

    ``out`` ``(batch, seq_q, heads, head_dim)`` or ``(total_q, heads,
    head_dim)``; ``lse`` float32 ``(batch, heads, seq_q)`` or ``(heads,
    total_q)``, ``+inf`` for a row that saw no key; ``sinks`` ``(heads,)``.
    Returns new ``(out, lse)``: a row that saw no key gives zeros and ``lse =
    sink`` (``+inf`` kept where the sink is ``-inf`` too); a sink of ``+inf``
    or NaN makes its rows NaN, as the softmax over the scores and the sink."""
    # float64, so that lse is rounded once (the sink's gradient and the
    # backward's P read it)
    s = _per_row(sinks, lse)
    keys = lse.double().masked_fill(torch.isposinf(lse), float("-inf"))  # log of the keys' sum
    total = torch.logaddexp(keys, s)
    total = total.masked_fill(torch.isposinf(s).expand_as(total), float("nan"))
    factor = torch.exp(keys - total)
    total = total.masked_fill(torch.isneginf(total), float("inf"))  # no key, sink -inf
    factor = factor.nan_to_num(nan=0.0).masked_fill(torch.isnan(total), float("nan"))
    return (out.float() * _as_out(factor).float()).to(out.dtype), total.float()


def sink_grad(grad_out: torch.Tensor, out: torch.Tensor, keys_lse: torch.Tensor,
              sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks, ``(heads,)`` in sinks' dtype, from the folded ``out``
    (:func:`fold`), ``grad_out`` (out's shape) and the kernel's lse of the
    keys alone, ``keys_lse`` (before the fold): the sink's share of a row is
    ``sigmoid(sink - keys_lse)``, which damps keys_lse's rounding by
    ``p (1 - p)``; computed in float64."""
    d = (grad_out.double() * out.double()).sum(-1)  # (batch, seq_q, heads) or (total_q, heads)
    d = d.transpose(1, 2) if d.dim() == 3 else d.t()  # lse's layout
    # a row that saw no key (+inf) has out = 0, so d = 0: its share is moot
    p_sink = torch.sigmoid(_per_row(sinks, keys_lse) - keys_lse.double())
    g = -(p_sink * d)
    dims = (0, 2) if keys_lse.dim() == 3 else (1,)
    return g.sum(dims).to(sinks.dtype)


def _backward_of(forward_op):
    """pyllm::attention[_triton]'s backward op (compared by identity, which
    torch.compile traces; reading the op's schema it does not)."""
    ops = torch.ops.pyllm
    if forward_op is ops.attention.default:
        return ops.attention_backward.default
    if forward_op is ops.attention_triton.default:
        return ops.attention_backward_triton.default
    raise TypeError(f"pyllm.attention: no backward known for {forward_op}")


class _AttentionWithSinks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, forward_op, backward_op, args):
        out, keys_lse = forward_op(q, k, v, *args)
        out, lse = fold(out, keys_lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, keys_lse, sinks)
        ctx.args = args
        ctx.backward_op = backward_op
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, keys_lse, sinks = ctx.saved_tensors
        dq = dk = dv = dsinks = None
        if any(ctx.needs_input_grad[:3]):
            dq, dk, dv = ctx.backward_op(grad_out, q, k, v, out, lse, *ctx.args)
        if ctx.needs_input_grad[3]:
            dsinks = sink_grad(grad_out, out, keys_lse, sinks)
        return dq, dk, dv, dsinks, None, None, None


def attention_with_sinks(fn, q, k, v, sinks, args):
    """``fn(q, k, v, *args)`` (a backend's ``pyllm::attention``) with the
    sinks folded in; differentiable in q, k, v and sinks. ``fn`` a reference
    function takes them itself."""
    if not isinstance(fn, torch._ops.OpOverload):
        return fn(q, k, v, *args, sinks=sinks)
    return _AttentionWithSinks.apply(q, k, v, sinks, fn, _backward_of(fn), tuple(args))
