"""What every Triton launcher needs: the device guard and the registration of
the launchers as the ``pyllm::<op>_triton`` implementations."""

from __future__ import annotations

import contextlib

import torch

from pyllm.backend import triton_interpreting

__all__ = ["on_device", "register", "shipped_configs", "shipped_config_index"]

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


_SHIPPED_INDEX: int | None = None


@contextlib.contextmanager
def shipped_configs(index: int = 0):
    """Under the Triton interpreter, launches inside the block use the tile
    configurations shipped for GPUs (for autotuned kernels, the ``index``-th
    one, modulo their number) instead of the interpreter's small tiles: the
    interpreter tests run each kernel's real tiling too. Nothing changes on
    a GPU, where the shipped configurations always run."""
    global _SHIPPED_INDEX
    previous, _SHIPPED_INDEX = _SHIPPED_INDEX, index
    try:
        yield
    finally:
        _SHIPPED_INDEX = previous


def shipped_config_index() -> int | None:
    """The index set by :func:`shipped_configs` under the interpreter, else None."""
    return _SHIPPED_INDEX if triton_interpreting() else None


def interpreter_tiles() -> bool:
    """Whether launches use the interpreter's small tiles (interpreting, and
    not inside :func:`shipped_configs`)."""
    return triton_interpreting() and _SHIPPED_INDEX is None
