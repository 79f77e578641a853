"""ALiBi (flash-attn's alibi_slopes: -slope * |i + seq_k - seq_q - j| added to
the scores, computed in the kernels), alone and with causal, a sliding
window, a softcap, GQA, decode, varlen and sinks, against the float64
reference under the harness rule (PyTorch's own answer: the same
composition in the dtype under test), forward and backward, on the CPU
kernel, the reference backend and the CUDA kernels run on the host; the
Triton kernels run these tests in the interpreter
(tests/interpreter/test_triton_attention_alibi.py)."""

import pytest
import torch

import pyllm
from harness import (ISAS, KERNEL_DTYPES, check_rule, generator, grads_of, lse_rounding_noise,
                     poisoned_outputs, randn, run_under_isa)
from pyllm import reference
from test_attention import check_lse, cumulative
from test_attention_variants import (GPU_DTYPES, HOST, SHAPES, check_varlen_on_the_cuda_kernels,
                                     distances, hidden_by, make, scores_and_values)

CPU_BACKENDS = ("cpu", "reference")
# (causal, window_size, softcap)
VARIANTS = {
    "plain": (False, (-1, -1), 0.0),
    "causal": (True, (-1, -1), 0.0),
    "window": (False, (9, 4), 0.0),
    "all": (True, (23, 0), 3.0),
}


def slopes_of(batch, heads, per_sequence, *key):
    """BLOOM-like slopes (2^-k), per sequence or one set for all."""
    gen = generator("alibi", batch, heads, per_sequence, *key)
    shape = (batch, heads) if per_sequence else (heads,)
    return torch.exp2(-8.0 * torch.rand(shape, generator=gen, dtype=torch.float64)).float()


def composed(q, k, v, slopes, causal=False, window_size=(-1, -1), softcap=0.0):
    """PyTorch's own composition in q's dtype: scores, tanh, the ALiBi bias,
    mask, softmax, P V; rows that see no key are zeros."""
    s, vh = scores_and_values(q, k, v, softcap)
    b, h = q.shape[0], q.shape[2]
    s = s - (slopes.expand(b, h)[:, :, None, None] * distances(q, k).abs()).to(s.dtype)
    p = torch.softmax(s.masked_fill(hidden_by(q, k, causal, window_size), float("-inf")), dim=-1)
    return torch.nan_to_num((p @ vh).transpose(1, 2), nan=0.0)


BACKEND_DTYPES = [(b, d) for b in CPU_BACKENDS for d in KERNEL_DTYPES] + \
    [(HOST, d) for d in GPU_DTYPES]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward(shape, variant, dtype, backend, per_sequence=None):
    """Slopes per head on the odd shapes, per (sequence, head) on the even ones
    (or as ``per_sequence`` says)."""
    if per_sequence is None:
        per_sequence = SHAPES.index(shape) % 2 == 0
    causal, window, cap = VARIANTS[variant]
    kw = dict(causal=causal, window_size=window, softcap=cap)
    q, k, v = make(shape, dtype, "alibi", variant, q_scale=3.0 if cap else 1.0)
    slopes = slopes_of(shape[0], shape[3], per_sequence, shape, variant)
    grad = randn(q.shape, dtype, gen=generator("alibi grad", shape, variant, dtype))
    if backend == HOST:
        from test_cuda_host_attention import HostAttention

        call = HostAttention(q, k, v, causal=causal, window_size=window, softcap=cap,
                             alibi_slopes=slopes)
        out, lse = call.forward()
        ours = call.backward(out, lse, grad)
    else:
        with poisoned_outputs():
            out, lse = pyllm.attention(q, k, v, alibi_slopes=slopes, return_lse=True,
                                       backend=backend, **kw)
        ours = grads_of(lambda *t: pyllm.attention(*t, alibi_slopes=slopes, backend=backend,
                                                   **kw), (q, k, v), grad)
    t_out, t_lse = reference.attention(q.double(), k.double(), v.double(),
                                       alibi_slopes=slopes.double(), **kw)
    check_rule(out, t_out, composed(q, k, v, slopes, **kw))
    check_lse(lse, t_lse)
    exact = grads_of(lambda *t: reference.attention(*t, alibi_slopes=slopes.double(), **kw)[0],
                     [t.double() for t in (q, k, v)], grad)
    theirs = grads_of(lambda *t: composed(*t, slopes, **kw), (q, k, v), grad)
    truth64 = [t.double() for t in (q, k, v)]
    noise = lse_rounding_noise(
        t_lse, grad, exact[0],
        lambda g: grads_of(lambda *t: reference.attention(*t, alibi_slopes=slopes.double(),
                                                          **kw)[0], truth64, g)[2])
    for name, g, t, p, n in zip("qkv", ours, exact, theirs, noise):
        check_rule(g, t, p, factor=3, what=f"grad {name}", noise=n)


