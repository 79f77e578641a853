"""Cross-entropy: :func:`cross_entropy` (fused softmax, loss and gradient) and
:func:`linear_cross_entropy` (the LM head's GEMM and the loss in chunks of
tokens, never materialising the whole ``tokens x vocab`` logits), and the
Python registrations of ``pyllm::cross_entropy``.

How an op is wired: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyllm import backend as _backend
from pyllm.checks import check_float, check_tensor
from pyllm.ops.registry import declare

__all__ = ["cross_entropy", "linear_cross_entropy", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
_TARGET_DTYPES = (torch.int64, torch.int32)
#: linear_cross_entropy's chunk: at most an eighth of the rows (so that its
#: logits stay under an eighth of the unfused ones), at least this many rows
#: (small GEMMs run below the machine's rate), all rows when that covers them.
CHUNK_MIN_ROWS = 1024


def _options(op, ignore_index, label_smoothing, reduction, z_loss, softcap):
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    label_smoothing = check_float(op, "label_smoothing", label_smoothing, minimum=0.0)
    if label_smoothing > 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got "
                         f"{reduction!r}")
    z_loss = check_float(op, "z_loss", z_loss, minimum=0.0)
    if softcap is not None:
        softcap = check_float(op, "softcap", softcap, minimum=0.0)
        if softcap == 0.0:
            raise ValueError(f"{op}: softcap must be positive or None, got 0")
    return label_smoothing, z_loss, softcap or 0.0


def _check_target(op, target, rows, device):
    check_tensor(op, "target", target, dtypes=_TARGET_DTYPES, dim=1)
    if target.shape[0] != rows:
        raise ValueError(f"{op}: target must have one entry per row ({rows}), got "
                         f"{tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{op}: target must be on {device}, got {target.device}")
    return target.long().contiguous()


def _reduce(loss, target, ignore_index, reduction):
    """(reduced loss, the factor d reduced / d loss_i for mean/sum)."""
    if reduction == "none":
        return loss, None
    if reduction == "sum":
        return loss.sum(), 1.0
    count = (target != ignore_index).sum()
    return loss.sum() / count, 1.0 / count


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, smoothing, z_loss, softcap, reduction, fn):
        loss, _, grad = fn(logits, target, ignore_index, smoothing, z_loss, softcap, True)
        out, factor = _reduce(loss, target, ignore_index, reduction)
        ctx.save_for_backward(grad)
        ctx.factor = factor
        return out.to(logits.dtype) if reduction != "none" else loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.factor is None:  # reduction none: each row's own upstream gradient
            scaled = (grad.float() * grad_out.float()[:, None]).to(grad.dtype)
        else:
            # a float32 0-dim factor: one pass in the gradient's dtype, the
            # product computed in float32 and rounded once
            scaled = grad * (grad_out.float() * ctx.factor)
        return scaled, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                  softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of rows of logits, softmax, loss and gradient in one pass.

    ``loss_i = lse_i - (1 - label_smoothing) z_it - label_smoothing mean_j z_ij
    + z_loss lse_i^2`` with ``z = softcap tanh(logits / softcap)`` when a
    softcap is given and ``lse`` the logsumexp of z, in float32. Same result as
    ``torch.nn.functional.cross_entropy`` (``ignore_index``, ``label_smoothing``,
    ``reduction``) when ``z_loss = 0`` and no softcap.

    Args:
        logits: ``(rows, vocab)`` (or ``(..., vocab)``, flattened), float16,
            bfloat16 or float32 (float64 on the reference backend); the vocab
            dimension contiguous.
        target: ``(rows,)`` int64/int32 class indices in ``[0, vocab)`` or
            ``ignore_index``.
        reduction: ``"mean"`` (over the rows not ignored; NaN when all are),
            ``"sum"`` or ``"none"`` (``(rows,)``, float32).
        z_loss: weight of ``lse**2`` (PaLM's z-loss), default 0.
        softcap: Gemma 2's final-logit softcapping, or None.
        backend: see :mod:`pyllm.backend`.

    Returns the loss: a scalar in logits' dtype (mean, sum) or ``(rows,)``
    float32 (none). Differentiable in logits; the gradient is computed in the
    forward (the logits are not kept), in logits' dtype.
    """
    op = "pyllm.cross_entropy"
    check_tensor(op, "logits", logits, min_dim=1)
    smoothing, z_loss, softcap = _options(op, ignore_index, label_smoothing, reduction, z_loss,
                                          softcap)
    logits2 = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits
    if logits2.shape[-1] > 1 and logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    if logits2.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have at least one class")
    if logits.dim() > 2 and tuple(target.shape) != tuple(logits.shape[:-1]):
        # classes are the last dimension here, not dim 1 as in F.cross_entropy
        raise ValueError(f"{op}: target must have logits' shape without the last (class) "
                         f"dimension, {tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    target = _check_target(op, target.reshape(-1) if target.dim() > 1 else target,
                           logits2.shape[0], logits.device)
    fn = _backend.route("cross_entropy", logits2, backend)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropy.apply(logits2, target, ignore_index, smoothing, z_loss, softcap,
                                   reduction, fn)
    loss, _, _ = fn(logits2, target, ignore_index, smoothing, z_loss, softcap, False)
    out, _ = _reduce(loss, target, ignore_index, reduction)
    return out.to(logits.dtype) if reduction != "none" else loss


