"""What every Triton launcher needs: the device guard and the registration of
the launchers as the ``pyllm::<op>_triton`` implementations."""

from __future__ import annotations

import contextlib

import torch

from pyllm.backend import triton_interpreting

__all__ = ["on_device", "register"]

_LIB = torch.library.Library("pyllm", "IMPL")


def on_device(t: torch.Tensor):
    """Makes ``t``'s CUDA device current for the launch (Triton launches on the
    current device); nothing for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def register(op: str, fn) -> None:
    """Registers ``fn`` as pyllm::<op> for CUDA tensors, and for CPU tensors
    when the Triton interpreter is on (TRITON_INTERPRET=1 at import)."""
    _LIB.impl(op, fn, "CUDA")
    if triton_interpreting():
        _LIB.impl(op, fn, "CPU")
