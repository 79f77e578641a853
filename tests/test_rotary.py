"""pyllm.rotary (fused rotary embedding, in place on q and k) against the
float64 reference under the harness rule, forward and backward, on the CPU
kernel, the reference backend and the CUDA kernel run on the host (the
"cuda-host" backend below: csrc/cuda/rotary_kernel.cu through the CUDA
execution model of tests/cuda_host/, every buffer guarded); the Triton kernel
runs these tests in the interpreter (tests/interpreter/test_triton_rotary.py).
Also: the tables against transformers' own rope functions for every scaling
type, and pyllm.rotary against transformers' apply_rotary_pos_emb."""

import ctypes
import math

import pytest
import torch

import pyllm
from cuda_host_kernels import DTYPE_CODE, Guarded, check_launch, library
from harness import (ISAS, KERNEL_DTYPES, check_compiles_fullgraph, check_rule, generator,
                     noncontiguous, poisoned_outputs, randn, run_under_isa)
from pyllm import reference

CPU_BACKENDS = ("cpu", "reference", "cuda-host")
# (batch, seq, heads, heads_kv, head_dim, rotary_dim)
CASES = [(1, 1, 1, 1, 2, 2), (2, 7, 4, 2, 64, 64), (1, 13, 3, 1, 80, 32), (3, 5, 8, 8, 128, 96),
         (1, 33, 2, 2, 30, 30)]


def host_rotary(q, k, cos, sin, positions, interleaved, conjugate):
    """The CUDA kernel on the host, as csrc/cuda/rotary.cpp launches it: q and
    k rotated in place (copied into guarded buffers and back)."""
    gq, gk = Guarded(q, fill=q), Guarded(k, fill=k)
    gcos, gsin = Guarded(cos, fill=cos), Guarded(sin, fill=sin)
    gpos = Guarded(positions, fill=positions)
    tensors = (ctypes.c_int64 * 8)(*gq.tensor.stride()[:3], q.shape[2], *gk.tensor.stride()[:3],
                                  k.shape[2])
    b, s, _, d = q.shape
    sizes = (ctypes.c_int64 * 5)(b, s, d, cos.shape[1], cos.shape[0])
    check_launch(library().host_rotary(
        gq.ptr, gk.ptr, tensors, ctypes.c_void_p(gcos.tensor.data_ptr()),
        ctypes.c_void_p(gsin.tensor.data_ptr()), ctypes.c_void_p(gpos.tensor.data_ptr()), sizes,
        DTYPE_CODE[q.dtype], int(interleaved), int(conjugate)), "rotary")
    for name, g in (("q", gq), ("k", gk), ("cos", gcos), ("sin", gsin), ("positions", gpos)):
        g.check(name)
    q.copy_(gq.tensor)
    k.copy_(gk.tensor)


def call(backend, q, k, cos, sin, positions=None, **kw):
    """pyllm.rotary on ``backend``; "cuda-host" routes the op to host_rotary."""
    if backend != "cuda-host":
        return pyllm.rotary(q, k, cos, sin, positions, backend=backend, **kw)
    from pyllm.ops import rotary as face

    route = face._backend.route
    face._backend.route = lambda op, t, b: host_rotary
    try:
        return pyllm.rotary(q, k, cos, sin, positions, **kw)
    finally:
        face._backend.route = route


def pytorch_rotary(x, cos, sin, positions, interleaved=False):
    """PyTorch's composition in x's dtype, as transformers computes it (cos and
    sin cast to x's dtype, rotate_half)."""
    half = cos.shape[1]
    c = cos[positions].to(x.dtype)[:, :, None, :]
    s = sin[positions].to(x.dtype)[:, :, None, :]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2)
    else:
        cc, ss = torch.cat([c, c], -1), torch.cat([s, s], -1)
        y = rot * cc + torch.cat([-rot[..., half:], rot[..., :half]], -1) * ss
    return torch.cat([y, rest], -1)