# -- linear + cross-entropy, chunked ----------------------------------------------------

def _chunk_rows(rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(rows, max(CHUNK_MIN_ROWS, -(-rows // 8))))


def _chunks(rows, size):
    return [(s, min(rows, s + size)) for s in range(0, rows, size)]


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: per chunk of rows the logits, the rows' losses and (mean, sum)
    their gradients, turned at once into the chunk's grad_hidden and added to
    grad_weight and grad_bias (float32): the backward only scales them.
    Reduction none: the forward computes losses only; the backward recomputes
    each chunk's logits with the rows' own upstream gradients (grad_weight
    depends on them, so nothing can be computed ahead)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, smoothing, z_loss, softcap,
                reduction, chunk, fn):
        need = ctx.needs_input_grad
        ctx.reduction, ctx.chunk, ctx.fn = reduction, chunk, fn
        ctx.options = (ignore_index, smoothing, z_loss, softcap)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        want = (need[0], need[1], bias is not None and need[2])
        eager = reduction != "none" and any(want)
        loss, grads = _chunked(hidden, weight, bias, target, ctx.options, chunk, fn,
                               want if eager else (False, False, False), None)
        out, ctx.factor = _reduce(loss, target, ignore_index, reduction)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
            return loss
        ctx.save_for_backward(*grads)
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            need = ctx.needs_input_grad
            want = (need[0], need[1], bias is not None and need[2])
            _, grads = _chunked(hidden, weight, bias, target, ctx.options, ctx.chunk, ctx.fn,
                                want, grad_out)
            scale = None
        else:
            grads = ctx.saved_tensors
            scale = grad_out.float() * ctx.factor
        out = []
        for g, dtype in zip(grads, (grads[0].dtype if grads[0] is not None else None,
                                    *ctx.dtypes)):
            if g is not None and scale is not None:
                # a fresh tensor (the saved ones stay as they are, for a second
                # backward), scaled in place; a float32 sum is narrowed first,
                # so no second float32 copy of grad_weight is ever made
                g = g * scale if g.dtype == dtype else g.to(dtype).mul_(scale)
            elif g is not None:
                g = g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None, None, None, None)


#: Vocabulary rows per block of the grad_weight product (its temporary).
WEIGHT_BLOCK = 8192


def _chunked(hidden, weight, bias, target, options, chunk, fn, want, grad_out):
    """Losses of every row, and the gradients selected by ``want`` (hidden,
    weight, bias), each row's scaled by ``grad_out[row]`` when given."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    chunks = _chunks(rows, chunk)
    loss = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want[0] else None
    # one chunk: grad_weight is one product, as the unfused composition's
    single = len(chunks) == 1
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if want[1] and not single else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if want[2] else None
    for s, e in chunks:
        h = hidden[s:e]
        loss[s:e], _, g = fn(F.linear(h, weight, bias), target[s:e], *options, any(want))
        if not any(want):
            continue
        if grad_out is not None:
            g = (g.float() * grad_out[s:e].float()[:, None]).to(g.dtype)
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[s:e])
        if want[1] and single:
            grad_weight = torch.mm(g.t(), h)
        elif grad_weight is not None and g.dtype == torch.float32:
            grad_weight.addmm_(g.t(), h)
        elif grad_weight is not None:
            for v0 in range(0, vocab, WEIGHT_BLOCK):  # low-precision partials, added in float32
                v1 = min(vocab, v0 + WEIGHT_BLOCK)
                grad_weight[v0:v1] += torch.mm(g[:, v0:v1].t(), h)
        if grad_bias is not None:
            grad_bias += g.float().sum(0)
    return loss, (grad_hidden, grad_weight, grad_bias)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         z_loss: float = 0.0, softcap: float | None = None,
                         chunk_size: int | None = None,
                         backend: str | None = None) -> torch.Tensor:
    """The LM head and the cross-entropy fused: ``cross_entropy(hidden @
    weight.T + bias, target)`` computed a chunk of rows at a time, so that the
    whole ``(rows, vocab)`` logits never exist (as Liger-Kernel's fused linear
    cross-entropy).

    Args:
        hidden: ``(rows, hidden)`` (or ``(..., hidden)``, flattened), float16,
            bfloat16 or float32.
        weight: ``(vocab, hidden)`` of hidden's dtype; bias: ``(vocab,)`` or None.
        target, ignore_index, label_smoothing, reduction, z_loss, softcap,
            backend: as :func:`cross_entropy` (the backend runs the loss kernel;
            the GEMMs are PyTorch's, accumulating in float32).
        chunk_size: rows per chunk; default: an eighth of the rows, at least
            1024 (all of them when fewer).

    Returns the loss as :func:`cross_entropy`. Differentiable in hidden,
    weight and bias: for mean and sum the gradients are computed during the
    forward (grad_weight accumulated in float32); for none the backward
    recomputes each chunk's logits with the rows' own upstream gradients.
    """
    op = "pyllm.linear_cross_entropy"
    check_tensor(op, "hidden", hidden, min_dim=1)
    check_tensor(op, "weight", weight, dim=2)
    check_tensor(op, "bias", bias, dim=1, optional=True)
    smoothing, z_loss, softcap = _options(op, ignore_index, label_smoothing, reduction, z_loss,
                                          softcap)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be (vocab, {hidden.shape[-1]}), got "
                         f"{tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"{op}: {name} must have hidden's dtype and device ({hidden.dtype}, "
                            f"{hidden.device}), got {t.dtype}, {t.device}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: the vocabulary (weight's rows) must not be empty")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    target = _check_target(op, target.reshape(-1) if target.dim() > 1 else target,
                           hidden2.shape[0], hidden.device)
    chunk = _chunk_rows(hidden2.shape[0], weight.shape[0], chunk_size)
    probe = hidden2.new_empty((0, weight.shape[0]))
    fn = _backend.route("cross_entropy", probe, backend)
    return _LinearCrossEntropy.apply(hidden2, weight, bias, target, ignore_index, smoothing,
                                     z_loss, softcap, reduction, chunk, fn)


# -- fake kernel (torch.compile / FakeTensor) ---------------------------------

def _cross_entropy_fake(logits, target, ignore_index, label_smoothing, z_loss, softcap, want_grad):
    rows = logits.shape[0]
    stats = logits.new_empty((rows,), dtype=torch.float32)
    grad = logits.new_empty(logits.shape) if want_grad else logits.new_empty((0,))
    return stats, logits.new_empty((rows,), dtype=torch.float32), grad


declare("cross_entropy", fake=_cross_entropy_fake, reference="cross_entropy_op")
