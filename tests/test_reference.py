"""The references are the truth every kernel is held to, so they are checked
here against PyTorch's own functions, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from harness import generator, randn
from pyllm import reference

D = torch.float64


def rand(*shape, key="", offset=0.0):
    return randn(shape, D, gen=generator("reference", shape, key), offset=offset)


def test_rms_norm():
    x, w = rand(7, 127), rand(127, offset=1.0)
    y, rstd = reference.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, F.rms_norm(x, (127,), w, 1e-5))
    torch.testing.assert_close(rstd, 1 / torch.sqrt(x.pow(2).mean(-1) + 1e-5))


def test_layer_norm():
    x, w, b = rand(7, 127), rand(127, offset=1.0), rand(127)
    y, mean, rstd = reference.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (127,), w, b, 1e-5))
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, 1 / torch.sqrt(x.var(-1, unbiased=False) + 1e-5))
    torch.testing.assert_close(reference.layer_norm(x, None, None, 1e-5)[0],
                               F.layer_norm(x, (127,), None, None, 1e-5))


def test_fused_residual_forms():
    x, r, w, b = rand(5, 33), rand(5, 33, key="r"), rand(33, offset=1.0), rand(33)
    y, total, _ = reference.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (33,), w, 1e-6))
    y, total, _, _ = reference.add_layer_norm(x, r, w, b, 1e-6)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (33,), w, b, 1e-6))


def test_low_precision_rounds_once_from_float32():
    x = rand(4, 64).to(torch.bfloat16)
    y, rstd = reference.rms_norm(x, None, 1e-6)
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32
    torch.testing.assert_close(y, F.rms_norm(x.float(), (64,), None, 1e-6).to(torch.bfloat16),
                               rtol=0, atol=0)


@pytest.mark.parametrize("activation, fn", [
    ("none", lambda t: t), ("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
    ("silu", F.silu)])
def test_linear(activation, fn):
    x, w, b = rand(3, 5, 17), rand(11, 17), rand(11)
    torch.testing.assert_close(reference.linear(x, w, b, activation), fn(F.linear(x, w, b)))
    torch.testing.assert_close(reference.linear(x, w, None, activation), fn(F.linear(x, w)))


def test_swiglu():
    x, wg, wu, bg, bu = rand(4, 17), rand(9, 17), rand(9, 17, key="u"), rand(9), rand(9, key="u")
    expected = F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    torch.testing.assert_close(reference.swiglu(x, wg, wu, bg, bu), expected)


def sdpa(q, k, v, causal=False, scale=None, mask=None):
    """PyTorch's SDPA on (batch, seq, heads, dim) tensors, with GQA."""
    h = q.shape[2]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads, heads_kv", [(4, 4), (8, 2), (6, 1)])
def test_attention_matches_sdpa(heads, heads_kv):
    q, k, v = rand(2, 7, heads, 40), rand(2, 9, heads_kv, 40, key="k"), rand(2, 9, heads_kv, 40, key="v")
    out, lse = reference.attention(q, k, v)
    torch.testing.assert_close(out, sdpa(q, k, v))
    kk = k.repeat_interleave(heads // heads_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(40)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_causal_is_bottom_right_aligned():
    q, k, v = rand(1, 3, 2, 8), rand(1, 5, 2, 8, key="k"), rand(1, 5, 2, 8, key="v")
    # query i sees keys j <= i + 2
    allowed = torch.arange(5)[None, :] <= torch.arange(3)[:, None] + 2
    mask = torch.zeros(3, 5, dtype=D).masked_fill(~allowed, float("-inf"))
    out, _ = reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, sdpa(q, k, v, mask=mask))
    # square causal equals SDPA's is_causal
    q2 = rand(1, 5, 2, 8, key="q2")
    torch.testing.assert_close(reference.attention(q2, k, v, causal=True)[0],
                               sdpa(q2, k, v, causal=True))


def test_bias_and_scale():
    q, k, v = rand(2, 4, 3, 16), rand(2, 6, 3, 16, key="k"), rand(2, 6, 3, 16, key="v")
    bias = rand(1, 3, 4, 6, key="bias")
    out, _ = reference.attention(q, k, v, bias=bias, scale=0.3)
    torch.testing.assert_close(out, sdpa(q, k, v, mask=bias, scale=0.3))


def test_rows_that_see_no_key_are_zero_with_infinite_lse():
    q, k, v = rand(1, 2, 1, 8), rand(1, 3, 1, 8, key="k"), rand(1, 3, 1, 8, key="v")
    bias = torch.zeros(1, 1, 2, 3, dtype=D)
    bias[..., 0, :] = float("-inf")  # first query masked out entirely
    out, lse = reference.attention(q, k, v, bias=bias)
    assert torch.equal(out[0, 0], torch.zeros(1, 8, dtype=D))
    assert torch.isposinf(lse[0, 0, 0]) and torch.isfinite(lse[0, 0, 1])
    torch.testing.assert_close(out[:, 1:], sdpa(q[:, 1:], k, v))


def test_varlen_matches_per_sequence_attention():
    lens_q, lens_k = [3, 1, 0, 5], [4, 1, 2, 5]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = rand(sum(lens_q), 4, 8), rand(sum(lens_k), 2, 8, key="k"), rand(sum(lens_k), 2, 8, key="v")
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    for i in range(4):
        qs, ks, vs = (q[cu_q[i]:cu_q[i + 1]][None], k[cu_k[i]:cu_k[i + 1]][None],
                      v[cu_k[i]:cu_k[i + 1]][None])
        o, l = reference.attention(qs, ks, vs, causal=True)
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]], o[0])
        torch.testing.assert_close(lse[:, cu_q[i]:cu_q[i + 1]], l[0])
