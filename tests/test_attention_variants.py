"""Attention variants: sliding windows (flash-attn's window_size) and Gemma 2's
softcap, alone and together with causal, GQA, varlen, decode and a bias,
against the float64 reference under the harness rule (PyTorch's own answer:
the same composition in the dtype under test), forward and backward, on the
CPU kernel, the reference backend and the CUDA kernels run on the host
("cuda-host", fp16/bf16); the Triton kernels run these tests in the
interpreter (tests/interpreter/test_triton_attention_variants.py)."""

import pytest
import torch

import pyllm
from harness import (ISAS, KERNEL_DTYPES, check_rule, generator, grads_of, poisoned_outputs,
                     randn, run_under_isa)
from pyllm import reference
from test_attention import check_lse, cumulative

CPU_BACKENDS = ("cpu", "reference")
#: the CUDA kernels run on the host (tests/cuda_host/, every buffer guarded)
HOST = "cuda-host"
GPU_DTYPES = (torch.float16, torch.bfloat16)

# (batch, seq_q, seq_k, heads, heads_kv, head_dim)
SHAPES = [
    (2, 77, 77, 4, 2, 64),      # prefill, GQA
    (1, 40, 150, 2, 1, 40),     # seq_q < seq_k (bottom-right), MQA, odd head_dim
    (1, 150, 70, 2, 2, 32),     # seq_q > seq_k: early queries see few keys or none
    (2, 3, 300, 4, 2, 64),      # decode path (<= 8 queries), split keys
]
# (causal, window_size, softcap)
VARIANTS = {
    "sliding": (True, (16, 0), 0.0),
    "window": (False, (9, 4), 0.0),
    "left": (False, (20, -1), 0.0),
    "right": (False, (-1, 3), 0.0),
    "softcap": (False, (-1, -1), 2.0),
    "softcap-causal": (True, (-1, -1), 1.5),
    "all": (True, (23, 0), 3.0),
}


def make(shape, dtype, *key, q_scale=1.0):
    b, sq, sk, h, hkv, d = shape
    gen = generator("attention variant", shape, dtype, *key)
    return (randn((b, sq, h, d), dtype, gen=gen, scale=q_scale),
            randn((b, sk, hkv, d), dtype, gen=gen), randn((b, sk, hkv, d), dtype, gen=gen))


