"""Attention sinks on the Triton kernels (the sink folded around
pyllm::attention_triton and its backward) on CPU tensors in the Triton
interpreter: the tests of tests/test_attention_sinks.py with
backend="triton" (fp32, and fp16 once; bf16 is proven by compilation)."""

import pytest
import torch

import test_attention_sinks as cases


@pytest.mark.parametrize("shape, variant", [(cases.SHAPES[0], "all"), (cases.SHAPES[3], "causal")],
                         ids=str)
def test_forward_and_backward(shape, variant):
    cases.test_forward_and_backward(shape, variant, torch.float32, "triton")


def test_float16():
    cases.test_forward_and_backward(cases.SHAPES[1], "sliding", torch.float16, "triton")


def test_varlen():
    cases.test_varlen("triton")


def test_a_query_that_sees_no_key():
    cases.test_a_query_that_sees_no_key("triton")
