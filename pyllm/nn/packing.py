"""Packed weights for CPU inference in pyllm's modules: :class:`WeightPack`
(a packed copy kept in step with its parameter) and :func:`pack_for_inference`.

``pyllm.nn.Linear.pack()``, ``Conv1D.pack()``, ``SwiGLU.pack()`` and
``Attention.pack()`` (q, k and v stacked into one weight) pack their weights
once (:func:`pyllm.ops.packed_linear.pack_weight`); their forward then
reads the packed copy when the call is one the packed ops serve exactly:

- a CPU call, x of the weight's dtype (so not under autocast's casts), plain
  tensors (no DTensor or other ``__torch_function__``), not traced by
  ``torch.compile``, the default or ``cpu`` backend;
- no gradient wanted (``torch.no_grad()`` / ``inference_mode()``, or nothing
  requiring grad): the packed ops are not differentiable, so a training call
  takes the weight as before.

A call of at most 16 rows (a decode step) on an instruction set whose
packed ops have no panel-reading skinny kernel for the weight (AVX2 and the
portable build, and a 16-bit weight packed as float32 panels on AVX-512
without BF16) also runs the unpacked op: there the unpacked skinny kernels
stream the weight itself, half the bytes of float32 panels of a 16-bit
weight, where the packed op would run the blocked kernel. (Not in
batch-invariant mode: there the unpacked op runs the blocked kernel too, and
the packed one skips its per-call packing.)

Anything else runs the unpacked op on the weight, as before packing. The
packed copy follows the weight: an in-place change (its version counter), a
new tensor (``.to()``, ``load_state_dict`` into a new one) or another
instruction set makes the next call pack again. The copy is not part of the
``state_dict``; it is memory besides the weights (the same size for bf16 on
AVX512-BF16, float32 panels otherwise: twice a 16-bit weight). ``unpack()``
drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyllm import backend as _backend
from pyllm.invariance import is_batch_invariant
from pyllm.ops.packed_linear import PackedWeight, _active_isa, pack_weight

__all__ = ["WeightPack", "PackReport", "PacksForInference", "pack_for_inference",
           "packed_call_allowed", "packed_serves_rows"]

SKINNY_ROWS = 16  # kGemmSkinnyRows (csrc/cpu/kernels/gemm.h): the skinny kernels' row limit
_PANEL_SKINNY_ISAS = ("avx512", "avx512_bf16")  # where packed panels have a skinny kernel

_has_torch_function = torch._C._has_torch_function
_is_compiling = torch.compiler.is_compiling


def _state(weight: torch.Tensor):
    """What identifies the weight's current values, or None when in-place
    changes cannot be tracked (inference tensors have no version counter)."""
    try:
        version = weight._version
    except RuntimeError:
        return None
    return (version, weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())


class WeightPack:
    """A :class:`PackedWeight` of a weight, packed again when the weight changes.

    Args:
        weights: one ``(out_features, in_features)`` CPU tensor (any strides),
            the weight as the op takes it; or several with one
            ``in_features``, packed as one weight stacked along
            ``out_features`` (``torch.cat(weights)``: a q/k/v projection's
            three weights read by one GEMM).
    """

    def __init__(self, *weights: torch.Tensor):
        if not weights:
            raise TypeError("pyllm.nn.packing.WeightPack: give at least one weight")
        self.packed: PackedWeight | None = None
        self._state = None
        self.get(*weights)

    def get(self, *weights: torch.Tensor) -> PackedWeight | None:
        """The packed copy of the weights' current values (packing again if
        any changed), or None where it cannot be kept in step (an inference
        tensor) or a weight is not on the CPU."""
        # (on every packed call: attribute reads only, no generators)
        state = []
        for w in weights:
            s = _state(w) if w.is_cpu else None
            if s is None:
                self.packed = self._state = None
                return None
            state.append(s)
        if self.packed is None or state != self._state or self.packed.isa != _active_isa():
            with torch.no_grad():
                self.packed = pack_weight(weights[0] if len(weights) == 1 else torch.cat(weights))
            self._state = state
        return self.packed


def packed_call_allowed(x: torch.Tensor, *tensors) -> bool:
    """Whether a module call on ``x`` with these parameters (None allowed)
    may take packed weights (see the module docstring): plain CPU tensors,
    the default or ``cpu`` backend, not traced, no gradient to record. The
    same test lets a module call a CPU operator on tensors it made without
    the face's checks (``RotaryEmbedding.rotate``)."""
    # (on every packed call: the cheapest tests first, no generators)
    if not x.is_cpu or _has_torch_function((x, *tensors)):
        return False
    name = _backend._STACK[-1] if _backend._STACK else _backend._ENV_BACKEND
    if (name is not None and name != "cpu") or _is_compiling():
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for t in tensors:
        if t is not None and (not t.is_cpu or (grad and t.requires_grad)):
            return False
    return True


