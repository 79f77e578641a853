"""Paged-KV attention on the Triton kernels (the block-table lookup of
attention_forward_kernel, prefill and split-KV decode) on CPU tensors in the
Triton interpreter: the tests of tests/test_attention_paged.py with
backend="triton" (fp32, and fp16 once; bf16 is proven by compilation)."""

import pytest
import torch

import test_attention_paged as cases


@pytest.mark.parametrize("case, variant", [(cases.CASES[0], "all"), (cases.CASES[2], "causal"),
                                           (cases.CASES[3], "sliding")], ids=str)
def test_forward(case, variant):
    cases.test_forward(case, variant, torch.float32, "triton")


def test_float16_decode_in_big_pages():
    cases.test_forward(cases.CASES[1], "plain", torch.float16, "triton")


def test_bad_input():
    cases.test_bad_input("triton")