def make(case, dtype, key, max_positions=257):
    b, s, h, hkv, d, rd = case
    gen = generator("rotary", case, dtype, key)
    q = randn((b, s, h, d), dtype, gen=gen)
    k = randn((b, s, hkv, d), dtype, gen=gen)
    cos, sin = pyllm.rotary_tables(rd, max_positions, 500.0)
    positions = torch.randint(0, max_positions, (b, s), generator=gen)
    return q, k, cos, sin, positions


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward(case, dtype, interleaved, backend):
    q, k, cos, sin, pos = make(case, dtype, "forward")
    truth = [reference.rotary(t.double(), cos.double(), sin.double(), pos, interleaved=interleaved)
             for t in (q, k)]
    theirs = [pytorch_rotary(t, cos, sin, pos, interleaved) for t in (q, k)]
    q2, k2 = q.clone(), k.clone()
    with poisoned_outputs():
        out = call(backend, q2, k2, cos, sin, pos, interleaved=interleaved)
    assert out[0] is q2 and out[1] is k2  # in place
    for name, o, t, p in zip("qk", out, truth, theirs):
        check_rule(o, t, p, what=f"rotary {name}")
        # the part past rotary_dim passes through, bit for bit
        rd = 2 * cos.shape[1]
        assert torch.equal(o[..., rd:], (q if name == "q" else k)[..., rd:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[1:4], ids=str)
def test_backward(case, dtype, interleaved, backend):
    q, k, cos, sin, pos = make(case, dtype, "backward")
    gen = generator("rotary grad", case, dtype)
    grads = [randn(t.shape, dtype, gen=gen) for t in (q, k)]

    def grads_through(fn, tensors, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        outs = fn(*[t * 1 for t in leaves])  # non-leaves: rotated in place
        torch.autograd.backward(list(outs), [g.to(o.dtype) for o, g in zip(outs, grads)])
        return [t.grad for t in leaves]

    ours = grads_through(lambda a, b: call(backend, a, b, cos, sin, pos, interleaved=interleaved),
                         (q, k))
    exact = grads_through(lambda a, b: [reference.rotary(t, cos.double(), sin.double(), pos,
                                                         interleaved=interleaved) for t in (a, b)],
                          [t.double() for t in (q, k)])
    theirs = grads_through(lambda a, b: [pytorch_rotary(t, cos, sin, pos, interleaved)
                                         for t in (a, b)], (q, k))
    for name, o, t, p in zip("qk", ours, exact, theirs):
        check_rule(o, t, p, factor=3, what=f"rotary grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_positions_forms_and_layouts(backend):
    """positions None / (seq,) / (batch, seq), an offset, packed varlen with
    cu_seqlens, q and k as strided views of one fused projection, out of place."""
    gen = generator("rotary layouts", backend)
    b, s, h, hkv, d = 2, 9, 4, 2, 32
    cos, sin = pyllm.rotary_tables(d, 64)
    qkv = randn((b, s, (h + 2 * hkv) * d), gen=gen)
    q = qkv[..., :h * d].view(b, s, h, d)
    k = qkv[..., h * d:(h + hkv) * d].view(b, s, hkv, d)
    assert not q.is_contiguous()
    expect_q = reference.rotary(q.double(), cos.double(), sin.double(),
                                (torch.arange(s) + 3).expand(b, s)).float()
    rq, rk = call(backend, q.clone(), k.clone(), cos, sin, offset=3)
    torch.testing.assert_close(rq, expect_q, rtol=1e-6, atol=1e-6)
    rq2, _ = call(backend, q.clone(), k.clone(), cos, sin, torch.arange(s) + 3)
    torch.testing.assert_close(rq2, rq, rtol=0, atol=0)
    # in place on the fused buffer's views
    before = qkv.clone()
    call(backend, q, k, cos, sin, offset=3)
    torch.testing.assert_close(q, expect_q, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[..., (h + hkv) * d:], before[..., (h + hkv) * d:])  # v untouched
    # out of place leaves the inputs alone
    q3, k3 = q.clone(), k.clone()
    call(backend, q3, k3, cos, sin, inplace=False)
    assert torch.equal(q3, q) and torch.equal(k3, k)
    # packed: sequences of 4 and 5 tokens, positions restart at 0 in each
    lens = [4, 0, 5]
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    tokens_q, tokens_k = randn((9, h, d), gen=gen), randn((9, hkv, d), gen=gen)
    pq, pk = call(backend, tokens_q.clone(), tokens_k.clone(), cos, sin, cu_seqlens=cu)
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    torch.testing.assert_close(pq, reference.rotary(tokens_q[None].double(), cos.double(),
                                                    sin.double(), positions)[0].float(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nonfinite_like_pytorch(backend, value):
    """A NaN/Inf in q shows in the same elements as PyTorch's composition."""
    q, k, cos, sin, pos = make((1, 3, 2, 1, 16, 16), torch.float32, "nonfinite")
    q[0, 1, 1, 3] = value
    expect = pytorch_rotary(q, cos, sin, pos)
    out, _ = call(backend, q.clone(), k.clone(), cos, sin, pos)
    assert torch.equal(out.isnan(), expect.isnan())
    assert torch.equal(out.isposinf(), expect.isposinf())
    assert torch.equal(out.isneginf(), expect.isneginf())


def test_out_of_range_positions():
    q, k, cos, sin, _ = make((1, 3, 2, 1, 16, 16), torch.float32, "range", max_positions=8)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        pyllm.rotary(q, k, cos, sin, torch.tensor([0, 8, 1]))
    # the CUDA kernel never reads outside the tables: NaN rows instead
    for fn in (host_rotary,):
        q2, k2 = q.clone(), k.clone()
        fn(q2, k2, cos, sin, torch.tensor([[0, 8, -1]]), False, False)
        assert q2[0, 1:].isnan().all() and not q2[0, 0].isnan().any()


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 3, 4)), "q and k must both be"),
    (dict(cos=torch.zeros(8, 9)), "rotary_dim"),
    (dict(cos=torch.zeros(8, 4, dtype=torch.float64)), "cos must be"),
    (dict(positions=torch.zeros(3, dtype=torch.float32)), "positions must be"),
    (dict(k=torch.zeros(1, 3, 2, 8, dtype=torch.float16)), "k must have q's dtype"),
])
def test_bad_input(bad, match):
    args = dict(q=torch.zeros(1, 3, 2, 16), k=torch.zeros(1, 3, 1, 16), cos=torch.zeros(8, 4),
                sin=torch.zeros(8, 4), positions=None)
    args.update(bad)
    if "cos" in bad:
        args["sin"] = args["cos"]
    with pytest.raises((ValueError, TypeError), match=match):
        pyllm.rotary(args["q"], args["k"], args["cos"], args["sin"], args["positions"])


