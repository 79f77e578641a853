"""The Triton GEMM (kernels/linear.py) on CPU tensors in the Triton
interpreter: linear with every epilogue and swiglu, forward and backward,
against the float64 reference under the harness rule (fp32 and fp16; bf16 is
proven by compilation)."""

import pytest
import torch

import pyllm
import test_linear as linear_tests

INTERPRETED_DTYPES = (torch.float32, torch.float16)
# M, N, K not multiples of the tiles; the interpreter's tile is 16 x 32 x 16.
SHAPES = [(1, 7, 7), (17, 33, 40), (40, 100, 50)]


def test_triton_serves_cpu_tensors_here():
    for op in ("linear", "swiglu"):
        assert pyllm.backend.op_table()[op]["triton"].startswith("cpu")


@pytest.mark.parametrize("act", linear_tests.ACTIVATIONS)
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear(shape, dtype, act):
    linear_tests.test_forward(shape, dtype, act, "triton")
    linear_tests.test_backward(shape, dtype, act, "triton")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu(shape, dtype, bias):
    linear_tests.test_swiglu(shape, dtype, bias, "triton")


def test_strided_operands():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 64, generator=gen)[:, ::2]
    w = torch.randn(32, 24, generator=gen).t()  # (24, 32) seen transposed
    y = pyllm.linear(x, w, None, "silu", backend="triton")
    torch.testing.assert_close(y, pyllm.linear(x, w, None, "silu", backend="reference"),
                               rtol=1e-5, atol=1e-5)
