"""The Triton attention kernels (kernels/attention.py) on CPU tensors in the
Triton interpreter, against the float64 reference under the harness rule:
prefill and split-KV decode forward, backward, GQA, causal with seq_q < seq_k
and seq_q > seq_k, head_dim 40 (padded), varlen with empty and length-1
sequences, every kind of bias, a fully masked row (fp32 and fp16; bf16 is
proven by compilation)."""

import pytest
import torch

import pyllm
import test_attention as cases  # noqa: E402

INTERPRETED_DTYPES = (torch.float32, torch.float16)
PREFILL = [
    (1, 17, 17, 2, 1, 40, True),     # head_dim 40, GQA 2:1
    (2, 7, 7, 4, 4, 64, True),
    (1, 20, 45, 8, 2, 64, True),     # seq_q < seq_k, GQA 8:2
    (1, 33, 20, 2, 2, 32, True),     # seq_q > seq_k: the first queries see nothing
    (1, 30, 17, 2, 1, 64, False),
    (1, 130, 130, 2, 2, 64, True),   # seq 130: many key blocks, a partial last tile
]
DECODE = [(1, 1, 130, 8, 2, 64, True), (2, 4, 40, 2, 2, 40, False)]
VARLEN = [([5, 0, 1, 18], [7, 3, 1, 18], 4, 2, 64, True), ([1, 1], [40, 5], 2, 2, 32, True)]


def test_triton_serves_cpu_tensors_here():
    assert pyllm.backend.op_table()["attention"]["triton"].startswith("cpu")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL + DECODE, ids=str)
def test_forward_and_backward(case, dtype):
    cases.test_forward(case, dtype, "triton")
    cases.test_backward(case, dtype, "triton")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_varlen(case, dtype):
    cases.test_varlen(case, dtype, "triton")


@pytest.mark.parametrize("kind", ["heads x keys", "key padding", "bool", "full float32"])
def test_bias(kind):
    cases.test_bias(kind, torch.float32, backend="triton")


def test_fully_masked_row():
    q, k, v = cases.make((1, 4, 6, 2, 2, 64, False), torch.float32)
    bias = torch.zeros(1, 1, 4, 6)
    bias[..., 1, :] = float("-inf")
    out, lse = pyllm.attention(q, k, v, bias=bias, return_lse=True, backend="triton")
    assert torch.equal(out[0, 1], torch.zeros(2, 64))
    assert torch.isposinf(lse[0, :, 1]).all()
