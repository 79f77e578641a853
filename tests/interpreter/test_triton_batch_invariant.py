"""Batch-invariant mode on the Triton kernels (the fixed GEMM tile, no
split-KV decode, aligned window blocks) on CPU tensors in the Triton
interpreter: the tests of tests/test_batch_invariant.py with backend="triton"
(fp32 and fp16; bf16 is proven by compilation).

The interpreter computes tl.dot with numpy's matmul, whose BLAS (OpenBLAS'
Haswell and Zen kernels) sums a row in an order that depends on the row's
place in the block: a row's bits then changed with the rows around it, which
no GPU matrix instruction does. Here every row of a tl.dot is computed on its
own (row_independent_dot), so that the tests see the kernels' own invariance.
"""

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

import test_batch_invariant as cases

DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def row_independent_dot(monkeypatch):
    """tl.dot in the interpreter, one output row at a time (same semantics)."""
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        rows = a.data.shape[-2]
        parts = [original(self, interpreter.TensorHandle(a.data[..., i:i + 1, :], a.dtype), b,
                          interpreter.TensorHandle(d.data[..., i:i + 1, :], d.dtype),
                          *args, **kwargs) for i in range(rows)]
        return interpreter.TensorHandle(np.concatenate([p.data for p in parts], axis=-2),
                                        parts[0].dtype)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear(dtype):
    cases.test_linear(dtype, "silu", "triton")


def test_swiglu():
    cases.test_swiglu(torch.float32, "triton")


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm"])
def test_norms(op):
    cases.test_norms(op, torch.float32, "triton")


def test_rotary():
    cases.test_rotary(torch.float16, "triton")


def test_cross_entropy():
    cases.test_cross_entropy(torch.float32, "triton")


def test_paged_kv_append():
    cases.test_paged_kv_append(torch.float32, "triton")


def test_linear_cross_entropy():
    cases.test_linear_cross_entropy(torch.float32, "triton")


@pytest.mark.parametrize("variant, dtype", [("causal", torch.float16), ("window", torch.float32),
                                            ("alibi", torch.float32)], ids=str)
def test_attention_prefill_equals_decode(variant, dtype):
    cases.test_attention_prefill_equals_decode(variant, dtype, "triton")


@pytest.mark.parametrize("variant", ["window", "bidirectional"])
def test_attention_varlen_packing(variant):
    cases.test_attention_varlen_packing(variant, torch.float32, "triton")


def test_attention_paged_equals_contiguous():
    cases.test_attention_paged_equals_contiguous(16, "triton")
