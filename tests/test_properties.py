"""Property-based tests (hypothesis; tests/properties.py draws the calls) of
every op on the CPU kernels and the reference backend, every dtype, forward
and backward, under the harness rule: random shapes with 0 and 1 among the
sizes, random layouts, broadcast biases, GQA, varlen with empty and length-1
sequences, eps and scale values."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import properties as P
from harness import KERNEL_DTYPES

BACKENDS = ("cpu", "reference")
NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("op", NORM_OPS)
@given(data=st.data())
def test_norms(op, dtype, backend, data):
    P.check_norm(op, P.draw_norm(data.draw, op, dtype), P.pyllm_norm(backend))
    P.count(f"{op}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("op", ("linear", "swiglu"))
@given(data=st.data())
def test_linear(op, dtype, backend, data):
    P.check_linear(op, P.draw_linear(data.draw, op, dtype), P.pyllm_linear(backend))
    P.count(f"{op}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@given(data=st.data())
def test_attention(dtype, backend, data):
    P.check_attention(P.draw_attention(data.draw, dtype), P.pyllm_attention(backend))
    P.count(f"attention/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@given(data=st.data())
def test_attention_varlen(dtype, backend, data):
    P.check_varlen(P.draw_varlen(data.draw, dtype), P.pyllm_varlen(backend))
    P.count(f"attention_varlen/{backend}")
