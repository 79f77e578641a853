"""Attention sinks (gpt-oss's s_aux, pyllm.ops.attention_sinks): a logit per
head in every row's softmax with a zero value, alone and with causal, a
sliding window, a softcap, GQA, decode and varlen, against the float64
reference under the harness rule (PyTorch's own answer: gpt-oss's eager
composition in the dtype under test), forward and backward (q, k, v and the
sinks), on the CPU kernel, the reference backend and the CUDA kernels run on
the host; the Triton kernels run these tests in the interpreter
(tests/interpreter/test_triton_attention_sinks.py)."""

import pytest
import torch

import pyllm
from harness import KERNEL_DTYPES, check_rule, generator, grads_of, poisoned_outputs, randn
from pyllm import reference
from pyllm.ops import attention_sinks
from test_attention import check_lse, cumulative
from test_attention_variants import GPU_DTYPES, HOST, SHAPES, hidden_by, make, scores_and_values

CPU_BACKENDS = ("cpu", "reference")
# (causal, window_size, softcap)
VARIANTS = {
    "plain": (False, (-1, -1), 0.0),
    "causal": (True, (-1, -1), 0.0),
    "sliding": (True, (16, 0), 0.0),
    "all": (True, (23, 0), 3.0),
}


def sinks_of(heads, *key, dtype=torch.float32):
    # around the scores' size, so that the sink takes a real share of each row
    return randn((heads,), dtype, gen=generator("sinks", heads, *key), scale=2.0, offset=1.0)


def composed(q, k, v, sinks, causal=False, window_size=(-1, -1), softcap=0.0):
    """gpt-oss's eager attention in q's dtype: the scores and the sink side by
    side, softmax, the sink's column dropped, P V."""
    s, vh = scores_and_values(q, k, v, softcap)
    s = s.masked_fill(hidden_by(q, k, causal, window_size), float("-inf"))
    column = sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
    return (p @ vh).transpose(1, 2)


def host_call(q, k, v, sinks, grad, **kw):
    """The CUDA kernels on the host, the sinks folded as the op does."""
    from test_cuda_host_attention import HostAttention

    call = HostAttention(q, k, v, **kw)
    out, keys_lse = call.forward()
    out, lse = attention_sinks.fold(out, keys_lse, sinks)
    grads = list(call.backward(out, lse, grad)) + [
        attention_sinks.sink_grad(grad, out, keys_lse, sinks)]
    return out, lse, grads