def packed_serves_rows(x: torch.Tensor, packed: PackedWeight) -> bool:
    """Whether the packed op is the faster way to compute ``x @ weight.T`` for
    ``x`` ``(..., in_features)``: False for at most ``SKINNY_ROWS`` rows where
    the packed panels have no skinny kernel or are wider than the weight's
    dtype (see the module docstring), True otherwise. The unpacked op then
    serves the call, with its own outputs."""
    if is_batch_invariant():
        return True
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > SKINNY_ROWS:
        return True
    widened = packed.panels.dtype == torch.float32 and packed.dtype != torch.float32
    return packed.isa in _PANEL_SKINNY_ISAS and not widened


@dataclass
class PackReport:
    """What :func:`pack_for_inference` packed.

    Attributes:
        modules: qualified names of the packed modules.
        nbytes: memory the packed copies take (bytes).
    """

    modules: list
    nbytes: int

    def __str__(self) -> str:
        return f"packed {len(self.modules)} modules, {self.nbytes / 2**20:.1f} MiB"


def pack_for_inference(model: nn.Module) -> PackReport:
    """Packs every pyllm ``Linear``, ``Conv1D``, ``SwiGLU`` and ``Attention``
    in ``model`` for CPU inference, in place (an ``Attention``'s q, k and v
    as one stacked weight, a ``SwiGLU``'s gate and up as a pair).

    Args:
        model: any module (pyllm's models, or a model :func:`pyllm.nn.patch`
            converted); parameters on the CPU.

    Returns:
        A :class:`PackReport`. The outputs are those of the unpacked model
        (bit for bit wherever the unpacked GEMM sums in the blocked order, see
        :mod:`pyllm.ops.packed_linear`). Calls that want gradients keep using
        the weights.
    """
    from pyllm.nn.attention import Attention
    from pyllm.nn.linear import Conv1D, Linear, SwiGLU

    names, nbytes = [], 0
    packed_jointly = set()  # projections packed with others, by their block
    for name, module in model.named_modules():
        if isinstance(module, SwiGLU):
            module.pack()
            packed_jointly.update({id(module.gate_proj), id(module.up_proj)})
        elif isinstance(module, Attention):
            module.pack()
            if not module.is_packed:
                continue
            packed_jointly.update({id(module.q_proj), id(module.k_proj), id(module.v_proj)})
        else:
            continue
        names.append(name)
        nbytes += module.packed_nbytes()
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Conv1D)) and id(module) not in packed_jointly:
            module.pack()
            if module.packed_nbytes():
                names.append(name)
                nbytes += module.packed_nbytes()
    return PackReport(names, nbytes)


class PacksForInference:
    """``model.pack_for_inference()`` for pyllm's models (a mixin of
    ``nn.Module`` subclasses)."""

    def pack_for_inference(self) -> PackReport:
        """Packs every ``Linear``/``Conv1D``/``SwiGLU``/``Attention`` weight of
        this model for CPU inference (:func:`pyllm.nn.pack_for_inference`): no-grad CPU calls
        (``generate``, calls under ``torch.no_grad()``) then read the packed
        copies, with the unpacked model's outputs. Returns the
        :class:`PackReport`; ``unpack_weights()`` drops the copies."""
        return pack_for_inference(self)

    def unpack_weights(self) -> None:
        """Drops every packed copy :meth:`pack_for_inference` made."""
        for module in self.modules():
            if module is not self and hasattr(module, "unpack") and hasattr(module, "is_packed"):
                module.unpack()