def scores_and_values(q, k, v, softcap=0.0):
    """(scaled scores (batch, heads, seq_q, seq_k), softcapped when asked, and
    v with its heads repeated (batch, heads, seq_k, head_dim)), in q's dtype:
    the start of PyTorch's composition."""
    h, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    kh = k.repeat_interleave(h // hkv, 2).transpose(1, 2)
    s = (q.transpose(1, 2) @ kh.transpose(-1, -2)) * d ** -0.5
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s, v.repeat_interleave(h // hkv, 2).transpose(1, 2)


def distances(q, k):
    """(i + seq_k - seq_q) - j per (query i, key j): the bottom-right
    aligned offset of each key from each query's diagonal."""
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    return i - torch.arange(sk, device=q.device)[None, :]


def hidden_by(q, k, causal, window_size):
    """The (seq_q, seq_k) bool mask of the keys outside each query's window."""
    offset = distances(q, k)  # i' - j
    left, right = window_size[0], 0 if causal else window_size[1]
    hidden = torch.zeros(offset.shape, dtype=torch.bool, device=q.device)
    if right >= 0:
        hidden |= -offset > right
    if left >= 0:
        hidden |= offset > left
    return hidden


def composed(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, bias=None):
    """PyTorch's own composition in q's dtype: scores, tanh, mask, softmax,
    P V; rows that see no key are zeros."""
    s, vh = scores_and_values(q, k, v, softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    p = torch.softmax(s.masked_fill(hidden_by(q, k, causal, window_size), float("-inf")), dim=-1)
    return torch.nan_to_num((p @ vh).transpose(1, 2), nan=0.0)


def truth(q, k, v, **kw):
    return reference.attention(q.double(), k.double(), v.double(), **kw)


BACKEND_DTYPES = [(b, d) for b in CPU_BACKENDS for d in KERNEL_DTYPES] + \
    [(HOST, d) for d in GPU_DTYPES]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward(shape, variant, dtype, backend):
    causal, window, cap = VARIANTS[variant]
    kw = dict(causal=causal, window_size=window, softcap=cap)
    # under a softcap, larger scores than unit normals, so that the cap bites
    q, k, v = make(shape, dtype, variant, q_scale=3.0 if cap else 1.0)
    grad = randn(q.shape, dtype, gen=generator("variant grad", shape, variant, dtype))
    if backend == HOST:
        from test_cuda_host_attention import HostAttention

        call = HostAttention(q, k, v, causal=causal, window_size=window, softcap=cap)
        out, lse = call.forward()
        ours = call.backward(out, lse, grad)
    else:
        with poisoned_outputs():
            out, lse = pyllm.attention(q, k, v, return_lse=True, backend=backend, **kw)
        ours = grads_of(lambda *t: pyllm.attention(*t, backend=backend, **kw), (q, k, v), grad)
    t_out, t_lse = truth(q, k, v, **kw)
    check_rule(out, t_out, composed(q, k, v, **kw))
    check_lse(lse, t_lse)
    exact = grads_of(lambda *t: reference.attention(*t, **kw)[0], [t.double() for t in (q, k, v)],
                     grad)
    theirs = grads_of(lambda *t: composed(*t, **kw), (q, k, v), grad)
    for name, g, t, p in zip("qkv", ours, exact, theirs):
        check_rule(g, t, p, factor=3, what=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["sliding", "window", "all"])
def test_varlen(variant, backend, dtype=torch.float32):
    """Each packed sequence gets its own bottom-right window."""
    causal, window, cap = VARIANTS[variant]
    kw = dict(causal=causal, window_size=window, softcap=cap)
    lq, lk = [5, 0, 70, 33], [9, 4, 70, 100]
    gen = generator("variant varlen", variant)
    q, k, v = (randn((sum(lq), 4, 48), gen=gen, scale=3.0), randn((sum(lk), 2, 48), gen=gen),
               randn((sum(lk), 2, 48), gen=gen))
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    with poisoned_outputs():
        out, lse = pyllm.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend=backend,
                                          **kw)
    t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, **kw)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-4, atol=1e-5)
    check_lse(lse, t_lse)
    grad = randn(q.shape, gen=gen)
    ours = grads_of(lambda *t: pyllm.attention_varlen(*t, cu_q, cu_k, backend=backend, **kw),
                    (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, **kw)[0],
                     [t.double() for t in (q, k, v)], grad)
    for name, g, t in zip("qkv", ours, exact):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def test_diagonal_window():
    """window (0, 0): every query sees one key, its own diagonal (a
    recomputed P is 1 within rounding, not exactly, hence a tolerance)."""
    q, k, v = make((2, 40, 90, 4, 2, 40), torch.float32, "diagonal")
    kw = dict(window_size=(0, 0))
    out = pyllm.attention(q, k, v, **kw)
    torch.testing.assert_close(out, v.repeat_interleave(2, 2)[:, 50:], rtol=1e-6, atol=1e-6)
    grad = randn(q.shape, gen=generator("diagonal grad"))
    ours = grads_of(lambda *t: pyllm.attention(*t, **kw), (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention(*t, **kw)[0], [t.double() for t in (q, k, v)],
                     grad)
    for name, g, t in zip("qkv", ours, exact):
        torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


def test_window_with_bias_and_a_query_that_sees_nothing():
    """A bias on top of a window; queries whose window holds no key give
    zeros and lse = +inf, with zero gradients."""
    shape = (1, 30, 12, 2, 2, 64)  # seq_q > seq_k: queries 0..17 see keys j <= i - 18
    q, k, v = make(shape, torch.float32, "bias", q_scale=3.0)
    bias = randn((1, 2, 30, 12), gen=generator("variant bias"))
    kw = dict(window_size=(2, 0), softcap=4.0, bias=bias)
    out, lse = pyllm.attention(q, k, v, return_lse=True, **kw)
    t_out, t_lse = truth(q, k, v, window_size=(2, 0), softcap=4.0, bias=bias.double())
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-5)
    check_lse(lse, t_lse)
    assert torch.isposinf(lse[0, :, :18]).all() and (out[0, :18] == 0).all()
    grads = grads_of(lambda *t: pyllm.attention(*t, **kw), (q, k, v), torch.ones(q.shape))
    assert (grads[0][0, :18] == 0).all()


