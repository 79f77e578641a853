"""pyllm.attention / attention_varlen on every backend that serves CPU tensors
here, against the float64 reference under the harness rule (PyTorch's own
answer: scaled_dot_product_attention in the dtype under test), forward and
backward; the decode path; op registration; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import (ISAS, KERNEL_DTYPES, check_compiles_fullgraph, check_rule, generator,
                     grads_of, poisoned_outputs, randn, run_under_isa)
from pyllm import reference

CPU_BACKENDS = ("cpu", "reference")

# (batch, seq_q, seq_k, heads, heads_kv, head_dim, causal)
CASES = [
    (1, 1, 1, 1, 1, 64, False),
    (2, 7, 7, 4, 4, 64, True),
    (1, 127, 127, 4, 2, 40, True),       # GQA 2:1, head_dim 40
    (2, 33, 100, 8, 2, 80, True),        # seq_q < seq_k, causal bottom-right, GQA 4:1
    (1, 100, 33, 3, 1, 96, True),        # seq_q > seq_k: the first queries see nothing
    (1, 130, 17, 2, 1, 64, False),       # MQA
    (1, 64, 1000, 2, 2, 128, False),
    (1, 9, 9, 1, 1, 256, True),
]
DECODE_CASES = [  # seq_q <= 8: the split-KV path
    (1, 1, 2048, 8, 2, 64, True),
    (2, 1, 700, 4, 4, 80, False),
    (1, 4, 1000, 8, 1, 64, True),
    (3, 8, 8, 2, 2, 40, True),
    (1, 3, 200, 16, 4, 64, True),  # one short slice: the kv heads shared out among threads
]


def make(case, dtype, *key):
    b, sq, sk, h, hkv, d, _ = case
    gen = generator("attention", case, dtype, *key)
    q = randn((b, sq, h, d), dtype, gen=gen)
    k = randn((b, sk, hkv, d), dtype, gen=gen)
    v = randn((b, sk, hkv, d), dtype, gen=gen)
    return q, k, v


def causal_mask(sq, sk):
    """Additive bottom-right causal mask (float32)."""
    allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    return torch.zeros(sq, sk).masked_fill(~allowed, float("-inf"))


def pytorch_attention(q, k, v, causal=False, scale=None, bias=None):
    """PyTorch's SDPA in the dtype under test; rows that see no key are zeros
    (SDPA gives NaN there)."""
    h, hkv = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = causal_mask(q.shape[1], k.shape[1]).to(q.dtype)
    if bias is not None:
        bias = bias.to(q.dtype) if bias.dtype != torch.bool else torch.zeros(
            bias.shape, dtype=q.dtype).masked_fill(~bias, float("-inf"))
        mask = bias if mask is None else mask + bias
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(h // hkv, 2).transpose(1, 2),
        v.repeat_interleave(h // hkv, 2).transpose(1, 2), attn_mask=mask, scale=scale)
    return torch.nan_to_num(out.transpose(1, 2), nan=0.0)


def truth(q, k, v, **kw):
    return reference.attention(q.double(), k.double(), v.double(), **kw)


def check_lse(lse, expected):
    assert lse.dtype == torch.float32 and lse.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(expected))
    torch.testing.assert_close(lse[finite].double(), expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + DECODE_CASES, ids=str)
def test_forward(case, dtype, backend):
    q, k, v = make(case, dtype)
    causal = case[-1]
    with poisoned_outputs():
        out, lse = pyllm.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    t_out, t_lse = truth(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    check_rule(out, t_out, pytorch_attention(q, k, v, causal=causal))
    check_lse(lse, t_lse)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:6] + DECODE_CASES[2:], ids=str)
def test_backward(case, dtype, backend):
    q, k, v = make(case, dtype, "backward")
    causal = case[-1]
    grad = randn(q.shape, dtype, gen=generator("attention grad", case, dtype))
    with poisoned_outputs():
        ours = grads_of(lambda *t: pyllm.attention(*t, causal=causal, backend=backend), (q, k, v),
                        grad)
    exact = grads_of(lambda *t: reference.attention(*t, causal=causal)[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: pytorch_attention(*t, causal=causal), (q, k, v), grad)
    for name, g, t, p in zip("qkv", ours, exact, theirs):
        assert g.dtype == dtype and g.shape == t.shape
        check_rule(g, t, p, factor=3, what=f"grad {name}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 200, 256, 4, 2, 72, False), (1, 90, 257, 2, 1, 72, False),
                                  (3, 256, 256, 2, 2, 64, False)], ids=str)
def test_backward_at_the_one_pass_limit(case, dtype):
    """Unmasked sequences of up to 256 keys take the CPU backward in one pass
    (the key pass adds dQ), 257 keys the two passes: both sides of the limit,
    with GQA, seq_q != seq_k and a head_dim of partial tiles."""
    test_backward(case, dtype, "cpu")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["heads x keys", "key padding", "bool", "full float32"])
def test_bias(kind, dtype, backend="cpu"):
    case = (2, 33, 47, 4, 2, 64, False)
    q, k, v = make(case, dtype, kind)
    gen = generator("bias", kind, dtype)
    if kind == "heads x keys":
        bias = randn((1, 4, 1, 47), dtype, gen=gen)
    elif kind == "key padding":  # the last keys of the second sequence are padding
        bias = torch.zeros(2, 1, 1, 47, dtype=dtype)
        bias[1, ..., 30:] = float("-inf")
    elif kind == "bool":
        bias = torch.rand(2, 1, 33, 47, generator=gen) > 0.3
    else:
        bias = randn((2, 4, 33, 47), torch.float32, gen=gen)
    with poisoned_outputs():
        out, lse = pyllm.attention(q, k, v, bias=bias, return_lse=True, backend=backend)
    additive = bias if bias.dtype != torch.bool else torch.zeros(bias.shape).masked_fill(
        ~bias, float("-inf"))
    t_out, t_lse = truth(q, k, v, bias=additive)
    check_rule(out, t_out, pytorch_attention(q, k, v, bias=bias))
    check_lse(lse, t_lse)
    grad = randn(q.shape, dtype, gen=gen)
    ours = grads_of(lambda *t: pyllm.attention(*t, bias=bias, backend=backend), (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention(*t, bias=additive.double())[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: pytorch_attention(*t, bias=bias), (q, k, v), grad)
    for g, t, p in zip(ours, exact, theirs):
        check_rule(g, t, p, factor=3)


def test_fully_masked_rows_are_zero_with_infinite_lse():
    """flash-attn's convention: a query that sees no key gets zeros and lse +inf,
    and no gradient."""
    q, k, v = make((1, 4, 6, 2, 2, 64, False), torch.float32)
    bias = torch.zeros(1, 1, 4, 6)
    bias[..., 1, :] = float("-inf")  # query 1 sees nothing
    q.requires_grad_()
    out, lse = pyllm.attention(q, k, v, bias=bias, return_lse=True)
    assert torch.equal(out[0, 1], torch.zeros(2, 64))
    assert torch.isposinf(lse[0, :, 1]).all() and torch.isfinite(lse[0, :, [0, 2, 3]]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, 1], torch.zeros(2, 64))
    # seq_q > seq_k, causal: the first seq_q - seq_k queries see nothing.
    q2, k2, v2 = make((1, 5, 3, 1, 1, 64, True), torch.float32)
    out2 = pyllm.attention(q2, k2, v2, causal=True)
    assert torch.equal(out2[0, :2], torch.zeros(2, 1, 64)) and out2[0, 2:].abs().sum() > 0


@pytest.mark.parametrize("layout", ["kv cache slice", "heads-major", "strided head_dim"])
def test_noncontiguous(layout):
    b, sq, sk, h, d = 2, 37, 60, 4, 64
    gen = generator("attention layout", layout)
    if layout == "kv cache slice":  # k, v: the filled part of a longer cache
        q = randn((b, sq, h, d), gen=gen)
        k = randn((b, 100, h, d), gen=gen)[:, :sk]
        v = randn((b, 100, h, d), gen=gen)[:, :sk]
    elif layout == "heads-major":  # (b, h, s, d) storage seen as (b, s, h, d)
        q = randn((b, h, sq, d), gen=gen).transpose(1, 2)
        k = randn((b, h, sk, d), gen=gen).transpose(1, 2)
        v = randn((b, h, sk, d), gen=gen).transpose(1, 2)
    else:
        q = randn((b, sq, h, 2 * d), gen=gen)[..., ::2]
        k = randn((b, sk, h, 2 * d), gen=gen)[..., ::2]
        v = randn((b, sk, h, 2 * d), gen=gen)[..., ::2]
    assert not (q.is_contiguous() and k.is_contiguous())
    grad = randn(q.shape, gen=gen)
    with poisoned_outputs():
        out = pyllm.attention(q, k, v, causal=True)
        ours = grads_of(lambda *t: pyllm.attention(*t, causal=True), (q, k, v), grad)
    check_rule(out, truth(q, k, v, causal=True)[0], pytorch_attention(q, k, v, causal=True))
    exact = grads_of(lambda *t: reference.attention(*t, causal=True)[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: pytorch_attention(*t, causal=True), (q, k, v), grad)
    for g, t, p in zip(ours, exact, theirs):
        check_rule(g, t, p, factor=3)


# -- variable-length batches ----------------------------------------------------

VARLEN = [  # (lengths_q, lengths_k, heads, heads_kv, head_dim, causal)
    ([5, 0, 1, 130], [7, 3, 1, 130], 4, 2, 64, True),   # an empty and a length-1 sequence
    ([17, 64, 3], [40, 64, 300], 2, 1, 40, False),
    ([1, 1, 1], [900, 5, 77], 4, 4, 64, True),           # decode: one query each
]


def per_sequence(fn, q, k, v, cu_q, cu_k):
    """fn on each sequence of a varlen batch as a dense batch of one, packed
    back (the dense path as the comparison)."""
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]][None]
        ks, vs = k[cu_k[i]:cu_k[i + 1]][None], v[cu_k[i]:cu_k[i + 1]][None]
        outs.append(fn(qs, ks, vs)[0])
    return torch.cat(outs)


def cumulative(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_varlen(case, dtype, backend):
    lq, lk, h, hkv, d, causal = case
    gen = generator("varlen", case, dtype)
    q = randn((sum(lq), h, d), dtype, gen=gen)
    k = randn((sum(lk), hkv, d), dtype, gen=gen)
    v = randn((sum(lk), hkv, d), dtype, gen=gen)
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    grad = randn(q.shape, dtype, gen=gen)

    with poisoned_outputs():
        out, lse = pyllm.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                                          backend=backend)
    t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k,
                                              causal=causal)
    theirs = per_sequence(lambda *t: pytorch_attention(*t, causal=causal), q, k, v, cu_q, cu_k)
    check_rule(out, t_out, theirs)
    check_lse(lse, t_lse)

    ours = grads_of(lambda *t: pyllm.attention_varlen(*t, cu_q, cu_k, causal=causal,
                                                      backend=backend), (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, causal=causal)[0],
                     [t.double() for t in (q, k, v)], grad)
    pt = grads_of(lambda *t: per_sequence(lambda *s: pytorch_attention(*s, causal=causal), *t,
                                          cu_q, cu_k), (q, k, v), grad)
    for name, g, t, p in zip("qkv", ours, exact, pt):
        check_rule(g, t, p, factor=3, what=f"grad {name}")


def test_varlen_bias_uses_each_sequences_corner():
    lq, lk = [3, 5], [4, 6]
    gen = generator("varlen bias")
    q, k, v = randn((8, 2, 64), gen=gen), randn((10, 2, 64), gen=gen), randn((10, 2, 64), gen=gen)
    bias = randn((2, 2, 5, 6), gen=gen)
    out = pyllm.attention_varlen(q, k, v, cumulative(lq), cumulative(lk), bias=bias)
    expected = reference.attention_varlen(q.double(), k.double(), v.double(), cumulative(lq),
                                          cumulative(lk), bias=bias.double())[0]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# -- threads, ISA paths, decode splits ---------------------------------------------

def test_thread_count():
    """Prefill tasks don't depend on the thread count (bitwise), nor do a
    short decode's (its kv heads shared out); the decode path splits long
    keys by thread count, so it agrees within rounding."""
    prefill = make((1, 130, 130, 4, 2, 64, True), torch.float32)
    decode = make((1, 1, 3000, 4, 2, 64, True), torch.float32)
    short = make((1, 1, 200, 16, 4, 64, True), torch.bfloat16)  # kv heads shared out
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads = grads_of(lambda *t: pyllm.attention(*t, causal=True), prefill,
                             torch.ones(prefill[0].shape))
            results.append((pyllm.attention(*prefill, causal=True), *grads,
                            pyllm.attention(*short, causal=True),
                            pyllm.attention(*decode, causal=True)))
    finally:
        torch.set_num_threads(previous)
    one, two = results
    for a, b in zip(one[:5], two[:5]):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[5], two[5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant (forced in a fresh process) meets the rule."""
    run_under_isa(isa, """
        import torch
        from test_attention import CASES, DECODE_CASES, VARLEN, test_backward, test_forward, test_varlen
        for dtype in (torch.float32, torch.bfloat16):
            for case in (CASES[2], CASES[3], DECODE_CASES[0]):
                test_forward(case, dtype, "cpu")
            test_backward(CASES[3], dtype, "cpu")
            test_varlen(VARLEN[0], dtype, "cpu")
    """)


