"""ALiBi in the Triton attention kernels on CPU tensors in the Triton
interpreter: the tests of tests/test_attention_alibi.py with backend="triton"
(fp32, and fp16 once; bf16 is proven by compilation)."""

import pytest
import torch

import test_attention_alibi as cases


@pytest.mark.parametrize("per_sequence", [False, True], ids=["heads", "batch-heads"])
@pytest.mark.parametrize("variant", ["causal", "window", "all"])
@pytest.mark.parametrize("shape", [cases.SHAPES[0], cases.SHAPES[3]], ids=str)
def test_forward_and_backward(shape, variant, per_sequence):
    cases.test_forward_and_backward(shape, variant, per_sequence, torch.float32, "triton")


def test_float16():
    cases.test_forward_and_backward(cases.SHAPES[1], "all", True, torch.float16, "triton")


def test_varlen():
    cases.test_varlen("triton")
