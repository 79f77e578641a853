"""LayerNorm: :func:`layer_norm`, :func:`add_layer_norm` and the Python
registrations of ``pyllm::layer_norm``, ``pyllm::add_layer_norm`` and
``pyllm::layer_norm_backward``.

How an op is wired, file by file: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import torch

from pyllm import backend as _backend
from pyllm.ops import direct
from pyllm.ops.registry import declare
from pyllm.ops.norm_args import check_norm_args

__all__ = ["layer_norm", "add_layer_norm"]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """Layer normalisation over the last dimension.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased
    variance, statistics in float32 (float64 for float64 input), ``y`` rounded
    once. Same result as ``torch.nn.functional.layer_norm(x, (x.shape[-1],),
    weight, bias, eps)``.

    Args:
        x: ``(..., n)``, float16, bfloat16 or float32 (float64 on the reference
            backend). Any strides (non-contiguous input is copied).
        weight, bias: ``(n,)`` of ``x.dtype`` or float32 (one dtype for both), or None.
        eps: added to the variance (default 1e-5, as ``torch.nn.LayerNorm``).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; default:
            see :mod:`pyllm.backend`.

    Returns:
        ``y``: ``(..., n)``, ``x.dtype``, contiguous. Differentiable in ``x``,
        ``weight`` and ``bias``.
    """
    y = direct.norm(x, weight, bias, eps, False, backend)
    if y is not None:
        return y
    eps = check_norm_args("pyllm.layer_norm", x, weight=weight, bias=bias, eps=eps)
    y, _, _ = _backend.route("layer_norm", x, backend)(x, weight, bias, eps)
    return y


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                   backend: str | None = None):
    """LayerNorm of ``x + residual``, fused: one pass over the inputs.

    Args:
        x, residual: ``(..., n)``, one dtype and shape.
        weight, bias, eps, backend: as :func:`layer_norm`.

    Returns:
        ``(y, s)``: ``s = x + residual`` rounded to ``x.dtype`` and ``y =
        layer_norm(s, weight, bias, eps)``. Differentiable in ``x``,
        ``residual``, ``weight`` and ``bias``, through both outputs.
    """
    out = direct.add_norm(x, residual, weight, bias, eps, False, backend)
    if out is not None:
        return out
    eps = check_norm_args("pyllm.add_layer_norm", x, residual=residual, weight=weight, bias=bias,
                          eps=eps, has_residual=True)
    y, total, _, _ = _backend.route("add_layer_norm", x, backend)(x, residual, weight, bias, eps)
    return y, total


# -- fake kernels -------------------------------------------------------------

def _like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _stats(x):
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _layer_norm_fake(x, weight, bias, eps):
    check_norm_args("pyllm::layer_norm", x, weight=weight, bias=bias, eps=eps)
    return _like(x), _stats(x), _stats(x)


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    check_norm_args("pyllm::add_layer_norm", x, residual=residual, weight=weight, bias=bias,
                    eps=eps, has_residual=True)
    return _like(x), _like(x), _stats(x), _stats(x)


def _layer_norm_backward_fake(grad_y, x, mean, rstd, weight, grad_sum, output_mask):
    param_dtype = weight.dtype if weight is not None else x.dtype
    param = torch.empty(x.shape[-1:], dtype=param_dtype, device=x.device)
    return (_like(x) if output_mask[0] else None,
            _like(param) if output_mask[1] else None,
            _like(param) if output_mask[2] else None)


declare("layer_norm", fake=_layer_norm_fake,
        helpers={"layer_norm_backward": _layer_norm_backward_fake})
declare("add_layer_norm", fake=_add_layer_norm_fake)
