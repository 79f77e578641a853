"""Drop-in ``LayerNorm`` and ``RMSNorm`` on pyllm's fused kernels.

Subclasses of ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``: their
constructor arguments, attributes (``normalized_shape``, ``eps``,
``elementwise_affine``, ``weight``, ``bias``), initialisation, ``state_dict``
keys and ``extra_repr``, so a state dict loads either way, a module can be
swapped in place (:func:`pyllm.patch`) and ``isinstance`` checks find them. ``forward``
also takes an optional ``residual``: ``norm(x, residual)`` returns
``(norm(x + residual), x + residual)`` from one fused pass, the pre-norm
Transformer step.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

import pyllm
from pyllm.ops import direct

__all__ = ["LayerNorm", "RMSNorm"]


def _shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


def _flatten(x: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """x with its normalised dimensions (the last len(shape)) merged into one."""
    if tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"{name}: expected input with trailing dimensions {list(shape)}, got "
                         f"shape {list(x.shape)}")
    return x if len(shape) == 1 else x.reshape(*x.shape[:-len(shape)], math.prod(shape))


def _param(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A parameter as the kernels take it: x's dtype or float32, one dimension."""
    if p is None:
        return None
    if p.dtype not in (x.dtype, torch.float32):
        p = p.to(x.dtype)
    return p.reshape(-1)


class _Norm:
    """The forward shared by the two norms (a mixin before the torch class)."""

    def _run(self, fn, fused_fn, x, residual, *params):
        shape = self.normalized_shape
        if len(shape) == 1 and x.shape[-1:] == shape:
            # a plain eager CPU inference call: the kernel without the
            # dispatcher (pyllm.ops.direct), or None
            rms = len(params) == 1
            bias = None if rms else params[1]
            eps = self._eps_for(x)
            out = direct.norm(x, params[0], bias, eps, rms, None) if residual is None else \
                direct.add_norm(x, residual, params[0], bias, eps, rms, None)
            if out is not None:
                return out
        name = type(self).__name__
        flat = _flatten(x, shape, f"pyllm.nn.{name}")
        if residual is None:
            params = [_param(p, flat) for p in params]
            return fn(flat, *params, self._eps_for(flat)).reshape(x.shape)
        if residual.shape != x.shape:
            raise ValueError(f"pyllm.nn.{name}: residual must have x's shape {list(x.shape)}, got "
                             f"{list(residual.shape)}")
        # The sum in the wider of the two dtypes, as torch's ``x + residual``:
        # under autocast a bf16 sublayer output meets a float32 residual
        # stream, which must stay float32 (rounding it to bf16 put every
        # LayerNorm weight's gradient of an autocast BERT step at ~1.5x
        # PyTorch's error).
        flat = flat.to(torch.promote_types(x.dtype, residual.dtype))
        params = [_param(p, flat) for p in params]
        y, s = fused_fn(flat, _flatten(residual.to(flat.dtype), shape, f"pyllm.nn.{name}"),
                        *params, self._eps_for(flat))
        return y.reshape(x.shape), s.reshape(x.shape)


class LayerNorm(_Norm, nn.LayerNorm):
    """``torch.nn.LayerNorm`` on pyllm's kernels (a subclass of it).

    Args:
        normalized_shape: the trailing dimension(s) to normalise over (int or tuple).
        eps: added to the variance (default 1e-5).
        elementwise_affine: learnable ``weight`` (ones) and ``bias`` (zeros).
        bias: with ``elementwise_affine``, whether to learn a bias.
        device, dtype: of the parameters.

    Shapes: ``x`` is ``(..., *normalized_shape)``, float16, bfloat16 or float32
    (float64 on the reference backend); the output has x's shape and dtype.
    ``forward(x, residual)`` returns ``(y, x + residual)``.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(_shape(normalized_shape), eps, elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def _eps_for(self, x):
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self._run(pyllm.layer_norm, pyllm.add_layer_norm, x, residual, self.weight,
                         self.bias)


class RMSNorm(_Norm, nn.RMSNorm):
    """``torch.nn.RMSNorm`` on pyllm's kernels (a subclass of it).

    Args:
        normalized_shape: the trailing dimension(s) to normalise over (int or tuple).
        eps: added to the mean square; None (default) is ``torch.finfo(x.dtype).eps``,
            as in ``torch.nn.RMSNorm``.
        elementwise_affine: a learnable ``weight`` (ones).
        device, dtype: of the weight.

    Shapes: as :class:`LayerNorm`; ``forward(x, residual)`` returns
    ``(y, x + residual)``.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__(_shape(normalized_shape), eps, elementwise_affine, device=device,
                         dtype=dtype)

    def _eps_for(self, x):
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self._run(pyllm.rms_norm, pyllm.add_rms_norm, x, residual, self.weight)
