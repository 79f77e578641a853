"""The Triton rotary kernel (kernels/rotary.py) on CPU tensors in the Triton
interpreter: the tests of tests/test_rotary.py with backend="triton" (fp32 and
fp16; bf16 is proven by compilation), and a position outside the tables
giving NaN, never a read outside them."""

import pytest
import torch

import pyllm
import test_rotary as cases

INTERPRETED_DTYPES = (torch.float32, torch.float16)


def test_triton_serves_cpu_tensors_here():
    assert pyllm.backend.op_table()["rotary"]["triton"].startswith("cpu")


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("case", cases.CASES, ids=str)
def test_forward(case, dtype, interleaved):
    cases.test_forward(case, dtype, interleaved, "triton")


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("case", cases.CASES[1:4], ids=str)
def test_backward(case, interleaved):
    cases.test_backward(case, torch.float32, interleaved, "triton")


def test_positions_forms_and_layouts():
    cases.test_positions_forms_and_layouts("triton")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nonfinite_like_pytorch(value):
    cases.test_nonfinite_like_pytorch("triton", value)


def test_out_of_range_position_gives_nan():
    q, k, cos, sin, _ = cases.make((1, 3, 2, 1, 16, 16), torch.float32, "range", max_positions=8)
    torch.ops.pyllm.rotary_triton(q, k, cos, sin, torch.tensor([[0, 8, -1]]), False, False)
    assert q[0, 1:].isnan().all() and not q[0, 0].isnan().any()
