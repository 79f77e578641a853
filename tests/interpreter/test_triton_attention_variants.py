"""The Triton attention kernels' sliding window and softcap on CPU tensors in
the Triton interpreter: the tests of tests/test_attention_variants.py with
backend="triton" (fp32, and fp16 once; bf16 is proven by compilation). A
selection: the interpreter runs about 3 s per case."""

import pytest
import torch

import test_attention_variants as cases

SHAPES = [cases.SHAPES[0], cases.SHAPES[2], cases.SHAPES[3]]  # GQA, seq_q > seq_k, decode


@pytest.mark.parametrize("variant", ["sliding", "window", "right", "all"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward(shape, variant):
    cases.test_forward_and_backward(shape, variant, torch.float32, "triton")


def test_float16():
    cases.test_forward_and_backward(cases.SHAPES[0], "all", torch.float16, "triton")


def test_varlen():
    cases.test_varlen("all", "triton")
