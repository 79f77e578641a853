"""Every case of pyllm/benchmark/cases.py, timed by pytest-benchmark for pyllm's
default backend and for PyTorch eager, after the same correctness check as
``pyllm bench`` (the forward's output; for fwd+bwd cases the timed call is the
forward and the gradients of every input)."""

import pytest
import torch

from pyllm.accuracy import judge
from pyllm.benchmark.cases import BENCHES, CASES
from pyllm.benchmark.runner import differentiable, forward_backward

DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("implementation", ["pyllm", "eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_case(benchmark, case, dtype, implementation):
    bench = BENCHES[case.op]
    inputs = bench.inputs(case, dtype, "cpu", torch.Generator().manual_seed(0))
    eager = bench.eager(case)
    fn = bench.pyllm(case, None) if implementation == "pyllm" else eager
    verdict = judge(fn(*inputs), bench.truth(case, inputs), eager(*inputs))
    assert verdict.ok, verdict.reason
    if case.mode != "fwd":
        inputs = differentiable(inputs)
        fn = forward_backward(fn, torch.randn(eager(*inputs).shape).to(dtype))
    benchmark.group = f"{case.name} {dtype}"
    benchmark(fn, *inputs)
