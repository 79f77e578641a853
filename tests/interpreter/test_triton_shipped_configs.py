"""The Triton kernels in the interpreter with the tile configurations shipped
for GPUs (kernels.launch.shipped_configs), not only the interpreter's small
tiles: every GEMM configuration (one and two accumulators), the attention
forward, decode and backward tiles at two head dims, against the float64
reference under the harness rule. The norms always run their shipped
configurations (kernels/norm.py has no interpreter tiles)."""

import pytest
import torch

import test_attention as attention_cases
import test_linear as linear_tests
from pyllm.kernels import linear as triton_linear
from pyllm.kernels.launch import shipped_configs


@pytest.mark.parametrize("index", range(len(triton_linear.CONFIGS)))
def test_linear_shipped_config(index):
    with shipped_configs(index):
        # M, N, K past one 128-tile and not multiples of any tile
        linear_tests.test_forward((130, 67, 72), torch.float32, "gelu", "triton")
        linear_tests.test_backward((130, 67, 72), torch.float16, "silu", "triton")


@pytest.mark.parametrize("index", range(len(triton_linear.CONFIGS_TWO)))
def test_swiglu_shipped_config(index):
    with shipped_configs(index):
        linear_tests.test_swiglu((70, 130, 40), torch.float32, True, "triton")


@pytest.mark.parametrize("case", [
    (1, 140, 140, 2, 1, 64, True),    # prefill: two 128-query blocks, GQA
    (1, 40, 70, 2, 2, 128, True),     # head_dim 128's narrower key tiles
    (2, 3, 150, 4, 2, 64, True),      # decode: split-KV and combine
    (1, 1, 90, 2, 2, 128, False),
], ids=str)
def test_attention_shipped_config(case):
    with shipped_configs():
        attention_cases.test_forward(case, torch.float32, "triton")
        attention_cases.test_backward(case, torch.float32, "triton")
