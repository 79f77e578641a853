"""Batch-invariant mode on the Triton kernels (the fixed GEMM tile, no
split-KV decode, aligned window blocks) on CPU tensors in the Triton
interpreter: the tests of tests/test_batch_invariant.py with backend="triton"
(fp32 and fp16; bf16 is proven by compilation)."""

import pytest
import torch

import test_batch_invariant as cases

DTYPES = (torch.float32, torch.float16)


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
