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


class RmsNormBench(OpBench):
    op = "rms_norm"
    dim_names = ("rows", "hidden")
    eps = 1e-6

    def inputs(self, case, dtype, device, gen):
        rows, hidden = case.dims
        x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        w = (torch.rand(hidden, generator=gen) + 0.5).to(device=device, dtype=dtype)
        return x, w

    def pyllm(self, backend):
        return lambda x, w: pyllm.rms_norm(x, w, self.eps, backend=backend)

    def eager(self):
        return lambda x, w: F.rms_norm(x, x.shape[-1:], w, self.eps)

    def truth(self, inputs):
        x, w = inputs
        return reference.rms_norm(x.double(), w.double(), self.eps)[0]

    def bytes_moved(self, case, dtype):
        rows, hidden = case.dims
        return (2 * rows * hidden + hidden) * _size(dtype)


BENCHES = {b.op: b for b in (RmsNormBench(),)}

CASES = [
    Case("rms_norm", "bert-base", "8x128 tokens", (1024, 768), quick=True),
    Case("rms_norm", "gpt2", "prefill 512", (512, 768)),
    Case("rms_norm", "llama-1b", "prefill 2048", (2048, 2048)),
    Case("rms_norm", "llama-1b", "decode 1", (1, 2048), quick=True),
    Case("rms_norm", "large", "4096 rows", (4096, 4096)),
    Case("rms_norm", "large", "decode 1", (1, 4096)),
]


def select(ops=None, quick=False) -> list[Case]:
    """The cases of ``ops`` (all when None); only the quick ones when ``quick``."""
    return [c for c in CASES if (ops is None or c.op in ops) and (c.quick or not quick)]
