"""The CUDA attention kernels (csrc/cuda/attention_kernel.cu: the
FlashAttention-2 forward on mma.sync, the GQA-packed split-KV decode with its
combine kernel, the dK/dV and dQ backward kernels) run on the host through the
CUDA execution model of tests/cuda_host/, called the way
csrc/cuda/attention.cpp calls them, against the float64 reference under the
harness rule: dense and varlen, causal bottom-right with seq_q != seq_k, GQA
and MQA, additive bias with fully masked rows, head_dim 40..256, fp16 and
bf16, the cp.async and the element-load paths; guard regions around every
buffer."""

import ctypes
import math

import pytest
import torch

from cuda_host_kernels import DTYPE_CODE, Guarded, check_launch, guarded_input, library, ptr
from harness import check_rule, flash_backward_noise, generator, grads_of, randn
from pyllm import reference
from test_attention import (CASES, DECODE_CASES, VARLEN, check_lse, cumulative, make,
                            per_sequence, pytorch_attention)

GPU_DTYPES = (torch.float16, torch.bfloat16)
# Prefill with several key tiles per CTA (the two-stage ring turns over).
LONG_CASES = [(1, 100, 300, 2, 1, 64, True), (1, 70, 200, 1, 1, 256, False)]


def i64(*values):
    return (ctypes.c_int64 * len(values))(*values)


class HostAttention:
    """One attention call on the host-model kernels: dense (batch, seq, heads,
    head_dim) or varlen (tokens, heads, head_dim) with cu_seqlens."""

    def __init__(self, q, k, v, cu_q=None, cu_k=None, bias=None, causal=False, scale=None,
                 offset=0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                 block_table=None, batch_invariant=False):
        # block_table (varlen, forward only): k and v are (pages, page_size,
        # heads_kv, head_dim) pages, cu_k the key counts.
        self.varlen = cu_q is not None
        self.block_table = None if block_table is None else guarded_input(block_table.contiguous())
        self.q, self.k, self.v = q, k, v
        heads, heads_kv, d = q.shape[-2], k.shape[-2], q.shape[-1]
        if self.varlen:
            batch = len(cu_q) - 1
            seq_q = int((cu_q[1:] - cu_q[:-1]).max()) if batch else 0
            seq_k = int((cu_k[1:] - cu_k[:-1]).max()) if batch else 0
        else:
            batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
        alibi_stride = 0 if alibi_slopes is None or alibi_slopes.dim() == 1 else heads
        self.geometry = i64(batch, heads, heads_kv, d, seq_q, seq_k, *window_size, alibi_stride,
                            int(batch_invariant))
        self.softcap = softcap
        self.alibi = None if alibi_slopes is None else guarded_input(
            alibi_slopes.float().contiguous())
        self.cu = [guarded_input(c) for c in (cu_q, cu_k)] if self.varlen else [None, None]
        self.scale = scale if scale is not None else 1 / math.sqrt(d)
        self.causal = causal
        self.offset = offset
        self.lse_shape = (heads, q.shape[0]) if self.varlen else (batch, heads, seq_q)
        self.bias = None
        self.bias_strides = i64(0, 0, 0, 0)
        if bias is not None:
            self.bias = guarded_input(bias.contiguous())
            view = self.bias.tensor.expand(batch, heads, seq_q, seq_k)
            self.bias_strides = i64(*view.stride())

    def strides(self, t):
        s = t.stride()
        return (0, s[0], s[1]) if self.varlen and t.dim() == 3 else (s[0], s[1], s[2])

    def lse_strides(self):
        return i64(0, self.lse_shape[1]) if self.varlen else i64(self.lse_shape[1] * self.lse_shape[2],
                                                                  self.lse_shape[2])

    def common(self):
        return (self.geometry, ptr(self.cu[0]), ptr(self.cu[1]), ctypes.c_float(self.scale),
                ctypes.c_float(self.softcap), ptr(self.alibi), int(self.causal),
                DTYPE_CODE[self.q.dtype])

    def bias_args(self):
        bias_type = DTYPE_CODE[self.bias.tensor.dtype] if self.bias is not None else 0
        return ptr(self.bias), bias_type, self.bias_strides

    def forward(self):
        lib = library()
        g = [guarded_input(t.contiguous(), self.offset) for t in (self.q, self.k, self.v)]
        out = Guarded(g[0].tensor, offset=self.offset)
        lse = Guarded(torch.empty(self.lse_shape))
        words = lib.host_attention_forward_workspace(self.geometry)
        workspace = Guarded(torch.empty(words)) if words else None
        strides = i64(*[s for t in (*g, out) for s in self.strides(t.tensor)])
        if self.block_table is not None:
            table = self.block_table.tensor
            check_launch(lib.host_attention_forward_paged(
                *self.common(), g[0].ptr, g[1].ptr, g[2].ptr, out.ptr, strides, lse.ptr,
                self.lse_strides(), self.block_table.ptr, ctypes.c_int64(self.k.shape[1]),
                ctypes.c_int64(table.stride(0)), ptr(workspace)), "paged attention forward")
        else:
            check_launch(lib.host_attention_forward(
                *self.common(), g[0].ptr, g[1].ptr, g[2].ptr, out.ptr, strides, lse.ptr,
                self.lse_strides(), *self.bias_args(), ptr(workspace)), "attention forward")
        for name, t in (("out", out), ("lse", lse), ("workspace", workspace)):
            if t is not None:
                t.check(name)
        self.decode = words > 0
        return out.tensor, lse.tensor

    def backward(self, out, lse, grad):
        lib = library()
        delta = (grad.float() * out.float()).sum(-1)
        delta = (delta.t() if self.varlen else delta.permute(0, 2, 1)).contiguous()
        ins = [guarded_input(t.contiguous(), self.offset)
               for t in (self.q, self.k, self.v, out, grad)]
        grads = [Guarded(t.tensor, offset=self.offset) for t in ins[:3]]
        strides = i64(*[s for t in (*ins, *grads) for s in self.strides(t.tensor)])
        glse, gdelta = guarded_input(lse), guarded_input(delta)
        check_launch(lib.host_attention_backward(
            *self.common(), *(t.ptr for t in ins), *(t.ptr for t in grads), strides, glse.ptr,
            gdelta.ptr, self.lse_strides(), *self.bias_args()), "attention backward")
        for name, t in zip(("grad_q", "grad_k", "grad_v"), grads):
            t.check(name)
        return [t.tensor for t in grads]


