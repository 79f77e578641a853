"""Property-based tests (hypothesis; tests/properties.py draws the calls) of
the CUDA kernels on the host model of tests/cuda_host/, composed the way the
CUDA operators compose them: norms, linear and SwiGLU, dense and varlen
attention, fp16 and bf16, forward and backward, under the harness rule. (The
host functions take contiguous copies: the layouts reach the C++ operator
wrappers only on a GPU.)"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import properties as P
from test_cuda_host_attention import HostAttention
from test_cuda_host_linear import linear, linear_backward, swiglu, swiglu_backward
from test_cuda_host_norms import host_backward, host_forward
from test_norms import Norm

GPU_DTYPES = (torch.float16, torch.bfloat16)
NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")


def host_norm(op, x, r, w, b, eps, grads):
    norm = Norm(op)
    if x.numel() == 0:
        assume(False)  # the host driver takes no empty tensors (the operator returns early)
    x, r = x.contiguous(), r.contiguous() if r is not None else None
    w = w.contiguous() if w is not None else None
    b = b.contiguous() if b is not None else None
    y, total, mean, rstd = host_forward(norm, x, r, w, b, eps)
    normalised = total if norm.fused else x
    grad_sum = grads[1].contiguous() if norm.fused else None
    dx, dw, db = host_backward(norm, grads[0].contiguous(), normalised, mean, rstd, w, grad_sum,
                               want_bias=b is not None)
    outs = [y, total] if norm.fused else [y]
    return outs, [dx, dx if norm.fused else None, dw, db]


def host_linear(op, inputs, act, grad):
    if any(t is not None and t.numel() == 0 for t in inputs) or grad.numel() == 0:
        assume(False)  # the host driver takes no empty tensors (the operator returns early)
    lead = inputs[0].shape[:-1]
    x = inputs[0].reshape(-1, inputs[0].shape[-1]).contiguous()
    rest = [t.contiguous() if t is not None else None for t in inputs[1:]]
    gy = grad.reshape(-1, grad.shape[-1]).contiguous()
    if op == "swiglu":
        y = swiglu(x, *rest)
        grads = list(swiglu_backward(gy, x, *rest))
    else:
        y = linear(x, *rest, act)
        grads = list(linear_backward(gy, x, *rest, act))
    grads[0] = grads[0].reshape(inputs[0].shape)
    return y.reshape(*lead, y.shape[-1]), grads


def host_attention(q, k, v, causal, scale, bias, grad):
    if q.numel() == 0 or k.numel() == 0:
        assume(False)  # the host driver takes no empty tensors (the operator returns early)
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape).masked_fill(~bias, float("-inf"))
    call = HostAttention(q.contiguous(), k.contiguous(), v.contiguous(), bias=bias, causal=causal,
                         scale=scale)
    out, lse = call.forward()
    return out, call.backward(out, lse, grad.contiguous())


def host_varlen(q, k, v, cu_q, cu_k, causal, grad):
    if q.numel() == 0 or k.numel() == 0:
        assume(False)  # the host driver takes no empty tensors (the operator returns early)
    call = HostAttention(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k,
                         causal=causal)
    out, lse = call.forward()
    return out, call.backward(out, lse, grad.contiguous())


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("op", NORM_OPS)
@given(data=st.data())
def test_norms(op, dtype, data):
    call = P.draw_norm(data.draw, op, dtype)
    P.check_norm(op, call, host_norm)
    P.count(f"{op}/cuda-host")


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("op", ("linear", "swiglu"))
@given(data=st.data())
def test_linear(op, dtype, data):
    call = P.draw_linear(data.draw, op, dtype)
    P.check_linear(op, call, host_linear)
    P.count(f"{op}/cuda-host")


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@given(data=st.data())
def test_attention(dtype, data):
    call = P.draw_attention(data.draw, dtype, max_seq=24, head_dims=(7, 16, 40, 64, 128))
    P.check_attention(call, host_attention)
    P.count("attention/cuda-host")


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@given(data=st.data())
def test_attention_varlen(dtype, data):
    call = P.draw_varlen(data.draw, dtype, max_len=20, head_dims=(7, 16, 40, 64, 128))
    P.check_varlen(call, host_varlen)
    P.count("attention_varlen/cuda-host")
