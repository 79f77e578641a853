"""Linear layers with fused epilogues: :func:`linear`, :func:`swiglu` and the
Python registrations (fake kernels) of ``pyllm::linear``, ``pyllm::swiglu``
and their backward ops.

How an op is wired, file by file: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import math

import torch

from pyllm import backend as _backend
from pyllm.ops.registry import declare
from pyllm.checks import INT32_MAX, check_tensor

__all__ = ["ACTIVATIONS", "linear", "swiglu"]

#: The activations the epilogue applies.
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu")


def _check_weight(op, name, x, weight, out_features=None):
    check_tensor(op, name, weight, dim=2)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {weight.device}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: {name} must have shape (out_features, {x.shape[-1]}) to match "
                         f"the last dimension of x, got {tuple(weight.shape)}")
    if out_features is not None and weight.shape[0] != out_features:
        raise ValueError(f"{op}: {name} must have {out_features} rows like weight_gate, got "
                         f"{weight.shape[0]}")


def _check_bias(op, name, bias, x, out_features):
    if bias is None:
        return
    check_tensor(op, name, bias, dim=1, dtypes=(x.dtype, torch.float32))
    if bias.shape[0] != out_features:
        raise ValueError(f"{op}: {name} must have shape ({out_features},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {bias.device}")


def _check_swiglu_biases(op, bias_gate, bias_up, x, out_features):
    """SwiGLU's two biases: each as :func:`_check_bias`, and one dtype."""
    _check_bias(op, "bias_gate", bias_gate, x, out_features)
    _check_bias(op, "bias_up", bias_up, x, out_features)
    if bias_gate is not None and bias_up is not None and bias_gate.dtype != bias_up.dtype:
        raise TypeError(f"{op}: bias_gate and bias_up must have one dtype, got {bias_gate.dtype} "
                        f"and {bias_up.dtype}")


def _check_sizes(op, x, out_features):
    """The CPU kernels index in 64 bits (tests/test_large_tensors.py); the GPU
    GEMMs keep a 32-bit element count per operand, so on a CUDA device an
    operand past 2**31 - 1 elements is refused here, before any memory is
    touched."""
    if x.device.type != "cuda":
        return
    rows = math.prod(x.shape[:-1])
    k = x.shape[-1]
    for what, count in (("x", rows * k), ("the output", rows * out_features),
                        ("the weight", out_features * k)):
        if count > INT32_MAX:
            raise ValueError(f"{op}: {what} would have {count} elements, more than the 2**31 - 1 "
                             f"that the GPU kernels' 32-bit indexing allows (the CPU kernels "
                             f"take it)")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` with the bias and activation applied in the
    GEMM's epilogue (no extra pass over the output).

    Args:
        x: ``(..., in_features)``, float16, bfloat16 or float32 (float64 on the
            reference backend); any strides.
        weight: ``(out_features, in_features)``, x's dtype, as ``torch.nn.Linear``.
        bias: ``(out_features,)`` of x's dtype or float32, or None.
        activation: ``"none"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(..., out_features)`` in x's dtype. Differentiable in x, weight and bias.
    """
    op = "pyllm.linear"
    check_tensor(op, "x", x, min_dim=1)
    _check_weight(op, "weight", x, weight)
    _check_bias(op, "bias", bias, x, weight.shape[0])
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation!r}")
    _check_sizes(op, x, weight.shape[0])
    return _backend.route("linear", x, backend)(x, weight, bias, activation)


def swiglu(x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor,
           bias_gate: torch.Tensor | None = None, bias_up: torch.Tensor | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """The SwiGLU gate of LLaMA-style MLPs, both products in one pass over x:
    ``silu(x @ weight_gate.T + bias_gate) * (x @ weight_up.T + bias_up)``.

    Args:
        x: ``(..., in_features)``, float16, bfloat16 or float32.
        weight_gate, weight_up: ``(hidden, in_features)``, x's dtype.
        bias_gate, bias_up: ``(hidden,)`` of x's dtype or float32 (one dtype), or None.
        backend: as :func:`linear`.

    Returns:
        ``(..., hidden)`` in x's dtype. Differentiable in every tensor argument.
    """
    op = "pyllm.swiglu"
    check_tensor(op, "x", x, min_dim=1)
    _check_weight(op, "weight_gate", x, weight_gate)
    _check_weight(op, "weight_up", x, weight_up, out_features=weight_gate.shape[0])
    _check_swiglu_biases(op, bias_gate, bias_up, x, weight_gate.shape[0])
    _check_sizes(op, x, weight_gate.shape[0])
    return _backend.route("swiglu", x, backend)(x, weight_gate, weight_up, bias_gate, bias_up)


# -- fake kernels -------------------------------------------------------------

def _out_like(x, features):
    return torch.empty((*x.shape[:-1], features), dtype=x.dtype, device=x.device)


def _like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else None


def _linear_fake(x, weight, bias, activation):
    return _out_like(x, weight.shape[0])


def _swiglu_fake(x, weight_gate, weight_up, bias_gate, bias_up):
    return _out_like(x, weight_gate.shape[0])


def _linear_backward_fake(grad_y, x, weight, bias, activation, output_mask):
    return (_like(x) if output_mask[0] else None, _like(weight) if output_mask[1] else None,
            _like(bias) if output_mask[2] and bias is not None else None)


def _swiglu_backward_fake(grad_y, x, weight_gate, weight_up, bias_gate, bias_up, output_mask):
    tensors = (x, weight_gate, weight_up, bias_gate, bias_up)
    return tuple(_like(t) if wanted and t is not None else None
                 for t, wanted in zip(tensors, output_mask))


def _preact_like(x, features):
    return torch.empty((*x.shape[:-1], features), dtype=torch.float32, device=x.device)


def _linear_with_preact_fake(x, weight, bias, activation):
    return _out_like(x, weight.shape[0]), _preact_like(x, weight.shape[0])


def _swiglu_with_preact_fake(x, weight_gate, weight_up, bias_gate, bias_up):
    features = weight_gate.shape[0]
    return _out_like(x, features), _preact_like(x, features), _preact_like(x, features)


def _linear_backward_from_preact_fake(grad_y, x, weight, bias, preact, activation, output_mask):
    return _linear_backward_fake(grad_y, x, weight, bias, activation, output_mask)


def _swiglu_backward_from_preact_fake(grad_y, x, weight_gate, weight_up, bias_gate, bias_up, gate,
                                      up, output_mask):
    return _swiglu_backward_fake(grad_y, x, weight_gate, weight_up, bias_gate, bias_up,
                                 output_mask)


declare("linear", fake=_linear_fake, helpers={"linear_backward": _linear_backward_fake})
declare("swiglu", fake=_swiglu_fake, helpers={"swiglu_backward": _swiglu_backward_fake})

# The CPU kernels' training pair (csrc/ops.cpp): one name each, no Triton twin.
for _name, _fake in (("linear_with_preact", _linear_with_preact_fake),
                     ("swiglu_with_preact", _swiglu_with_preact_fake),
                     ("linear_backward_from_preact", _linear_backward_from_preact_fake),
                     ("swiglu_backward_from_preact", _swiglu_backward_from_preact_fake)):
    torch.library.register_fake(f"pyllm::{_name}", _fake)