def check_grads(ours, exact, theirs, noise=(0.0, 0.0, 0.0)):
    for name, g, t, p, n in zip("qkv", ours, exact, theirs, noise):
        check_rule(g, t, p, factor=3, what=f"grad {name}", noise=n)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + LONG_CASES + DECODE_CASES, ids=str)
def test_forward(case, dtype):
    q, k, v = make(case, dtype, "cuda-host")
    causal = case[-1]
    call = HostAttention(q, k, v, causal=causal)
    out, lse = call.forward()
    t_out, t_lse = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    check_rule(out, t_out, pytorch_attention(q, k, v, causal=causal))
    check_lse(lse, t_lse)
    if case in DECODE_CASES[:3]:
        assert call.decode, "expected the split-KV decode path"


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:6] + CASES[7:] + LONG_CASES + DECODE_CASES[2:], ids=str)
def test_backward(case, dtype):
    q, k, v = make(case, dtype, "cuda-host-backward")
    causal = case[-1]
    grad = randn(q.shape, dtype, gen=generator("cuda-host-attention-grad", case, dtype))
    call = HostAttention(q, k, v, causal=causal)
    out, lse = call.forward()
    ours = call.backward(out, lse, grad)
    exact = grads_of(lambda *t: reference.attention(*t, causal=causal)[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: pytorch_attention(*t, causal=causal), (q, k, v), grad)
    check_grads(ours, exact, theirs, flash_backward_noise(q, k, v, grad))


@pytest.mark.parametrize("offset", (0, 1))
@pytest.mark.parametrize("head_dim", (40, 7))
def test_element_load_path(head_dim, offset):
    """head_dim not a multiple of 8, or pointers off 16 bytes: element loads."""
    case = (2, 33, 70, 4, 2, head_dim, True)
    q, k, v = make(case, torch.float16, "cuda-host-unaligned")
    grad = randn(q.shape, torch.float16, gen=generator("cuda-host-unaligned-grad", case))
    call = HostAttention(q, k, v, causal=True, offset=offset)
    out, lse = call.forward()
    t_out, t_lse = reference.attention(q.double(), k.double(), v.double(), causal=True)
    check_rule(out, t_out, pytorch_attention(q, k, v, causal=True))
    check_lse(lse, t_lse)
    exact = grads_of(lambda *t: reference.attention(*t, causal=True)[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: pytorch_attention(*t, causal=True), (q, k, v), grad)
    check_grads(call.backward(out, lse, grad), exact, theirs)


@pytest.mark.parametrize("kind", ["heads x keys", "key padding", "masked row float32"])
def test_bias(kind):
    dtype = torch.bfloat16
    case = (2, 33, 47, 4, 2, 64, False)
    q, k, v = make(case, dtype, "cuda-host-bias", kind)
    gen = generator("cuda-host-bias", kind)
    if kind == "heads x keys":
        bias = randn((1, 4, 1, 47), dtype, gen=gen)
    elif kind == "key padding":
        bias = torch.zeros(2, 1, 1, 47, dtype=dtype)
        bias[1, ..., 30:] = float("-inf")
    else:  # float32 bias with a query that sees no key at all
        bias = randn((2, 4, 33, 47), torch.float32, gen=gen)
        bias[0, 1, 5, :] = float("-inf")
    call = HostAttention(q, k, v, bias=bias)
    out, lse = call.forward()
    t_out, t_lse = reference.attention(q.double(), k.double(), v.double(), bias=bias.double())
    check_rule(out, t_out, pytorch_attention(q, k, v, bias=bias))
    check_lse(lse, t_lse)
    grad = randn(q.shape, dtype, gen=gen)
    ours = call.backward(out, lse, grad)
    # A query that sees no key has a constant (zero) output: its gradient
    # flows nowhere. The reference's softmax over all -inf has a NaN
    # gradient, so the truth is taken with that row's gradient zeroed and a
    # finite bias there (which then changes nothing).
    grad_truth, bias_truth = grad.clone(), bias.clone()
    if kind == "masked row float32":
        grad_truth[0, 5, 1] = 0
        bias_truth[0, 1, 5, :] = 0
        assert torch.equal(ours[0][0, 5, 1], torch.zeros_like(ours[0][0, 5, 1]))
    exact = grads_of(lambda *t: reference.attention(*t, bias=bias_truth.double())[0],
                     [t.double() for t in (q, k, v)], grad_truth)
    theirs = grads_of(lambda *t: pytorch_attention(*t, bias=bias_truth), (q, k, v), grad_truth)
    check_grads(ours, exact, theirs)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_varlen(case, dtype):
    lq, lk, h, hkv, d, causal = case
    gen = generator("cuda-host-varlen", case, dtype)
    q = randn((sum(lq), h, d), dtype, gen=gen)
    k = randn((sum(lk), hkv, d), dtype, gen=gen)
    v = randn((sum(lk), hkv, d), dtype, gen=gen)
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    grad = randn(q.shape, dtype, gen=gen)

    call = HostAttention(q, k, v, cu_q, cu_k, causal=causal)
    out, lse = call.forward()
    t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k,
                                              causal=causal)
    check_rule(out, t_out, per_sequence(lambda *t: pytorch_attention(*t, causal=causal), q, k, v,
                                        cu_q, cu_k))
    check_lse(lse, t_lse)
    exact = grads_of(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, causal=causal)[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: per_sequence(lambda *s: pytorch_attention(*s, causal=causal), *t,
                                              cu_q, cu_k), (q, k, v), grad)
    check_grads(call.backward(out, lse, grad), exact, theirs)
