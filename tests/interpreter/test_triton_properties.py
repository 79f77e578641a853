"""Property-based tests (hypothesis; tests/properties.py draws the calls) of
the Triton kernels on CPU tensors in the Triton interpreter: norms, linear and
SwiGLU, dense and varlen attention, float32 and float16 (bf16 is proven by
compilation), forward and backward, under the harness rule. The interpreter is
slow: a few examples per test in the ci profile."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import properties as P

INTERPRETED_DTYPES = (torch.float32, torch.float16)
NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("op", NORM_OPS)
@P.budget(8)
@given(data=st.data())
def test_norms(op, dtype, data):
    P.check_norm(op, P.draw_norm(data.draw, op, dtype), P.pyllm_norm("triton"))
    P.count(f"{op}/triton")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("op", ("linear", "swiglu"))
@P.budget(8)
@given(data=st.data())
def test_linear(op, dtype, data):
    P.check_linear(op, P.draw_linear(data.draw, op, dtype), P.pyllm_linear("triton"))
    P.count(f"{op}/triton")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@P.budget(8)
@given(data=st.data())
def test_attention(dtype, data):
    call = P.draw_attention(data.draw, dtype, max_seq=24, head_dims=(1, 7, 16, 40, 64, 128))
    P.check_attention(call, P.pyllm_attention("triton"))
    P.count("attention/triton")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@P.budget(8)
@given(data=st.data())
def test_attention_varlen(dtype, data):
    call = P.draw_varlen(data.draw, dtype, max_len=20, head_dims=(7, 16, 40, 64))
    P.check_varlen(call, P.pyllm_varlen("triton"))
    P.count("attention_varlen/triton")