def test_window_skips_key_blocks():
    """Outside the window nothing is read: NaN keys and values there change nothing."""
    q, k, v = make((1, 200, 200, 2, 2, 64), torch.float32, "skips")
    far_k, far_v = k.clone(), v.clone()
    far_k[:, :64], far_v[:, :64] = float("nan"), float("nan")  # before every window of 160..
    want = pyllm.attention(q[:, 160:], k, v, causal=True, window_size=(20, 0))
    got = pyllm.attention(q[:, 160:], far_k, far_v, causal=True, window_size=(20, 0))
    assert torch.equal(want, got)


def test_bad_arguments():
    q, k, v = make((1, 4, 4, 2, 2, 64), torch.float32, "bad")
    with pytest.raises(TypeError, match="window_size must be a pair of ints"):
        pyllm.attention(q, k, v, window_size=(4,))
    with pytest.raises(ValueError, match="window_size entries must be -1"):
        pyllm.attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="causal is window_size\\[1\\] = 0"):
        pyllm.attention(q, k, v, causal=True, window_size=(4, 2))
    with pytest.raises(ValueError, match="softcap"):
        pyllm.attention(q, k, v, softcap=-1.0)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant of the CPU kernel (forced in a fresh process) meets the rule."""
    run_under_isa(isa, """
        import torch
        import test_attention_variants as t
        for dtype in t.KERNEL_DTYPES:
            for shape in (t.SHAPES[0], t.SHAPES[3]):
                for variant in ("window", "all"):
                    t.test_forward_and_backward(shape, variant, dtype, "cpu")
    """)


def test_opcheck_and_compile():
    """The op's registration with a window and a softcap (fake, autograd),
    and torch.compile(fullgraph) over it."""
    q, k, v = make((1, 9, 11, 4, 2, 64), torch.float32, "opcheck")
    op = torch.ops.pyllm.attention.default
    for args in [(q, k, v, None, None, 9, 11, None, 0.125, True, 4, 0, 0.0),
                 (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, 9, 11,
                  None, 0.125, False, 3, 2, 5.0)]:
        torch.library.opcheck(op, args)
    fn = torch.compile(lambda *t: pyllm.attention(*t, causal=True, window_size=(4, 0),
                                                  softcap=5.0), fullgraph=True)
    q, k, v = (t.detach() for t in (q, k, v))
    torch.testing.assert_close(fn(q, k, v), pyllm.attention(q, k, v, causal=True,
                                                            window_size=(4, 0), softcap=5.0))


def check_varlen_on_the_cuda_kernels(key, q_scale=3.0, alibi_slopes=None, **kw):
    """The CUDA kernels (on the host) over packed fp16 sequences of
    different lengths (an empty one among them) with the variant ``kw``
    (and ALiBi slopes), against the float64 reference."""
    from test_cuda_host_attention import HostAttention

    lq, lk = [5, 0, 70, 33], [9, 4, 70, 100]
    gen = generator("variant varlen host", key)
    q, k, v = (randn((sum(lq), 4, 48), torch.float16, gen=gen, scale=q_scale),
               randn((sum(lk), 2, 48), torch.float16, gen=gen),
               randn((sum(lk), 2, 48), torch.float16, gen=gen))
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    call = HostAttention(q, k, v, cu_q, cu_k, alibi_slopes=alibi_slopes, **kw)
    out, lse = call.forward()
    grad = randn(q.shape, torch.float16, gen=gen)
    ours = call.backward(out, lse, grad)
    if alibi_slopes is not None:
        kw = dict(kw, alibi_slopes=alibi_slopes.double())
    t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, **kw)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-2, atol=4e-3)
    check_lse(lse, t_lse)
    exact = grads_of(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, **kw)[0],
                     [t.double() for t in (q, k, v)], grad)
    for name, g, t in zip("qkv", ours, exact):
        torch.testing.assert_close(g.double(), t, rtol=2e-2, atol=1e-2, msg=f"grad {name}")


def test_varlen_on_the_cuda_kernels():
    """A window and a softcap on the CUDA kernels over packed sequences."""
    check_varlen_on_the_cuda_kernels("window softcap", causal=True, window_size=(23, 0),
                                     softcap=3.0)