"""What every Triton launcher needs around its launch."""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Makes ``t``'s CUDA device current for the launch (Triton launches on the
    current device); nothing for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
