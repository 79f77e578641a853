"""Every case of pyllm/benchmark/cases.py, timed by pytest-benchmark for pyllm's
default backend and for PyTorch eager, after the same correctness check as
``pyllm bench``."""

import pytest
import torch

from pyllm.accuracy import judge
from pyllm.benchmark.cases import BENCHES, CASES

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
    benchmark.group = f"{case.name} {dtype}"
    benchmark(fn, *inputs)
