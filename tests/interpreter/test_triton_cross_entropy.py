"""The Triton cross-entropy kernel (kernels/cross_entropy.py) on CPU tensors in
the Triton interpreter: the tests of tests/test_cross_entropy.py with
backend="triton" (fp32 and fp16; bf16 is proven by compilation), and a target
outside the vocabulary giving NaN, never a read outside the row."""

import pytest
import torch

import pyllm
import test_cross_entropy as cases

INTERPRETED_DTYPES = (torch.float32, torch.float16)


def test_triton_serves_cpu_tensors_here():
    assert pyllm.backend.op_table()["cross_entropy"]["triton"].startswith("cpu")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", list(cases.OPTIONS), ids=str)
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", cases.SHAPES, ids=str)
def test_cross_entropy(shape, dtype, options, reduction):
    cases.test_cross_entropy(shape, dtype, options, reduction, "triton")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", cases.LINEAR_SHAPES, ids=str)
def test_linear_cross_entropy(shape, reduction):
    cases.test_linear_cross_entropy(shape, torch.float32, True, reduction, "triton")


def test_nan_like_pytorch():
    cases.test_nan_like_pytorch("triton")


def test_bad_target_gives_nan():
    logits, _, _ = cases.make((3, 20), torch.float32, "bad target")
    loss, _, grad = torch.ops.pyllm.cross_entropy_triton(logits, torch.tensor([0, 20, -5]), -100,
                                                         0.0, 0.0, 0.0, True)
    assert not loss[0].isnan() and loss[1:].isnan().all() and grad[1:].isnan().all()
