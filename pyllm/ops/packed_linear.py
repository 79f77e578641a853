"""Pre-packed weights for CPU inference: :func:`pack_weight`,
:func:`linear_packed`, :func:`swiglu_packed`, and the fake kernels of
``pyllm::pack_linear_weight``, ``pyllm::linear_packed`` and
``pyllm::swiglu_packed``.

The CPU GEMM lays every weight it reads out in panels (a transposed, blocked
copy sized for the caches and the micro-kernel) on every call.
:func:`pack_weight` makes those panels once; the packed ops read them in
place of the weight, so a call does no packing. The results are the unpacked
ops' bits wherever those sum in the blocked order: every call of more than 16
rows, 2-16 rows on AVX-512, and every call in batch-invariant mode. One row
(a decode step) sums in the blocked order too, where the unpacked op streams
the weight's rows in another order (the same value within rounding), so the
packed ops are batch-invariant at every size.

The layout belongs to the instruction set the kernels run (the panel width;
bf16 pairs for ``vdpbf16ps`` on AVX512-BF16): a :class:`PackedWeight` records
it, and a call under another set raises (pack again). Inference only: the
packed ops are not differentiable (``pyllm.nn.Linear.pack`` leaves training
calls on the weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyllm.checks import check_tensor
from pyllm.ops.linear import ACTIVATIONS, _check_bias, _check_swiglu_biases

__all__ = ["PackedWeight", "pack_weight", "linear_packed", "swiglu_packed"]


@dataclass(frozen=True)
class PackedWeight:
    """An ``(out_features, in_features)`` weight packed for the CPU GEMM.

    Attributes:
        panels: the packed tensor (CPU; float32, or int32 holding bf16 pairs),
            shape ``(panels, rows, panel_width)``, layout of ``isa``.
        out_features, in_features: the weight's shape.
        dtype: the weight's dtype; the packed ops take x of this dtype.
        isa: the instruction set it was packed for (``pyllm._C.cpu_isa()``).
    """

    panels: torch.Tensor
    out_features: int
    in_features: int
    dtype: torch.dtype
    isa: str

    @property
    def nbytes(self) -> int:
        """Memory the panels take (bytes)."""
        return self.panels.numel() * self.panels.element_size()


_ISA: list = []


def _active_isa() -> str:
    """The instruction set the CPU kernels run: chosen once per process (the
    CPU and ``PYLLM_CPU_ISA`` at load), so asked once."""
    if not _ISA:
        from pyllm import _C

        _ISA.append(_C.cpu_isa())
    return _ISA[0]


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """Packs ``weight`` for :func:`linear_packed` / :func:`swiglu_packed`.

    Args:
        weight: ``(out_features, in_features)`` CPU tensor, float32, bfloat16 or
            float16, any strides (``Conv1D``'s ``weight.t()`` too).

    Returns:
        A :class:`PackedWeight`: a copy (the weight itself is not kept, and
        later changes to it are not seen), float32 panels
        ``ceil(out / width) x in x width`` (``4 * out * in`` bytes), or for
        bfloat16 on AVX512-BF16 bf16 pairs ``2 * out * in`` bytes (in rounded
        up to 32). On Linux, panels of 2 MiB or more lie in their own
        2 MiB-aligned mapping advised for transparent huge pages (a decode
        step streams them whole; fewer TLB misses), rounded up to whole
        2 MiB pages.
    """
    op = "pyllm.pack_weight"
    check_tensor(op, "weight", weight, dim=2,
                 dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if weight.device.type != "cpu":
        raise ValueError(f"{op}: weight must be a CPU tensor (the packed layout is the CPU "
                         f"GEMM's), got one on {weight.device}")
    if weight.requires_grad:
        weight = weight.detach()
    panels = torch.ops.pyllm.pack_linear_weight(weight)
    return PackedWeight(panels, weight.shape[0], weight.shape[1], weight.dtype, _active_isa())


def _check_packed(op, name, x, packed, out_features=None):
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"{op}: {name} must be a pyllm.ops.packed_linear.PackedWeight (from "
                        f"pack_weight), got {type(packed).__name__}")
    if packed.dtype != x.dtype:
        raise TypeError(f"{op}: {name} was packed from a {packed.dtype} weight; x must have that "
                        f"dtype, got {x.dtype}")
    if packed.in_features != x.shape[-1]:
        raise ValueError(f"{op}: {name} has in_features {packed.in_features}, the last dimension "
                         f"of x is {x.shape[-1]}")
    if out_features is not None and packed.out_features != out_features:
        raise ValueError(f"{op}: {name} must have {out_features} out_features like packed_gate, "
                         f"got {packed.out_features}")
    isa = _active_isa()
    if packed.isa != isa:
        raise ValueError(f"{op}: {name} was packed for the {packed.isa} instruction set, the "
                         f"kernels run {isa}: pack the weight again")


def _check_x(op, x):
    check_tensor(op, "x", x, min_dim=1, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if x.device.type != "cpu":
        raise ValueError(f"{op}: x must be a CPU tensor (packed weights are CPU-only), got one "
                         f"on {x.device}")


def linear_packed(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                  activation: str = "none") -> torch.Tensor:
    """:func:`pyllm.linear` with a packed weight: ``act(x @ weight.T + bias)``.

    Args:
        x: ``(..., in_features)`` CPU tensor of the packed weight's dtype, any
            strides.
        packed: :func:`pack_weight` of ``weight`` ``(out_features, in_features)``.
        bias: ``(out_features,)`` of x's dtype or float32, or None.
        activation: ``"none"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.

    Returns:
        ``(..., out_features)`` in x's dtype. Not differentiable (inference).
    """
    op = "pyllm.linear_packed"
    _check_x(op, x)
    _check_packed(op, "packed", x, packed)
    _check_bias(op, "bias", bias, x, packed.out_features)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation!r}")
    return torch.ops.pyllm.linear_packed(x, packed.panels, packed.out_features, bias, activation)


def swiglu_packed(x: torch.Tensor, packed_gate: PackedWeight, packed_up: PackedWeight,
                  bias_gate: torch.Tensor | None = None,
                  bias_up: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pyllm.swiglu` with packed weights:
    ``silu(x @ weight_gate.T + bias_gate) * (x @ weight_up.T + bias_up)``.

    Args:
        x: ``(..., in_features)`` CPU tensor of the packed weights' dtype.
        packed_gate, packed_up: :func:`pack_weight` of the two ``(hidden,
            in_features)`` weights.
        bias_gate, bias_up: ``(hidden,)`` of x's dtype or float32 (one dtype),
            or None.

    Returns:
        ``(..., hidden)`` in x's dtype. Not differentiable (inference).
    """
    op = "pyllm.swiglu_packed"
    _check_x(op, x)
    _check_packed(op, "packed_gate", x, packed_gate)
    hidden = packed_gate.out_features
    _check_packed(op, "packed_up", x, packed_up, out_features=hidden)
    _check_swiglu_biases(op, bias_gate, bias_up, x, hidden)
    return torch.ops.pyllm.swiglu_packed(x, packed_gate.panels, packed_up.panels, hidden,
                                         bias_gate, bias_up)


# -- fake kernels -------------------------------------------------------------

def _pack_linear_weight_fake(weight):
    # The layout (rows per panel, width, dtype) is the active instruction
    # set's: the real op on an empty weight of the same K and dtype says it
    # (run outside fake mode).
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        probe = torch.ops.pyllm.pack_linear_weight(
            torch.empty(0, int(weight.shape[1]), dtype=weight.dtype))
    width = probe.shape[2]
    panels = (weight.shape[0] + width - 1) // width
    return weight.new_empty((panels, probe.shape[1], width), dtype=probe.dtype)


def _linear_packed_fake(x, packed, out_features, bias, activation):
    return x.new_empty((*x.shape[:-1], out_features))


def _swiglu_packed_fake(x, packed_gate, packed_up, out_features, bias_gate, bias_up):
    return x.new_empty((*x.shape[:-1], out_features))


for _name, _fake in (("pack_linear_weight", _pack_linear_weight_fake),
                     ("linear_packed", _linear_packed_fake),
                     ("swiglu_packed", _swiglu_packed_fake)):
    torch.library.register_fake(f"pyllm::{_name}", _fake)
