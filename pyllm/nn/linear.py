"""Drop-in ``Linear`` with a fused activation, and the ``SwiGLU`` MLP block.

``Linear`` has ``torch.nn.Linear``'s constructor, ``weight`` ``(out, in)`` and
``bias`` ``(out,)`` (same ``state_dict`` keys), plus ``activation``: the bias
and activation run in the GEMM's epilogue. ``SwiGLU`` is the LLaMA-style MLP
``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the gate computed in one
pass over x (parameter names as Hugging Face's ``LlamaMLP``).
"""

from __future__ import annotations

import torch
from torch import nn

import pyllm
from pyllm.ops.linear import ACTIVATIONS

__all__ = ["Conv1D", "Linear", "SwiGLU"]


class Linear(nn.Linear):
    """``torch.nn.Linear`` followed by an optional activation, fused: a subclass
    of ``torch.nn.Linear`` (every ``isinstance(m, nn.Linear)`` in the ecosystem
    finds it: PEFT's LoRA, tensor-parallel plans, FSDP wrap policies, weight
    init), with its parameters, initialisation, ``state_dict`` and
    ``extra_repr`` (plus ``activation`` when there is one), and pyllm's forward.

    Args:
        in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
        activation: ``"none"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.

    Shapes: ``x`` ``(..., in_features)`` -> ``(..., out_features)``, x's dtype
    (float16, bfloat16, float32); the weight is cast to x's dtype if it differs
    (e.g. under ``torch.autocast``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "none", device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"pyllm.nn.Linear: activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {activation!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias
        if bias is not None and bias.dtype not in (x.dtype, torch.float32):
            bias = bias.to(x.dtype)
        return pyllm.linear(x, weight, bias, self.activation)

    def extra_repr(self) -> str:
        extra = "" if self.activation == "none" else f", activation={self.activation!r}"
        return super().extra_repr() + extra


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored
    ``(in, out)`` (``nx``, ``nf``), on :func:`pyllm.linear` with the weight
    read transposed in place (no copy). Same attributes and ``state_dict``
    keys (``weight`` ``(nx, nf)``, ``bias`` ``(nf,)``), so
    :func:`pyllm.nn.patch` swaps it into a GPT-2 model.

    Shapes: ``x`` ``(..., nx)`` -> ``(..., nf)``, x's dtype.
    """

    def __init__(self, nf: int, nx: int, device=None, dtype=None):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias.dtype in (x.dtype, torch.float32) else self.bias.to(x.dtype)
        return pyllm.linear(x, weight.t(), bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on for its device (as F.linear)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class SwiGLU(nn.Module):
    """The SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    Args:
        hidden_size: model width (input and output features).
        intermediate_size: width of the gate.
        bias: biases on the three projections (LLaMA: False).
        device, dtype: of the parameters.

    Attributes ``gate_proj``, ``up_proj``, ``down_proj`` are :class:`Linear`
    (state_dict keys ``gate_proj.weight`` etc., as Hugging Face's
    ``LlamaMLP``). Shapes: ``(..., hidden_size)`` -> ``(..., hidden_size)``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = Linear(hidden_size, intermediate_size, bias, **factory)
        self.up_proj = Linear(hidden_size, intermediate_size, bias, **factory)
        self.down_proj = Linear(intermediate_size, hidden_size, bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        cast = (lambda p: p if p is None or p.dtype == x.dtype else p.to(x.dtype))
        weight_gate = cast(self.gate_proj.weight)
        local = type(weight_gate).__name__ == "DTensor" and type(x).__name__ != "DTensor"
        if local:  # gate/up under ColwiseParallel: x replicated, the gate's local columns out
            from pyllm.distributed import replicated_like

            x = replicated_like(x, weight_gate)
        gate = pyllm.swiglu(x, weight_gate, cast(self.up_proj.weight),
                            cast(self.gate_proj.bias), cast(self.up_proj.bias))
        if local:
            gate = gate.to_local()  # as ColwiseParallel's use_local_output
        return self.down_proj(gate)
