"""NaN and Inf follow PyTorch's semantics (tests/nonfinite.py states the rule)
in every op on the CPU kernels and the reference backend, every dtype, forward
and backward: one NaN, +inf or -inf in each input (and in the output's
gradient) in turn; attention plain, causal, with a bias that masks a whole
row, and on the split-KV decode path."""

import pytest
import torch

import pyllm
from harness import ISAS, KERNEL_DTYPES, poisoned_outputs, run_under_isa
from nonfinite import (attention_cases, bounds, check, linear_cases, norm_cases, run_pyllm)

CASES = (attention_cases(KERNEL_DTYPES) + norm_cases(KERNEL_DTYPES) +
         linear_cases(KERNEL_DTYPES))


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nan_and_inf_follow_pytorch(case, backend):
    tight, loose = bounds(case)
    with poisoned_outputs():
        ours = run_pyllm(case, backend)
    check(case, ours, tight, loose)


def test_finite_inputs_give_finite_outputs_next_to_a_fully_masked_row():
    """The fully-masked-row rule stays apart from NaN: zeros and lse = +inf,
    and every other row finite."""
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    bias = torch.zeros(1, 2, 5, 5)
    bias[0, 1, 3] = float("-inf")
    out, lse = pyllm.attention(q, k, v, bias=bias, return_lse=True, backend="cpu")
    assert torch.equal(out[0, 3, 1], torch.zeros(16)) and lse[0, 1, 3] == float("inf")
    assert torch.isfinite(out).all() and torch.isfinite(lse).sum() == lse.numel() - 1


def test_a_nan_query_row_is_nan_not_masked():
    """A NaN query gives a NaN row and NaN lse, never the masked row's zeros and +inf."""
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    q[0, 2, 0, 0] = float("nan")
    out, lse = pyllm.attention(q, k, v, return_lse=True, backend="cpu")
    assert torch.isnan(out[0, 2, 0]).all() and torch.isnan(lse[0, 0, 2])
    assert torch.isfinite(out[0, 2, 1]).all() and torch.isfinite(out[0, :2]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant of the CPU kernels (forced in a fresh process) keeps the rule."""
    run_under_isa(isa, """
        import torch
        from nonfinite import (attention_cases, bounds, check, linear_cases, norm_cases,
                               run_pyllm)
        dtypes = (torch.float32, torch.bfloat16)
        cases = (attention_cases(dtypes, values=("nan", "+inf")) +
                 norm_cases(dtypes, values=("nan", "-inf")) +
                 linear_cases(dtypes, values=("nan", "+inf")))
        for case in cases:
            check(case, run_pyllm(case, "cpu"), *bounds(case))
        print(len(cases), "cases")
    """)