# -- registration --------------------------------------------------------------------

def test_opcheck():
    q, k, v = make((2, 9, 11, 4, 2, 64, True), torch.float32, "opcheck")
    bias = torch.randn(1, 4, 9, 11)
    op = torch.ops.pyllm.attention.default
    scale = 1 / 8
    for args in [(q, k, v, None, None, 9, 11, None, scale, True),
                 (q, k, v, None, None, 9, 11, bias, scale, False),
                 (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, 9, 11,
                  None, scale, True)]:
        torch.library.opcheck(op, args)
    q, k, v = (t.detach() for t in (q, k, v))
    cu_q, cu_k = cumulative([3, 0, 6]), cumulative([4, 5, 2])
    qv, kv, vv = torch.randn(9, 4, 64), torch.randn(11, 2, 64), torch.randn(11, 2, 64)
    torch.library.opcheck(op, (qv, kv, vv, cu_q, cu_k, 6, 5, None, scale, True))
    out, lse = op(q, k, v, None, None, 9, 11, None, scale, True)
    torch.library.opcheck(torch.ops.pyllm.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, None, None, 9, 11, None,
                           scale, True))


class _Layer(torch.nn.Module):
    def __init__(self, dim=64, heads=4, heads_kv=2):
        super().__init__()
        self.heads, self.heads_kv, self.head_dim = heads, heads_kv, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * heads_kv * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim)
        k, v = self.kv(x).view(b, s, 2, self.heads_kv, self.head_dim).unbind(2)
        return self.o(pyllm.attention(q, k, v, causal=True).reshape(b, s, -1))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    check_compiles_fullgraph(_Layer(), torch.randn(2, 19, 64), {"attention": 1})




