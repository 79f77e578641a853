"""RMSNorm: :func:`rms_norm` and the Python registrations of ``pyllm::rms_norm``.

The op's stations: schema ``csrc/ops.cpp``; validation, fake kernels and
autograd here; route ``pyllm/backend.py``; kernels ``csrc/cpu/rms_norm.cpp``,
``csrc/cuda/rms_norm.cpp``, ``kernels/rms_norm.py``; truth
``pyllm.reference.rms_norm``; tests ``tests/test_rms_norm.py``.
"""

from __future__ import annotations

import torch

from pyllm import backend as _backend
from pyllm.checks import check_float, check_int32_range, check_same_device, check_tensor

__all__ = ["rms_norm", "check_rms_norm"]

_OP = "pyllm.rms_norm"


def check_rms_norm(x, weight, eps) -> float:
    """Validates the arguments of rms_norm for every backend; returns the eps to use."""
    check_tensor(_OP, "x", x, min_dim=1)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{_OP}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_int32_range(_OP, "x", n, "a last dimension of")
    check_tensor(_OP, "weight", weight, dim=1, optional=True, dtypes=(x.dtype, torch.float32))
    if weight is not None and weight.shape[0] != n:
        raise ValueError(f"{_OP}: weight must have shape ({n},) to match the last dimension of x, "
                         f"got {tuple(weight.shape)}")
    check_same_device(_OP, "x", x, weight=weight)
    if eps is None:
        return torch.finfo(x.dtype).eps
    return check_float(_OP, "eps", eps, minimum=0.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None, *,
             backend: str | None = None) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension.

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight``, with the statistics in
    float32 (float64 for float64 input) and ``y`` rounded once. Same result as
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
    eps = check_rms_norm(x, weight, eps)
    y, _ = _backend.route("rms_norm", x, backend)(x, weight, eps)
    return y


# -- fake kernels (shapes and dtypes for torch.compile / FakeTensor) ----------

def _rms_norm_fake(x, weight, eps):
    check_rms_norm(x, weight, eps)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    return y, rstd


def _rms_norm_backward_fake(grad_y, x, rstd, weight, output_mask):
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if output_mask[0] else None
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) \
        if output_mask[1] else None
    return grad_x, grad_weight


# -- autograd -----------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _make_backward(name: str):
    def backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        _backend.require_kernel(f"pyllm::{name}", x)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]]
        grad_x, grad_weight = getattr(torch.ops.pyllm, name).default(
            grad_y, x, rstd, weight, mask)
        return grad_x, grad_weight, None
    return backward


for _suffix in ("", "_triton"):
    torch.library.register_fake(f"pyllm::rms_norm{_suffix}", _rms_norm_fake)
    torch.library.register_fake(f"pyllm::rms_norm_backward{_suffix}", _rms_norm_backward_fake)
    torch.library.register_autograd(f"pyllm::rms_norm{_suffix}",
                                    _make_backward(f"rms_norm_backward{_suffix}"),
                                    setup_context=_setup_context)
