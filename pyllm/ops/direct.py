"""The dispatcher-free path of small eager CPU inference calls.

A call through ``torch.ops`` costs a few microseconds of Python and dispatcher
work (boxing, the autograd kernel, the statistics a backward would keep); at
a decode row that is more than the kernel. The faces of the norms (and
pyllm.nn's norm modules) try :func:`norm` first, pyllm.nn's packed modules
:func:`linear_packed` and :func:`swiglu_packed`: each calls the CPU kernel
from ``pyllm._C`` directly when nothing stands between the call and that
kernel, and returns None otherwise, and the caller then goes the usual way
(checks, routing, ``torch.ops``).

Python decides what only Python knows: the backend is the default or
``cpu`` (``backend=``, :func:`pyllm.use_backend`, ``PYLLM_BACKEND``), not being
traced by ``torch.compile``, no ``__torch_function__`` (tensor subclasses such
as DTensor, torch function modes). ``pyllm._C``'s entry points decide the rest:
plain CPU tensors, nothing requiring grad in grad mode, no dispatch mode, no
autocast, no profiler, and arguments the kernel takes (see
csrc/direct_calls.cpp). The result is the operator's: the same kernel.
"""

from __future__ import annotations

import torch

from pyllm import _C
from pyllm import backend as _backend

__all__ = ["norm", "add_norm", "linear_packed", "swiglu_packed"]

_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function
_norm_direct = _C.norm_direct
_linear_packed_direct = _C.linear_packed_direct
_swiglu_packed_direct = _C.swiglu_packed_direct


def norm(x, weight, bias, eps, rms: bool, backend: str | None):
    """rms_norm / layer_norm without the dispatcher, or None.

    Args: as the faces (:func:`pyllm.rms_norm`, :func:`pyllm.layer_norm`);
    ``weight``/``bias`` may be None; ``rms`` picks RMSNorm (``bias`` None).

    Returns:
        ``y`` (``x``'s shape and dtype), or None when the call must go through
        ``torch.ops``.
    """
    return _call(x, None, weight, bias, eps, rms, backend)


def add_norm(x, residual, weight, bias, eps, rms: bool, backend: str | None):
    """add_rms_norm / add_layer_norm without the dispatcher, or None.

    Args: as the faces (:func:`pyllm.add_rms_norm`, :func:`pyllm.add_layer_norm`).

    Returns:
        ``(y, x + residual)``, or None when the call must go through
        ``torch.ops`` (a missing ``residual`` included: the face's error).
    """
    if residual is None:
        return None
    return _call(x, residual, weight, bias, eps, rms, backend)


def _call(x, residual, weight, bias, eps, rms, backend):
    name = backend if backend is not None else (
        _backend._STACK[-1] if _backend._STACK else _backend._ENV_BACKEND)
    if (name is not None and name != "cpu") or _is_compiling() or _has_torch_function(
            (x, residual, weight, bias)):
        return None
    return _norm_direct(x, residual, weight, bias, eps, rms)


def linear_packed(x, weight, bias, packed, activation: str = "none"):
    """linear_packed without the dispatcher, or None.

    For :mod:`pyllm.nn`'s modules, after
    :func:`pyllm.nn.packing.packed_call_allowed` said yes for ``x``,
    ``weight`` and ``bias`` (which checks what only Python knows).

    Args: as :func:`pyllm.ops.packed_linear.linear_packed`, plus ``weight``
    ``(out_features, in_features)``, the tensor ``packed`` was packed from.

    Returns:
        ``(..., out_features)`` in x's dtype, or None when the call must go
        through the face (whose checks then name what is wrong).
    """
    return _linear_packed_direct(x, weight, bias, packed.panels, packed.out_features, activation)


def swiglu_packed(x, weight_gate, weight_up, bias_gate, bias_up, packed_gate, packed_up):
    """swiglu_packed without the dispatcher, or None (as :func:`linear_packed`;
    the weights are the two the panels were packed from)."""
    return _swiglu_packed_direct(x, weight_gate, weight_up, bias_gate, bias_up,
                                 packed_gate.panels, packed_up.panels, packed_gate.out_features)
