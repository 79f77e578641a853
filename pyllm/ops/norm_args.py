"""Argument validation shared by the RMSNorm and LayerNorm ops (every backend)."""

from __future__ import annotations

import torch

from pyllm.checks import check_float, check_int32_range, check_same_device, check_tensor

__all__ = ["check_norm_args"]


def check_norm_args(op: str, x, *, residual=None, weight=None, bias=None, eps=None,
                    has_residual: bool = False) -> float:
    """Validates a normalisation over the last dimension; returns the eps to use.

    x: ``(..., n)`` floating, ``n >= 1``; residual: like x; weight, bias:
    ``(n,)`` of x's dtype or float32, one dtype for both; eps: a finite float
    >= 0, default ``torch.finfo(x.dtype).eps`` (as PyTorch's functional norms).
    """
    check_tensor(op, "x", x, min_dim=1)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_int32_range(op, "x", n, "a last dimension of")
    if has_residual:
        check_tensor(op, "residual", residual, dtypes=(x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        check_tensor(op, name, p, dim=1, optional=True, dtypes=(x.dtype, torch.float32))
        if p is not None and p.shape[0] != n:
            raise ValueError(f"{op}: {name} must have shape ({n},) to match the last dimension "
                             f"of x, got {tuple(p.shape)}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{op}: weight and bias must have one dtype, got {weight.dtype} and "
                        f"{bias.dtype}")
    check_same_device(op, "x", x, residual=residual, weight=weight, bias=bias)
    if eps is None:
        return torch.finfo(x.dtype).eps
    return check_float(op, "eps", eps, minimum=0.0)
