"""The one list of benchmark cases, shared by ``pyllm bench`` and ``bench/``.

Shapes come from real models: GPT-2 small (hidden 768), a 1B-class LLaMA
(hidden 2048, as Llama-3.2-1B), BERT-base (hidden 768), plus the 4096-wide
rows that large models and the project's CPU targets use. Each op has an
:class:`OpBench` that makes inputs, runs pyllm with a backend, gives PyTorch's
eager baseline (``torch.compile`` of that baseline is timed too) and the
float64 truth used by the correctness check.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

import pyllm
from pyllm import reference

__all__ = ["Case", "OpBench", "CASES", "BENCHES", "select"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape of one op."""

    op: str
    model: str
    label: str
    dims: tuple  # the op's sizes, named by its OpBench.dim_names
    quick: bool = False  # part of the --quick smoke run

    @property
    def name(self) -> str:
        return f"{self.op} {self.model} {self.label}"

    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.dims)


class OpBench(abc.ABC):
    """How to benchmark one op; one subclass per op."""

    op: str
    dim_names: tuple
    mode = "fwd"

    @abc.abstractmethod
    def inputs(self, case: Case, dtype, device, gen) -> tuple:
        """Fresh random inputs for ``case`` (never zeros)."""

    @abc.abstractmethod
    def pyllm(self, backend: str) -> Callable:
        """A function of the inputs that runs pyllm's op on ``backend``."""

    @abc.abstractmethod
    def eager(self) -> Callable:
        """PyTorch's own eager implementation, a function of the inputs."""

    @abc.abstractmethod
    def truth(self, inputs: tuple) -> torch.Tensor:
        """The float64 result for ``inputs``."""

    def bytes_moved(self, case: Case, dtype) -> int:
        """The fewest bytes the op must move: each input read once, output written once."""
        return 0

    def flops(self, case: Case) -> int:
        """Floating-point operations of one call (0 for memory-bound ops)."""
        return 0


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class NormBench(OpBench):
    """rms_norm, layer_norm and their fused-residual forms (``add_``)."""

    dim_names = ("rows", "hidden")
    eps = 1e-6

    def __init__(self, op: str):
        self.op = op
        self.rms = "rms" in op
        self.fused = op.startswith("add_")

    def inputs(self, case, dtype, device, gen):
        rows, hidden = case.dims
        x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        r = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        w = (torch.rand(hidden, generator=gen) + 0.5).to(device=device, dtype=dtype)
        b = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype)
        return (x, r, w, b) if self.fused else (x, w, b)

    def _split(self, inputs):
        if self.fused:
            return inputs
        x, w, b = inputs
        return x, None, w, b

    def pyllm(self, backend):
        fn = getattr(pyllm, self.op)
        eps = self.eps

        def run(*inputs):
            x, r, w, b = self._split(inputs)
            params = (w,) if self.rms else (w, b)
            out = fn(*((x, r) if self.fused else (x,)), *params, eps, backend=backend)
            return out[0] if self.fused else out
        return run

    def eager(self):
        eps = self.eps

        def run(*inputs):
            x, r, w, b = self._split(inputs)
            total = x + r if self.fused else x
            n = x.shape[-1:]
            return F.rms_norm(total, n, w, eps) if self.rms else F.layer_norm(total, n, w, b, eps)
        return run

    def truth(self, inputs):
        x, r, w, b = (t.double() if t is not None else None for t in self._split(inputs))
        total = x + r if self.fused else x
        if self.rms:
            return reference.rms_norm(total, w, self.eps)[0]
        return reference.layer_norm(total, w, b, self.eps)[0]

    def bytes_moved(self, case, dtype):
        rows, hidden = case.dims
        # x read, y written (+ residual read and sum written), parameters read.
        per_row = (4 if self.fused else 2) * hidden
        return (rows * per_row + (1 if self.rms else 2) * hidden) * _size(dtype)


NORM_OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
BENCHES = {op: NormBench(op) for op in NORM_OPS}

_NORM_SHAPES = [
    ("bert-base", "8x128 tokens", (1024, 768), True),
    ("gpt2", "prefill 512", (512, 768), False),
    ("llama-1b", "prefill 2048", (2048, 2048), False),
    ("llama-1b", "decode 1", (1, 2048), True),
    ("large", "4096 rows", (4096, 4096), False),
    ("large", "decode 1", (1, 4096), False),
]

CASES = [Case(op, model, label, dims, quick=quick and op == "rms_norm")
         for op in NORM_OPS for model, label, dims, quick in _NORM_SHAPES]


def select(ops=None, quick=False) -> list[Case]:
    """The cases of ``ops`` (all when None); only the quick ones when ``quick``."""
    return [c for c in CASES if (ops is None or c.op in ops) and (c.quick or not quick)]