# -- bad input --------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


QKV = (_t(2, 5, 4, 64), _t(2, 7, 2, 64), _t(2, 7, 2, 64))

BAD = [
    (lambda: pyllm.attention(*QKV[:2], None), TypeError, "v must be a tensor, got None"),
    (lambda: pyllm.attention(_t(5, 4, 64), *QKV[1:]), ValueError, "q must have 4 dimension(s)"),
    (lambda: pyllm.attention(QKV[0].long(), *QKV[1:]), TypeError, "q must be float16"),
    (lambda: pyllm.attention(QKV[0], QKV[1].double(), QKV[2]), TypeError,
     "k must have q's dtype torch.float32"),
    (lambda: pyllm.attention(QKV[0], torch.ones(2, 7, 2, 64, device="meta"), QKV[2]), ValueError,
     "k must be on q's device"),
    (lambda: pyllm.attention(_t(1, 2, 1, 300), _t(1, 2, 1, 300), _t(1, 2, 1, 300)), ValueError,
     "head_dim must be between 1 and 256"),
    (lambda: pyllm.attention(QKV[0], _t(2, 7, 2, 32), QKV[2]), ValueError,
     "q, k and v must share head_dim 64"),
    (lambda: pyllm.attention(QKV[0], _t(2, 7, 3, 64), _t(2, 7, 3, 64)), ValueError,
     "the heads of k and v (3) must divide the heads of q (4)"),
    (lambda: pyllm.attention(QKV[0], QKV[1], _t(2, 6, 2, 64)), ValueError,
     "k and v must have one shape"),
    (lambda: pyllm.attention(QKV[0], _t(3, 7, 2, 64), _t(3, 7, 2, 64)), ValueError,
     "q and k must have one batch size"),
    (lambda: pyllm.attention(*QKV, bias=_t(2, 4, 5, 6)), ValueError,
     "bias must broadcast to (batch, heads, seq_q, seq_k) = (2, 4, 5, 7)"),
    (lambda: pyllm.attention(*QKV, bias=_t(2, 4, 5, 7, dtype=torch.float16)), TypeError,
     "bias must be torch.float32, float32 or bool"),
    (lambda: pyllm.attention(*QKV, bias=_t(1, 1, 1, 7).requires_grad_()), ValueError,
     "bias gets no gradient"),
    (lambda: pyllm.attention(*QKV, scale=float("inf")), ValueError, "scale must be a finite"),
    (lambda: pyllm.attention(*QKV, scale="x"), TypeError, "scale must be a float"),
    (lambda: pyllm.attention(torch.empty(1, 2**24, 2, 64, device="meta"),
                             torch.empty(1, 2, 2, 64, device="meta"),
                             torch.empty(1, 2, 2, 64, device="meta")), ValueError, "32-bit"),
    (lambda: pyllm.attention(*QKV, backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (lambda: pyllm.attention_varlen(_t(5, 4, 64), _t(7, 2, 64), _t(7, 2, 64),
                                    cumulative([5]).long(), cumulative([7])), TypeError,
     "cu_seqlens_q must be int32"),
    (lambda: pyllm.attention_varlen(_t(5, 4, 64), _t(7, 2, 64), _t(7, 2, 64), cumulative([2, 3]),
                                    cumulative([7])), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have one length"),
]


@pytest.mark.parametrize("call, error, words", BAD, ids=[w for _, _, w in BAD])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
    assert "pyllm.attention" in str(info.value)


def test_direct_op_call_guards_memory():
    q, k, v = QKV
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to the number of tokens"):
        torch.ops.pyllm.attention(_t(5, 4, 64), _t(7, 2, 64), _t(7, 2, 64), cumulative([4]),
                                  cumulative([7]), 4, 7, None, 0.125, False)
    with pytest.raises(ValueError, match="max_seqlen_q/k must be at least the longest sequence"):
        torch.ops.pyllm.attention(_t(5, 4, 64), _t(7, 2, 64), _t(7, 2, 64), cumulative([5]),
                                  cumulative([7]), 2, 7, None, 0.125, False)
    with pytest.raises(ValueError, match="k and v heads must divide q heads"):
        torch.ops.pyllm.attention(q, _t(2, 7, 3, 64), _t(2, 7, 3, 64), None, None, 5, 7, None,
                                  0.125, False)


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = make((1, 5, 5, 2, 2, 40, False), torch.float32)
    torch.testing.assert_close(pyllm.attention(q, k, v),
                               pyllm.attention(q, k, v, scale=1 / math.sqrt(40)))