class _Layer(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 2 * dim)
        self.heads = heads
        cos, sin = pyllm.rotary_tables(dim // heads, 64)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x):
        b, s, d = x.shape
        qk = self.proj(x).view(b, s, 2, self.heads, d // self.heads)
        q, k = pyllm.rotary(qk[:, :, 0], qk[:, :, 1], self.cos, self.sin)  # in place on views
        return (q * k).reshape(b, s, d)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    # q and k each through an autograd.Function: two rotations forward, two backward
    check_compiles_fullgraph(_Layer(), torch.randn(2, 5, 32), {"rotary": 4})


# -- the scaling types and transformers ----------------------------------------------

ROPE_PARAMETERS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
     "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
]


@pytest.mark.parametrize("params", ROPE_PARAMETERS, ids=lambda p: p["rope_type"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_against_transformers(params, partial):
    """rotary_tables equals transformers' rotary embedding (scaling type,
    attention factor; partial rotary through Phi's, which honours it), and
    pyllm.rotary equals LLaMA's apply_rotary_pos_emb (float32)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama
    from transformers.models.phi import modeling_phi

    head_dim, max_pos, seq = 64, 256, 200
    kind, embedding = ((transformers.LlamaConfig, modeling_llama.LlamaRotaryEmbedding)
                       if partial == 1.0 else
                       (transformers.PhiConfig, modeling_phi.PhiRotaryEmbedding))
    config = kind(
        hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": partial, **params})
    emb = embedding(config)
    gen = generator("rotary transformers", str(params), partial)
    q = randn((1, 4, seq, head_dim), gen=gen)
    k = randn((1, 2, seq, head_dim), gen=gen)
    positions = torch.arange(seq)[None]
    cos_hf, sin_hf = emb(q, positions)
    rd = int(head_dim * partial)
    cos, sin = pyllm.rotary_tables(rd, max_pos, 10000.0, params, max_position_embeddings=max_pos)
    torch.testing.assert_close(cos[:seq], cos_hf[0, :, :rd // 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[:seq], sin_hf[0, :, :rd // 2], rtol=1e-5, atol=1e-5)
    if partial == 1.0:
        hq, hk = modeling_llama.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
        rq, rk = pyllm.rotary(q.transpose(1, 2).clone(), k.transpose(1, 2).clone(), cos, sin)
        torch.testing.assert_close(rq.transpose(1, 2), hq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rk.transpose(1, 2), hk, rtol=1e-5, atol=1e-5)


def test_unknown_rope_type():
    with pytest.raises(NotImplementedError, match="rope_type 'longrope'"):
        pyllm.rotary_tables(64, 16, rope_parameters={"rope_type": "longrope"})
    assert math.isclose(pyllm.ops.rotary.rotary_inv_freq(64)[1], 1.0)


def test_noncontiguous_head_dim_is_copied_back():
    gen = generator("rotary strided head")
    q = noncontiguous(randn((1, 4, 2, 16), gen=gen))
    k = randn((1, 4, 1, 16), gen=gen)
    cos, sin = pyllm.rotary_tables(16, 8)
    expect = reference.rotary(q.double(), cos.double(), sin.double(),
                              torch.arange(4)[None]).float()
    out, _ = pyllm.rotary(q, k, cos, sin)
    torch.testing.assert_close(q, expect, rtol=1e-6, atol=1e-6)
    assert out is q


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant of the CPU kernel (forced in a fresh process) meets the rule."""
    run_under_isa(isa, """
        import torch
        import test_rotary as t
        for dtype in t.KERNEL_DTYPES:
            for case in t.CASES:
                for interleaved in (False, True):
                    t.test_forward(case, dtype, interleaved, "cpu")
            t.test_backward(t.CASES[2], dtype, True, "cpu")
        t.test_positions_forms_and_layouts("cpu")
    """)