def test_the_slopes_bite():
    """The reference and the kernel both move when the slopes do (the
    comparison above would see a kernel that ignored them)."""
    q, k, v = make((1, 40, 60, 2, 2, 32), torch.float32, "alibi bite")
    slopes = torch.tensor([0.5, 0.25])
    plain = pyllm.attention(q, k, v, causal=True)
    assert not torch.allclose(pyllm.attention(q, k, v, causal=True, alibi_slopes=slopes), plain,
                              atol=1e-3)
    assert not torch.allclose(reference.attention(q, k, v, causal=True, alibi_slopes=slopes)[0],
                              plain, atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen(backend):
    """Each packed sequence gets its own diagonal (bottom-right) and its own
    slopes; an empty sequence among them; with sinks too."""
    lq, lk = [5, 0, 70, 33], [9, 4, 70, 100]
    gen = generator("alibi varlen")
    q, k, v = (randn((sum(lq), 4, 48), gen=gen, scale=2.0), randn((sum(lk), 2, 48), gen=gen),
               randn((sum(lk), 2, 48), gen=gen))
    slopes = slopes_of(4, 4, True, "varlen")
    sinks = randn((4,), gen=gen)
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    for extra in ({}, {"sinks": sinks}):
        kw = dict(causal=True, window_size=(23, 0), alibi_slopes=slopes, **extra)
        with poisoned_outputs():
            out, lse = pyllm.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True,
                                              backend=backend, **kw)
        t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k,
                                                  **kw)
        torch.testing.assert_close(out.double(), t_out, rtol=1e-4, atol=1e-5)
        check_lse(lse, t_lse)
        grad = randn(q.shape, gen=gen)
        ours = grads_of(lambda *t: pyllm.attention_varlen(*t, cu_q, cu_k, backend=backend, **kw),
                        (q, k, v), grad)
        exact = grads_of(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, **kw)[0],
                         [t.double() for t in (q, k, v)], grad)
        for name, g, t in zip("qkv", ours, exact):
            torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def test_varlen_on_the_cuda_kernels():
    """Per-sequence slopes on the CUDA kernels (on the host) over packed sequences."""
    check_varlen_on_the_cuda_kernels("alibi", q_scale=2.0, causal=True, window_size=(23, 0),
                                     alibi_slopes=slopes_of(4, 4, True, "varlen host"))


def test_bad_slopes():
    q, k, v = make((2, 4, 4, 2, 2, 64), torch.float32, "alibi bad")
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(heads,\) = \(2,\) or "
                                         r"\(batch, heads\) = \(2, 2\)"):
        pyllm.attention(q, k, v, alibi_slopes=torch.zeros(3))
    with pytest.raises(TypeError, match="alibi_slopes must be a float tensor"):
        pyllm.attention(q, k, v, alibi_slopes=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="alibi_slopes get no gradient"):
        pyllm.attention(q, k, v, alibi_slopes=torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match="alibi_slopes must be"):  # the op's own check
        torch.ops.pyllm.attention(q, k, v, None, None, 4, 4, None, 0.125, False, -1, -1, 0.0,
                                  torch.zeros(5))


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant of the CPU kernel (forced in a fresh process) meets the rule."""
    run_under_isa(isa, """
        import torch
        import test_attention_alibi as t
        for dtype in t.KERNEL_DTYPES:
            for shape in (t.SHAPES[0], t.SHAPES[3]):
                t.test_forward_and_backward(shape, "all", dtype, "cpu")
    """)


def test_opcheck_and_compile():
    """The op's registration with slopes (fake, autograd), and
    torch.compile(fullgraph) over it."""
    q, k, v = make((2, 9, 11, 4, 2, 64), torch.float32, "alibi opcheck")
    slopes = slopes_of(2, 4, True, "opcheck")
    op = torch.ops.pyllm.attention.default
    for args in [(q, k, v, None, None, 9, 11, None, 0.125, True, 4, 0, 0.0, slopes),
                 (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, 9, 11,
                  None, 0.125, False, 3, 2, 5.0, slopes[0])]:
        torch.library.opcheck(op, args)
    q, k, v = (t.detach() for t in (q, k, v))
    fn = torch.compile(lambda *t: pyllm.attention(*t, causal=True, alibi_slopes=slopes),
                       fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), pyllm.attention(q, k, v, causal=True,
                                                            alibi_slopes=slopes))
