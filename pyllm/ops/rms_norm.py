"""RMSNorm: :func:`rms_norm`, :func:`add_rms_norm` and the Python registrations
of ``pyllm::rms_norm``, ``pyllm::add_rms_norm`` and ``pyllm::rms_norm_backward``.

The op's stations: schema ``csrc/ops.cpp``; validation
(``pyllm/ops/norm_args.py``), fake kernels and autograd here; route
``pyllm/backend.py``; kernels ``csrc/cpu/norms.cpp``, ``csrc/cuda/rms_norm.cpp``,
``kernels/rms_norm.py``; truth ``pyllm.reference.rms_norm``; tests
``tests/test_norms.py``.
"""

from __future__ import annotations

import torch

from pyllm import backend as _backend
from pyllm.ops.norm_args import check_norm_args

__all__ = ["rms_norm", "add_rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None, *,
             backend: str | None = None) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension.

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight``, statistics in float32
    (float64 for float64 input), ``y`` rounded once. Same result as
    ``torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)``.

    Args:
        x: ``(..., n)``, float16, bfloat16 or float32 (float64 on the reference
            backend). Any strides (non-contiguous input is copied).
        weight: ``(n,)`` of ``x.dtype`` or float32, or None.
        eps: added to the mean square; default ``torch.finfo(x.dtype).eps``
            (as ``torch.nn.functional.rms_norm``).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; default:
            see :mod:`pyllm.backend`.

    Returns:
        ``y``: ``(..., n)``, ``x.dtype``, contiguous. Differentiable in ``x`` and
        ``weight``.
    """
    eps = check_norm_args("pyllm.rms_norm", x, weight=weight, eps=eps)
    y, _ = _backend.route("rms_norm", x, backend)(x, weight, eps)
    return y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                 eps: float | None = None, *, backend: str | None = None):
    """RMSNorm of ``x + residual``, fused: one pass over the inputs.

    The pre-norm residual step of a Transformer block: ``s = x + residual``
    (rounded to ``x.dtype``) becomes the next residual, and ``rms_norm(s)`` the
    input of the next sub-layer.

    Args:
        x, residual: ``(..., n)``, one dtype (float16, bfloat16, float32; float64
            on the reference backend), one shape.
        weight, eps, backend: as :func:`rms_norm`.

    Returns:
        ``(y, s)``: ``y = rms_norm(s, weight, eps)`` and ``s = x + residual``,
        both ``(..., n)`` in ``x.dtype``. Differentiable in ``x``, ``residual``
        and ``weight``, through both outputs.
    """
    eps = check_norm_args("pyllm.add_rms_norm", x, residual=residual, weight=weight, eps=eps,
                          has_residual=True)
    y, total, _ = _backend.route("add_rms_norm", x, backend)(x, residual, weight, eps)
    return y, total


# -- fake kernels (shapes and dtypes for torch.compile / FakeTensor) ----------

def _like(t, dtype=None):
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def _stats(x):
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _rms_norm_fake(x, weight, eps):
    check_norm_args("pyllm::rms_norm", x, weight=weight, eps=eps)
    return _like(x), _stats(x)


def _add_rms_norm_fake(x, residual, weight, eps):
    check_norm_args("pyllm::add_rms_norm", x, residual=residual, weight=weight, eps=eps,
                    has_residual=True)
    return _like(x), _like(x), _stats(x)


def _rms_norm_backward_fake(grad_y, x, rstd, weight, grad_sum, output_mask):
    return (_like(x) if output_mask[0] else None,
            _like(weight) if output_mask[1] else None)


# -- autograd -----------------------------------------------------------------

def _save(ctx, normalised, weight, rstd):
    ctx.save_for_backward(normalised, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _ = inputs
    _save(ctx, x, weight, output[1])


def _setup_add_rms_norm(ctx, inputs, output):
    _, _, weight, _ = inputs
    _save(ctx, output[1], weight, output[2])


def _make_backward(suffix: str, fused: bool):
    name = f"rms_norm_backward{suffix}"

    def grads(ctx, grad_y, grad_sum):
        normalised, weight, rstd = ctx.saved_tensors
        _backend.require_kernel(f"pyllm::{name}", normalised)
        needs = ctx.needs_input_grad
        want_x = needs[0] or (fused and needs[1])
        want_w = weight is not None and needs[2 if fused else 1]
        return getattr(torch.ops.pyllm, name).default(grad_y, normalised, rstd, weight, grad_sum,
                                                     [want_x, want_w])

    if fused:
        def backward(ctx, grad_y, grad_sum, _grad_rstd):
            grad_x, grad_w = grads(ctx, grad_y, grad_sum)
            return grad_x, grad_x, grad_w, None
    else:
        def backward(ctx, grad_y, _grad_rstd):
            grad_x, grad_w = grads(ctx, grad_y, None)
            return grad_x, grad_w, None
    return backward


for _suffix in ("", "_triton"):
    torch.library.register_fake(f"pyllm::rms_norm{_suffix}", _rms_norm_fake)
    torch.library.register_fake(f"pyllm::add_rms_norm{_suffix}", _add_rms_norm_fake)
    torch.library.register_fake(f"pyllm::rms_norm_backward{_suffix}", _rms_norm_backward_fake)
    torch.library.register_autograd(f"pyllm::rms_norm{_suffix}", _make_backward(_suffix, False),
                                    setup_context=_setup_rms_norm)
    torch.library.register_autograd(f"pyllm::add_rms_norm{_suffix}", _make_backward(_suffix, True),
                                    setup_context=_setup_add_rms_norm)