BACKEND_DTYPES = [(b, d) for b in CPU_BACKENDS for d in KERNEL_DTYPES] + \
    [(HOST, d) for d in GPU_DTYPES]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward(shape, variant, dtype, backend):
    causal, window, cap = VARIANTS[variant]
    kw = dict(causal=causal, window_size=window, softcap=cap)
    q, k, v = make(shape, dtype, "sinks", variant, q_scale=3.0 if cap else 1.0)
    sinks = sinks_of(shape[3], shape, variant)
    grad = randn(q.shape, dtype, gen=generator("sinks grad", shape, variant, dtype))
    if backend == HOST:
        out, lse, ours = host_call(q, k, v, sinks, grad, **kw)
    else:
        with poisoned_outputs():
            out, lse = pyllm.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend,
                                       **kw)
        ours = grads_of(lambda *t: pyllm.attention(*t[:3], sinks=t[3], backend=backend, **kw),
                        (q, k, v, sinks), grad)
    t_out, t_lse = reference.attention(q.double(), k.double(), v.double(), sinks=sinks.double(),
                                       **kw)
    check_rule(out, t_out, composed(q, k, v, sinks, **kw))
    check_lse(lse, t_lse)
    exact = grads_of(lambda *t: reference.attention(*t[:3], sinks=t[3], **kw)[0],
                     [t.double() for t in (q, k, v, sinks)], grad)
    theirs = grads_of(lambda *t: composed(*t, **kw), (q, k, v, sinks), grad)
    for name, g, t, p in zip(("q", "k", "v", "sinks"), ours, exact, theirs):
        assert g.dtype == (sinks.dtype if name == "sinks" else dtype)
        check_rule(g, t, p, factor=3, what=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen(backend):
    """Packed sequences, an empty one among them; bf16 sinks (gpt-oss's dtype)."""
    lq, lk = [5, 0, 70, 33], [9, 4, 70, 100]
    gen = generator("sinks varlen")
    q, k, v = (randn((sum(lq), 4, 48), gen=gen, scale=2.0), randn((sum(lk), 2, 48), gen=gen),
               randn((sum(lk), 2, 48), gen=gen))
    sinks = sinks_of(4, "varlen", dtype=torch.bfloat16)
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    kw = dict(causal=True, window_size=(23, 0))
    with poisoned_outputs():
        out, lse = pyllm.attention_varlen(q, k, v, cu_q, cu_k, sinks=sinks, return_lse=True,
                                          backend=backend, **kw)
    t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k,
                                              sinks=sinks.double(), **kw)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-4, atol=1e-5)
    check_lse(lse, t_lse)
    grad = randn(q.shape, gen=gen)
    ours = grads_of(lambda *t: pyllm.attention_varlen(*t[:3], cu_q, cu_k, sinks=t[3],
                                                      backend=backend, **kw), (q, k, v, sinks),
                    grad)
    exact = grads_of(lambda *t: reference.attention_varlen(*t[:3], cu_q, cu_k, sinks=t[3], **kw)[0],
                     [t.double() for t in (q, k, v, sinks)], grad)
    for name, g, t in zip(("q", "k", "v"), ours, exact):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
    assert ours[3].dtype == torch.bfloat16
    torch.testing.assert_close(ours[3].double(), exact[3], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_query_that_sees_no_key(backend):
    """A row whose window holds no key: zeros, lse = its sink, zero gradients
    (the sink's too); with a sink of -inf, +inf as without sinks."""
    q, k, v = make((1, 30, 12, 2, 2, 64), torch.float32, "sinks empty")
    sinks = torch.tensor([0.5, float("-inf")])
    kw = dict(window_size=(2, 0), sinks=sinks, backend=backend)
    out, lse = pyllm.attention(q, k, v, return_lse=True, **kw)
    assert (out[0, :18] == 0).all()
    assert torch.equal(lse[0, 0, :18], torch.full((18,), 0.5))
    assert torch.isposinf(lse[0, 1, :18]).all()
    grad = torch.zeros(q.shape)
    grad[0, :18] = 1.0  # only the empty rows
    g = grads_of(lambda *t: pyllm.attention(*t[:3], window_size=(2, 0), sinks=t[3],
                                            backend=backend), (q, k, v, sinks), grad)
    assert all((t == 0).all() for t in g[:3]) and g[3][0] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sink", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_sinks_follow_pytorch(sink, backend):
    """A NaN or +inf sink makes its head's rows NaN, as the softmax over the
    scores and the sink; -inf is no sink at all. The other head is untouched."""
    q, k, v = make((1, 9, 13, 2, 1, 32), torch.float32, "sinks nonfinite")
    sinks = torch.tensor([sink, 0.25])
    out = pyllm.attention(q, k, v, causal=True, sinks=sinks, backend=backend)
    want = composed(q, k, v, sinks, causal=True)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-5, atol=1e-6)
    if sink == float("-inf"):
        torch.testing.assert_close(out[:, :, 0], pyllm.attention(q, k, v, causal=True)[:, :, 0])


def test_bad_sinks():
    q, k, v = make((1, 4, 4, 2, 2, 64), torch.float32, "sinks bad")
    with pytest.raises(ValueError, match=r"sinks must have shape \(heads,\) = \(2,\)"):
        pyllm.attention(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="sinks must be a float tensor"):
        pyllm.attention(q, k, v, sinks=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="sinks must be a tensor"):
        pyllm.attention(q, k, v, sinks=[0.0, 0.0])


def test_compile():
    """torch.compile(fullgraph) over attention with sinks: one graph, the
    eager values and gradients."""
    q, k, v = make((1, 9, 11, 4, 2, 64), torch.float32, "sinks compile")
    sinks = sinks_of(4, "compile")

    def fn(q, k, v, s):
        return pyllm.attention(q, k, v, causal=True, window_size=(4, 0), sinks=s)

    compiled = torch.compile(fn, fullgraph=True)
    grad = randn(q.shape, gen=generator("sinks compile grad"))
    got = grads_of(compiled, (q, k, v, sinks), grad)
    want = grads_of(fn, (q, k, v, sinks), grad)
    torch.testing.assert_close(compiled(q, k, v, sinks), fn(q, k, v, sinks))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
