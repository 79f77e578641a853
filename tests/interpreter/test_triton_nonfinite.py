"""NaN and Inf follow PyTorch's semantics (tests/nonfinite.py states the rule)
in the Triton kernels on CPU tensors in the Triton interpreter: every op,
float32 and float16 (bf16 is proven by compilation), forward and backward,
one NaN, +inf or -inf in each input (and in the output's gradient) in turn;
attention plain, causal, with a bias that masks a whole row, and the split-KV
decode path."""

import pytest
import torch

from harness import poisoned_outputs
from nonfinite import attention_cases, bounds, check, linear_cases, norm_cases, run_pyllm

INTERPRETED_DTYPES = (torch.float32, torch.float16)
CASES = (attention_cases((torch.float32,)) +
         attention_cases((torch.float16,), variants=("causal", "decode"), values=("nan",)) +
         norm_cases(INTERPRETED_DTYPES) + linear_cases(INTERPRETED_DTYPES))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nan_and_inf_follow_pytorch(case):
    tight, loose = bounds(case)
    with poisoned_outputs():
        ours = run_pyllm(case, "triton")
    check(case, ours, tight, loose)
