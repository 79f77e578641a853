"""Argument checks shared by the ops' validation functions.

Each op validates its arguments once, in its own module under ``pyllm/ops/``,
before any backend runs, using these helpers. Every failure is a ``TypeError``
(wrong kind of value or dtype) or ``ValueError`` (wrong shape, device, size)
whose message names the op, the argument, what was expected and what came.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "INT32_MAX",
    "FLOAT_DTYPES",
    "check_tensor",
    "check_same_device",
    "check_float",
    "check_int32_range",
]

INT32_MAX = 2**31 - 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(op: str, name: str, value, *, dtypes=FLOAT_DTYPES, min_dim: int | None = None,
                 dim: int | None = None, optional: bool = False) -> None:
    """``value`` must be a tensor (or None when optional) of one of ``dtypes``
    with ``dim`` dimensions (or at least ``min_dim``)."""
    if value is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {_names(dtypes)}, got {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimension(s), got shape "
                         f"{tuple(value.shape)}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(value.shape)}")


def check_float_vector(op: str, name: str, value, like: torch.Tensor, shapes: list,
                       described: str) -> None:
    """``value``: a float tensor of one of ``shapes`` on ``like``'s device
    (``described`` names the shapes in the error)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{op}: {name} must be a float tensor, got {value.dtype}")
    if tuple(value.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"{op}: {name} must have shape {described}, got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{op}: {name} must be on q's device {like.device}, got {value.device}")


def check_same_device(op: str, first: str, tensor: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) is on ``tensor``'s device."""
    for name, other in others.items():
        if other is not None and other.device != tensor.device:
            raise ValueError(f"{op}: {name} must be on the same device as {first} "
                             f"({tensor.device}), got {other.device}")


def check_float(op: str, name: str, value, *, minimum: float | None = None) -> float:
    """A finite real number (not a tensor), at least ``minimum``; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{op}: {name} must be a finite float{bound}, got {value}")
    return value


def check_int32_range(op: str, name: str, size: int, what: str) -> None:
    """Kernels index within one row/tile with 32-bit integers: ``size`` must fit."""
    if size > INT32_MAX:
        raise ValueError(f"{op}: {name} has {what} {size}, more than the 2**31 - 1 that the "
                         f"kernels' 32-bit indexing allows")
