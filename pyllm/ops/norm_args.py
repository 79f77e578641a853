"""Argument validation shared by the RMSNorm and LayerNorm ops (every backend).

It runs on every call, so the checks are written inline (a decode-sized norm
takes a few microseconds, and each helper call would cost a tenth of one).
"""

from __future__ import annotations

import torch

from pyllm.checks import FLOAT_DTYPES, INT32_MAX, check_float, check_same_device, check_tensor

__all__ = ["check_norm_args"]


def check_norm_args(op: str, x, *, residual=None, weight=None, bias=None, eps=None,
                    has_residual: bool = False) -> float:
    """Validates a normalisation over the last dimension; returns the eps to use.

    x: ``(..., n)`` floating, ``n >= 1``; residual: like x; weight, bias:
    ``(n,)`` of x's dtype or float32, one dtype for both; eps: a finite float
    >= 0, default ``torch.finfo(x.dtype).eps`` (as PyTorch's functional norms).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        check_tensor(op, "x", x, min_dim=1)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if n > INT32_MAX:
        raise ValueError(f"{op}: x has a last dimension of {n}, more than the 2**31 - 1 that the "
                         f"kernels' 32-bit indexing allows")
    dtype, device = x.dtype, x.device
    if has_residual:
        if not isinstance(residual, torch.Tensor) or residual.dtype != dtype:
            check_tensor(op, "residual", residual, dtypes=(dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.device != device:
            check_same_device(op, "x", x, residual=residual)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or (
                p.dtype != dtype and p.dtype != torch.float32):
            check_tensor(op, name, p, dim=1, dtypes=(dtype, torch.float32))
        if p.shape[0] != n:
            raise ValueError(f"{op}: {name} must have shape ({n},) to match the last dimension "
                             f"of x, got {tuple(p.shape)}")
        if p.device != device:
            check_same_device(op, "x", x, **{name: p})
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{op}: weight and bias must have one dtype, got {weight.dtype} and "
                        f"{bias.dtype}")
    if eps is None:
        return torch.finfo(dtype).eps
    if type(eps) is float and 0.0 <= eps < float("inf"):
        return eps
    return check_float(op, "eps", eps, minimum=0.0)
