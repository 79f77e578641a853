"""ALiBi in the Triton attention kernels on CPU tensors in the Triton
interpreter: the tests of tests/test_attention_alibi.py with backend="triton"
(fp32, and fp16 once; bf16 is proven by compilation)."""

import pytest
import torch

import test_attention_alibi as cases


@pytest.mark.parametrize("variant, per_sequence", [("causal", False), ("window", True),
                                                   ("all", True)])
@pytest.mark.parametrize("shape", [cases.SHAPES[0], cases.SHAPES[3]], ids=str)
def test_forward_and_backward(shape, variant, per_sequence):
    cases.test_forward_and_backward(shape, variant, torch.float32, "triton", per_sequence)


def test_float16():
    cases.test_forward_and_backward(cases.SHAPES[1], "all", torch.float16, "triton")


def test_varlen():
    cases.test_varlen("triton")
