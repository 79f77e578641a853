"""The paged-KV append on the Triton kernel on CPU tensors in the Triton
interpreter: the tests of tests/test_paged_kv_append.py with
backend="triton" (every dtype: the kernel does no tl.dot)."""

import pytest
import torch

import test_paged_kv_append as cases


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", cases.CASES, ids=str)
def test_append(case, dtype, interleaved):
    cases.test_append(case, dtype, interleaved, "triton")


def test_q_rotated_and_read_back_by_attention():
    cases.test_q_rotated_and_read_back_by_attention("triton")


def test_bad_input():
    cases.test_bad_input("triton")
