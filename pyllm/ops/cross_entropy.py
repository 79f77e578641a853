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
from pyllm.invariance import is_batch_invariant
from pyllm.ops.registry import declare

__all__ = ["cross_entropy", "linear_cross_entropy", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
_TARGET_DTYPES = (torch.int64, torch.int32)


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


def _mean_factor(count):
    """``1 / count`` (the rows not ignored, a 0-dim tensor) in float32, 0 when
    every row is ignored (the mean is then NaN and, as in PyTorch, the
    gradient is 0)."""
    count = count.float()
    return torch.where(count > 0, 1.0 / count.clamp(min=1.0), torch.zeros_like(count))


def _reduce(loss, target, ignore_index, reduction):
    """(reduced loss, the factor d reduced / d loss_i for mean/sum)."""
    if reduction == "none":
        return loss, None
    if reduction == "sum":
        return loss.sum(), 1.0
    count = (target != ignore_index).sum()
    return loss.sum() / count, _mean_factor(count)


def _scale_rows(grad, factor, out):
    """out = grad * factor (rows, 1) float32, grad and out 16-bit: in blocks of
    rows through a float32 buffer (ATen's mixed-dtype product straight into a
    16-bit out runs element by element, ~10x slower); rounded once."""
    rows, vocab = grad.shape
    step = max(1, (1 << 20) // max(vocab, 1))
    buffer = torch.empty(min(step, rows), vocab, dtype=torch.float32)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        torch.mul(grad[r:r + n], factor[r:r + n], out=buffer[:n])
        out[r:r + n].copy_(buffer[:n])


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
        # reduction none: each row's own upstream gradient; else a float32
        # 0-dim factor. Either way one pass, the product in float32 rounded
        # once to the gradient's dtype.
        factor = grad_out.float()[:, None] if ctx.factor is None else grad_out.float() * ctx.factor
        if (type(grad) is torch.Tensor and grad.device.type == "cpu"
                and not torch.compiler.is_compiling()):  # plain tensors (not DTensor)
            # into memory from the CPU kernels' output cache: a fresh
            # logits-sized gradient (411 MB for GPT-2's 2048 x 50257) faults
            # its pages in at ~2 GB/s, several times the product itself
            scaled = _allocator(grad)(grad.shape, grad.dtype)
            if grad.dtype == torch.float32 or ctx.factor is not None:
                torch.mul(grad, factor, out=scaled)
            else:
                _scale_rows(grad, factor, scaled)
            return scaled, None, None, None, None, None, None, None
        if ctx.factor is None:
            scaled = (grad.float() * factor).to(grad.dtype)
        else:
            scaled = grad * factor
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

#: linear_cross_entropy's chunk: a 32nd of the rows (its logits and their
#: gradient, the only tokens x vocab buffers, stay under a 16th of the unfused
#: logits; grad_weight is rounded once per chunk, at most 32 times), at least
#: this many rows (smaller GEMMs run below the machine's rate), all rows when
#: that covers them.
CHUNK_MIN_ROWS = 256
MAX_CHUNKS = 32


def _chunk_rows(rows: int, hidden: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if 2 * rows <= hidden:  # all the logits and their gradient fit in grad_weight's size
        return max(1, rows)
    return max(1, min(rows, max(CHUNK_MIN_ROWS, -(-rows // MAX_CHUNKS))))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean and sum: the forward computes, per chunk of rows, the logits, the
    rows' losses and their gradient (already scaled by the reduction's factor),
    and turns that at once into the chunk's grad_hidden and a term of
    grad_weight and grad_bias, accumulated in their own dtype; the backward
    only scales these by the upstream gradient, in place, and hands them over
    (no second copy of grad_weight is ever made; a second backward through the
    same loss raises). Reduction none: the forward computes the losses only;
    the backward recomputes each chunk's logits with the rows' own upstream
    gradients (grad_weight depends on them, so nothing can be computed ahead)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, smoothing, z_loss, softcap,
                reduction, chunk, fn, gemm, out_dtype):
        need = ctx.needs_input_grad
        ctx.reduction, ctx.chunk, ctx.fn, ctx.gemm = reduction, chunk, fn, gemm
        ctx.options = (ignore_index, smoothing, z_loss, softcap)
        want = (need[0], need[1], bias is not None and need[2])
        eager = reduction != "none" and any(want)
        factor = None
        if eager and reduction == "mean":
            factor = _mean_factor((target != ignore_index).sum())
            if factor.device.type != "cpu" and not torch.compiler.is_compiling():
                # a CPU scalar multiplies in float32 on every device; a device
                # one would be rounded to the gradient's dtype first
                factor = factor.cpu()
        loss, grads = _chunked(hidden, weight, bias, target, ctx.options, chunk, fn, gemm,
                               want if eager else (False, False, False), factor)
        out, _ = _reduce(loss, target, ignore_index, reduction)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
            return loss
        # kept on ctx, not saved: the backward hands these very tensors over
        ctx.grads = list(grads)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            need = ctx.needs_input_grad
            want = (need[0], need[1], bias is not None and need[2])
            _, grads = _chunked(hidden, weight, bias, target, ctx.options, ctx.chunk, ctx.fn,
                                ctx.gemm, want, grad_out)
        else:
            grads = getattr(ctx, "grads", None)
            if grads is None:
                raise RuntimeError(
                    "pyllm.linear_cross_entropy: its gradients are computed in the forward and "
                    "handed over by the first backward; a second backward through the same "
                    "loss (retain_graph) is not supported: compute the loss again")
            ctx.grads = None
            unit = (grad_out.device.type == "cpu" and not torch.compiler.is_compiling()
                    and float(grad_out) == 1.0)  # loss.backward(): nothing to scale
            for g in grads:
                if g is not None and not unit:
                    g.mul_(grad_out)  # in place: grad_weight is never copied
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def _allocator(like: torch.Tensor):
    """``empty(shape, dtype)`` on like's device: for CPU tensors, from the CPU
    kernels' output cache (pyllm.memory: memory whose pages are mapped
    already, where a fresh gradient of the LM head's weight would fault in
    hundreds of MB at first write), else torch.empty."""
    if like.device.type == "cpu" and not torch.compiler.is_compiling():
        from pyllm import _C

        return lambda shape, dtype: _C.empty_output(list(shape), dtype)
    return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=like.device)


def _chunked(hidden, weight, bias, target, options, chunk, fn, gemm, want, scale):
    """Losses of every row, and the gradients selected by ``want`` (hidden,
    weight, bias), in their inputs' dtypes. ``scale``: None, a float32 0-dim
    factor of every row's gradient (the mean's), or ``(rows,)`` (each row's
    upstream gradient, for reduction none). The logits of a chunk live in one
    buffer reused by every chunk; grad_weight accumulates in weight's dtype,
    each chunk's GEMM adding in float32 and rounding once. ``gemm``: None, or
    (batch-invariant mode) the backend's linear op, which computes the logits
    instead of torch.mm (whose path depends on the chunk's rows)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    empty = _allocator(hidden)
    loss = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = empty(hidden.shape, hidden.dtype) if want[0] else None
    grad_weight = empty(weight.shape, weight.dtype) if want[1] and rows else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if want[2] else None
    buffer = empty((min(rows, chunk), vocab), hidden.dtype)
    # A scalar factor (the mean's) is the GEMMs' alpha, applied to their
    # float32 sums before the one rounding (no pass over the gradient); a
    # per-row one (reduction none) scales the gradient first, in float32,
    # rounded once. Under torch.compile, the scalar one does that too.
    alpha = 1.0
    if scale is not None and scale.dim() == 0 and scale.device.type == "cpu" and \
            not torch.compiler.is_compiling():
        alpha, scale = float(scale), None
    for s in range(0, rows, chunk):
        e = min(rows, s + chunk)
        h, logits = hidden[s:e], buffer[:e - s]
        if gemm is not None:
            logits = gemm(h, weight, bias, "none")
        elif bias is not None:
            torch.addmm(bias, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        loss[s:e], _, g = fn(logits, target[s:e], *options, any(want))
        if not any(want):
            continue
        if scale is not None:  # in float32, rounded once
            g.mul_(scale[s:e, None] if scale.dim() else scale)
        if grad_hidden is not None:  # beta 0: the uninitialised output is not read
            torch.addmm(grad_hidden[s:e], g, weight, beta=0, alpha=alpha, out=grad_hidden[s:e])
        if want[1]:
            grad_weight.addmm_(g.t(), h, beta=0 if s == 0 else 1, alpha=alpha)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=torch.float32) * alpha
        del g
    if grad_weight is None and want[1]:  # no rows
        grad_weight = torch.zeros_like(weight)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, (grad_hidden, grad_weight, grad_bias)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         z_loss: float = 0.0, softcap: float | None = None,
                         chunk_size: int | None = None, out_dtype: torch.dtype | None = None,
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
        chunk_size: rows per chunk; default: a 32nd of the rows, at least
            256 (all of them when fewer, or when there are at most hidden / 2:
            their logits and gradient then take no more than grad_weight).
            Peak extra memory: grad_weight and grad_hidden plus two
            ``(chunk, vocab)`` buffers.
        out_dtype: dtype of a mean or sum loss: hidden's by default (as
            ``F.cross_entropy(F.linear(...))``; float32 under ``torch.autocast``,
            where hidden, weight and bias are cast to autocast's dtype), or
            float32 as transformers' losses (the sum is float32 inside
            either way).

    Returns the loss as :func:`cross_entropy`. Differentiable in hidden,
    weight and bias: for mean and sum the gradients are computed during the
    forward (grad_weight accumulated in weight's dtype, each chunk's GEMM
    adding its term in float32 and rounding once) and handed over by the
    backward, so a second backward through the same loss raises; for none
    the backward recomputes each chunk's logits with the rows' own upstream
    gradients.
    """
    op = "pyllm.linear_cross_entropy"
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # as F.linear (in autocast's dtype) + F.cross_entropy (float32) under autocast
        device = hidden.device.type
        low = torch.get_autocast_dtype(device)
        cast = lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() \
            else t  # noqa: E731
        with torch.autocast(device, enabled=False):
            return linear_cross_entropy(
                cast(hidden), cast(weight), target, cast(bias), ignore_index=ignore_index,
                label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                softcap=softcap, chunk_size=chunk_size, out_dtype=out_dtype or torch.float32,
                backend=backend)
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
    chunk = _chunk_rows(hidden2.shape[0], hidden2.shape[1], chunk_size)
    probe = hidden2.new_empty((0, weight.shape[0]))
    fn = _backend.route("cross_entropy", probe, backend)
    gemm = _backend.route("linear", hidden2[:0], backend) if is_batch_invariant() else None
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype)
                                      and out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype must be a floating torch.dtype or None, got "
                        f"{out_dtype!r}")
    return _LinearCrossEntropy.apply(hidden2, weight, bias, target, ignore_index, smoothing,
                                     z_loss, softcap, reduction, chunk, fn, gemm,
                                     out_dtype or hidden.dtype)


# -- fake kernel (torch.compile / FakeTensor) ---------------------------------

def _cross_entropy_fake(logits, target, ignore_index, label_smoothing, z_loss, softcap, want_grad):
    rows = logits.shape[0]
    stats = logits.new_empty((rows,), dtype=torch.float32)
    grad = logits.new_empty(logits.shape) if want_grad else logits.new_empty((0,))
    return stats, logits.new_empty((rows,), dtype=torch.float32), grad


declare("cross_entropy", fake=_cross_entropy_fake, reference="cross_entropy_op")
