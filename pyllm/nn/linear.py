"""Drop-in ``Linear`` with a fused activation, and the ``SwiGLU`` MLP block.

``Linear`` has ``torch.nn.Linear``'s constructor, ``weight`` ``(out, in)`` and
``bias`` ``(out,)`` (same ``state_dict`` keys), plus ``activation``: the bias
and activation run in the GEMM's epilogue. ``SwiGLU`` is the LLaMA-style MLP
``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the gate computed in one
pass over x (parameter names as Hugging Face's ``LlamaMLP``).

Each has ``pack()``: the weights packed once for CPU inference
(:mod:`pyllm.nn.packing`), read by no-grad CPU calls in place of the weights,
with the same outputs.
"""

from __future__ import annotations

import torch
from torch import nn

import pyllm
from pyllm.nn.packing import WeightPack, packed_call_allowed, packed_serves_rows
from pyllm.ops import direct
from pyllm.ops.linear import ACTIVATIONS
from pyllm.ops.packed_linear import linear_packed, swiglu_packed

__all__ = ["Conv1D", "Linear", "SwiGLU"]


class _Packable:
    """``pack()`` / ``unpack()`` for a module with one weight (``_packed_weight()``
    returns it as the op takes it, ``(out, in)``)."""

    _pack: WeightPack | None = None

    def pack(self):
        """Packs the weight for CPU inference (:mod:`pyllm.nn.packing`): no-grad
        CPU calls then read the packed copy (same outputs, no per-call
        packing). Packs again by itself when the weight changes. Returns self."""
        weight = self._packed_weight()
        if self._pack is None:
            self._pack = WeightPack(weight)
        else:
            self._pack.get(weight)
        return self

    def unpack(self):
        """Drops the packed copy. Returns self."""
        self._pack = None
        return self

    @property
    def is_packed(self) -> bool:
        """Whether ``pack()`` was called (and not ``unpack()``)."""
        return self._pack is not None

    def packed_nbytes(self) -> int:
        """Memory the packed copy takes (bytes; 0 when not packed)."""
        return self._pack.packed.nbytes if self._pack is not None and self._pack.packed else 0

    def _packed_for(self, x, weight, bias):
        """The packed weight for this call, or None (see pyllm.nn.packing)."""
        if self._pack is None or x.dtype != weight.dtype or not packed_call_allowed(x, weight, bias):
            return None
        packed = self._pack.get(weight)
        return packed if packed is not None and packed_serves_rows(x, packed) else None


class Linear(_Packable, nn.Linear):
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
        bias = self.bias
        if bias is not None and bias.dtype not in (x.dtype, torch.float32):
            bias = bias.to(x.dtype)
        if self._pack is not None:
            packed = self._packed_for(x, self.weight, self.bias)
            if packed is not None:
                out = direct.linear_packed(x, self.weight, bias, packed, self.activation)
                return out if out is not None else linear_packed(x, packed, bias, self.activation)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return pyllm.linear(x, weight, bias, self.activation)

    def _packed_weight(self):
        return self.weight

    def extra_repr(self) -> str:
        extra = "" if self.activation == "none" else f", activation={self.activation!r}"
        return super().extra_repr() + extra


class Conv1D(_Packable, nn.Module):
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
        bias = self.bias if self.bias.dtype in (x.dtype, torch.float32) else self.bias.to(x.dtype)
        if self._pack is not None:
            packed = self._packed_for(x, self.weight.t(), self.bias)
            if packed is not None:
                return linear_packed(x, packed, bias)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return pyllm.linear(x, weight.t(), bias)

    def _packed_weight(self):
        return self.weight.t()

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

    def pack(self) -> "SwiGLU":
        """Packs the gate and up weights (and ``down_proj``'s) for CPU
        inference, as :meth:`Linear.pack`. Returns self."""
        for proj in (self.gate_proj, self.up_proj):
            proj.pack()
        self.down_proj.pack()
        return self

    def unpack(self) -> "SwiGLU":
        """Drops the packed copies. Returns self."""
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            proj.unpack()
        return self

    @property
    def is_packed(self) -> bool:
        """Whether the gate and up weights are packed."""
        return self.gate_proj.is_packed and self.up_proj.is_packed

    def packed_nbytes(self) -> int:
        """Memory of the gate and up weights' packed copies (bytes; the down
        projection's is ``down_proj.packed_nbytes()``)."""
        return self.gate_proj.packed_nbytes() + self.up_proj.packed_nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        cast = (lambda p: p if p is None or p.dtype == x.dtype else p.to(x.dtype))
        if self.is_packed:
            gate, up = self.gate_proj, self.up_proj
            packed_gate = gate._packed_for(x, gate.weight, gate.bias)
            packed_up = up._packed_for(x, up.weight, up.bias) if packed_gate is not None else None
            if packed_up is not None:
                bias_gate, bias_up = cast(gate.bias), cast(up.bias)
                h = direct.swiglu_packed(x, gate.weight, up.weight, bias_gate, bias_up,
                                         packed_gate, packed_up)
                if h is None:
                    h = swiglu_packed(x, packed_gate, packed_up, bias_gate, bias_up)
                return self.down_proj(h)
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
