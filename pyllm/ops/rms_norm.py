"""RMSNorm: :func:`rms_norm`, :func:`add_rms_norm` and the Python registrations
of ``pyllm::rms_norm``, ``pyllm::add_rms_norm`` and ``pyllm::rms_norm_backward``.

How an op is wired, file by file: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import torch

from pyllm import backend as _backend
from pyllm.ops import direct
from pyllm.ops.registry import declare
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
    y = direct.norm(x, weight, None, eps, True, backend)
    if y is not None:
        return y
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
    out = direct.add_norm(x, residual, weight, None, eps, True, backend)
    if out is not None:
        return out
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


declare("rms_norm", fake=_rms_norm_fake, helpers={"rms_norm_backward": _rms_norm_backward_fake})
declare("add_rms_norm", fake=_add_rms_norm_fake)
