"""The GPU backends (triton, cuda) on CUDA tensors at real sizes, against the
float64 reference under the harness rule, forward and backward. Marked cuda:
they run wherever torch.cuda.is_available() and are skipped (with that
reason) elsewhere."""

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import (as64, check_rule, flash_backward_noise, generator, grads_of,
                     poisoned_outputs)
from harness import randn as _randn
from pyllm import reference

pytestmark = pytest.mark.cuda

GPU_DTYPES = (torch.float16, torch.bfloat16)


GPU_BACKENDS = ("triton", "cuda")


def randn(*shape, dtype, scale=1.0, seed=0):
    return _randn(shape, dtype, gen=generator(*shape, seed), device="cuda", scale=scale)


def require(op, backend):
    """Skips the test, saying why, when ``backend`` has no kernel for ``op``
    on CUDA tensors in this install (each backend is its own test, so a
    missing one shows as a skip, never as a pass over zero backends)."""
    row = pyllm.backend.op_table()[op]
    if "cuda" not in row[backend]:
        pytest.skip(f"{backend} does not serve {op} on CUDA tensors here: {row[backend]}")








@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 768), (7, 65536)], ids=str)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norms(op, shape, dtype, backend):
    require(op, backend)
    x = randn(*shape, dtype=dtype)
    w = randn(shape[-1], dtype=dtype, seed=1) + 1
    b = randn(shape[-1], dtype=dtype, seed=2) if op == "layer_norm" else None
    args = (w,) if op == "rms_norm" else (w, b)
    with poisoned_outputs():
        y = getattr(pyllm, op)(x, *args, 1e-5, backend=backend)
    truth = getattr(reference, op)(*as64(x, *args), 1e-5)[0]
    theirs = (F.rms_norm(x, shape[-1:], w, 1e-5) if op == "rms_norm"
              else F.layer_norm(x, shape[-1:], w, b, 1e-5))
    check_rule(y, truth, theirs, what=f"{op} {backend}")
    grad = randn(*shape, dtype=dtype, seed=3)
    fn = getattr(pyllm, op)
    ours = grads_of(lambda *t: fn(*t, 1e-5, backend=backend), (x, *args), grad)
    exact = grads_of(lambda *t: getattr(reference, op)(*t, 1e-5)[0], as64(x, *args), grad)
    pt = (lambda *t: F.rms_norm(t[0], shape[-1:], t[1], 1e-5)) if op == "rms_norm" else \
        (lambda *t: F.layer_norm(t[0], shape[-1:], t[1], t[2], 1e-5))
    theirs = grads_of(pt, (x, *args), grad)
    for g, t, p in zip(ours, exact, theirs):
        check_rule(g, t, p, factor=3, what=f"{op} {backend} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 1024, 1024, 16, 4, 128, True), (1, 512, 2048, 12, 12, 64, True),
                                  (4, 333, 333, 8, 8, 80, False), (1, 1, 8192, 32, 8, 128, True)],
                         ids=str)
def test_attention(case, dtype, backend):
    require("attention", backend)
    b, sq, sk, h, hkv, d, causal = case
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype, seed=1), \
        randn(b, sk, hkv, d, dtype=dtype, seed=2)
    grad = randn(b, sq, h, d, dtype=dtype, seed=3)

    def sdpa(q, k, v):
        mask = None
        if causal:
            i = torch.arange(sq, device="cuda")[:, None]
            j = torch.arange(sk, device="cuda")[None, :]
            mask = j <= i + (sk - sq)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(h // hkv, 2).transpose(1, 2),
            v.repeat_interleave(h // hkv, 2).transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    with poisoned_outputs():
        out = pyllm.attention(q, k, v, causal=causal, backend=backend)
    truth = reference.attention(*as64(q, k, v), causal=causal)[0]
    check_rule(out, truth, sdpa(q, k, v), what=f"attention {backend}")
    ours = grads_of(lambda *t: pyllm.attention(*t, causal=causal, backend=backend), (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention(*t, causal=causal)[0], as64(q, k, v), grad)
    theirs = grads_of(sdpa, (q, k, v), grad)
    for g, t, p, n in zip(ours, exact, theirs, flash_backward_noise(q, k, v, grad)):
        check_rule(g, t, p, factor=3, what=f"attention {backend} grad", noise=n)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["sliding", "window", "softcap-causal", "all"])
@pytest.mark.parametrize("shape", [(2, 2048, 2048, 16, 4, 128), (2, 4, 4096, 16, 4, 64)], ids=str)
def test_attention_variants(shape, variant, dtype, backend):
    """Sliding windows and softcap (tests/test_attention_variants.py) on the device."""
    require("attention", backend)
    from test_attention_variants import VARIANTS, composed

    causal, window, cap = VARIANTS[variant]
    kw = dict(causal=causal, window_size=window, softcap=cap)
    b, sq, sk, h, hkv, d = shape
    q, k, v = randn(b, sq, h, d, dtype=dtype, scale=3.0), \
        randn(b, sk, hkv, d, dtype=dtype, seed=1), randn(b, sk, hkv, d, dtype=dtype, seed=2)
    grad = randn(b, sq, h, d, dtype=dtype, seed=3)
    with poisoned_outputs():
        out = pyllm.attention(q, k, v, backend=backend, **kw)
    truth = reference.attention(*as64(q, k, v), **kw)[0]
    check_rule(out, truth, composed(q, k, v, **kw), what=f"attention {variant} {backend}")
    ours = grads_of(lambda *t: pyllm.attention(*t, backend=backend, **kw), (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention(*t, **kw)[0], as64(q, k, v), grad)
    theirs = grads_of(lambda *t: composed(*t, **kw), (q, k, v), grad)
    for g, t, p, n in zip(ours, exact, theirs, flash_backward_noise(q, k, v, grad)):
        check_rule(g, t, p, factor=3, what=f"attention {variant} {backend} grad", noise=n)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["causal", "window", "all"])
@pytest.mark.parametrize("shape", [(2, 2048, 2048, 16, 4, 128), (2, 4, 4096, 16, 4, 64)], ids=str)
def test_attention_alibi(shape, variant, dtype, backend):
    """ALiBi (tests/test_attention_alibi.py) on the device, per-sequence slopes."""
    require("attention", backend)
    from test_attention_alibi import VARIANTS, composed, slopes_of

    causal, window, cap = VARIANTS[variant]
    b, sq, sk, h, hkv, d = shape
    slopes = slopes_of(b, h, True, shape, variant).cuda()
    kw = dict(causal=causal, window_size=window, softcap=cap)
    q, k, v = randn(b, sq, h, d, dtype=dtype, scale=3.0), \
        randn(b, sk, hkv, d, dtype=dtype, seed=1), randn(b, sk, hkv, d, dtype=dtype, seed=2)
    grad = randn(b, sq, h, d, dtype=dtype, seed=3)
    with poisoned_outputs():
        out = pyllm.attention(q, k, v, alibi_slopes=slopes, backend=backend, **kw)
    truth = reference.attention(*as64(q, k, v), alibi_slopes=slopes.double(), **kw)[0]
    check_rule(out, truth, composed(q, k, v, slopes, **kw), what=f"alibi {variant} {backend}")
    ours = grads_of(lambda *t: pyllm.attention(*t, alibi_slopes=slopes, backend=backend, **kw),
                    (q, k, v), grad)
    exact = grads_of(lambda *t: reference.attention(*t, alibi_slopes=slopes.double(), **kw)[0],
                     as64(q, k, v), grad)
    theirs = grads_of(lambda *t: composed(*t, slopes, **kw), (q, k, v), grad)
    for g, t, p, n in zip(ours, exact, theirs, flash_backward_noise(q, k, v, grad)):
        check_rule(g, t, p, factor=3, what=f"alibi {variant} {backend} grad", noise=n)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["causal", "all"])
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 16, 4, 64), (2, 4, 4096, 16, 4, 64)], ids=str)
def test_attention_sinks(shape, variant, dtype, backend):
    """Attention sinks (tests/test_attention_sinks.py) on the device: out and
    the gradients of q, k, v and the sinks."""
    require("attention", backend)
    from test_attention_sinks import VARIANTS, composed

    causal, window, cap = VARIANTS[variant]
    kw = dict(causal=causal, window_size=window, softcap=cap)
    b, sq, sk, h, hkv, d = shape
    q, k, v = randn(b, sq, h, d, dtype=dtype, scale=3.0), \
        randn(b, sk, hkv, d, dtype=dtype, seed=1), randn(b, sk, hkv, d, dtype=dtype, seed=2)
    sinks = randn(h, dtype=torch.float32, seed=4) * 2 + 1
    grad = randn(b, sq, h, d, dtype=dtype, seed=3)
    with poisoned_outputs():
        out = pyllm.attention(q, k, v, sinks=sinks, backend=backend, **kw)
    truth = reference.attention(*as64(q, k, v), sinks=sinks.double(), **kw)[0]
    check_rule(out, truth, composed(q, k, v, sinks, **kw), what=f"sinks {variant} {backend}")
    ours = grads_of(lambda *t: pyllm.attention(*t[:3], sinks=t[3], backend=backend, **kw),
                    (q, k, v, sinks), grad)
    exact = grads_of(lambda *t: reference.attention(*t[:3], sinks=t[3], **kw)[0],
                     as64(q, k, v, sinks), grad)
    theirs = grads_of(lambda *t: composed(*t, **kw), (q, k, v, sinks), grad)
    noise = flash_backward_noise(q, k, v, grad) + [0.0]
    for g, t, p, n in zip(ours, exact, theirs, noise):
        check_rule(g, t, p, factor=3, what=f"sinks {variant} {backend} grad", noise=n)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 256, 40])
@pytest.mark.parametrize("lengths", [([1, 1, 1, 1], [4096, 17, 2500, 1]),
                                     ([300, 1, 64], [4000, 900, 64])], ids=["decode", "chunked"])
def test_attention_paged(lengths, page_size, dtype, backend):
    """Attention over a paged KV cache (tests/test_attention_paged.py) on the
    device: decode and chunked prefill of sequences of different lengths,
    GQA, causal with a window, softcap and ALiBi; pages shuffled, never-used
    pages NaN."""
    require("attention", backend)
    from test_attention_paged import paged, per_sequence_composed
    from test_attention import cumulative

    lq, lk = lengths
    h, hkv, d = 16, 4, 128
    q = randn(sum(lq), h, d, dtype=dtype)
    k, v = randn(sum(lk), hkv, d, dtype=dtype, seed=1), randn(sum(lk), hkv, d, dtype=dtype, seed=2)
    k_pages, v_pages, table = (t.cuda() for t in paged(k.cpu(), v.cpu(), lk, page_size, "gpu"))
    slopes = torch.rand(h, generator=torch.Generator().manual_seed(0)).cuda() * 0.1
    kw = dict(causal=True, window_size=(1000, 0), softcap=30.0, alibi_slopes=slopes)
    cu_q, cu_k = cumulative(lq).cuda(), cumulative(lk).cuda()
    with poisoned_outputs():
        out = pyllm.attention_paged(q, k_pages, v_pages, table.cuda(),
                                    torch.tensor(lk, dtype=torch.int32, device="cuda"),
                                    cu_seqlens_q=cu_q, backend=backend, **kw)
    truth = reference.attention_varlen(*as64(q, k, v), cu_q, cu_k, **{
        **kw, "alibi_slopes": slopes.double()})[0]
    theirs = per_sequence_composed(q, k, v, lq, lk, slopes, True, (1000, 0), 30.0)
    check_rule(out, truth, theirs, what=f"paged {page_size} {backend}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_paged_kv_append(interleaved, dtype, backend):
    """The paged-KV append (tests/test_paged_kv_append.py) on the device: values
    copied exactly, keys rotated (partial rotary) within the rule, q rotated
    as pyllm.rotary rotates it, unnamed rows untouched."""
    require("paged_kv_append", backend)
    from test_rotary import pytorch_rotary

    tokens, h, hkv, d, page, pages = 3000, 16, 4, 128, 16, 400
    k, v = randn(tokens, hkv, d, dtype=dtype), randn(tokens, hkv, d, dtype=dtype, seed=1)
    q = randn(tokens, h, d, dtype=dtype, seed=2)
    slots = torch.randperm(pages * page, generator=torch.Generator().manual_seed(0))[:tokens]
    slots[::7] = -1
    slots = slots.cuda()
    positions = torch.randint(0, 8192, (tokens,), generator=torch.Generator().manual_seed(1)).cuda()
    cos, sin = (t.cuda() for t in pyllm.rotary_tables(96, 8192, 500000.0))
    k_pages = torch.full((pages, page, hkv, d), float("nan"), dtype=dtype, device="cuda")
    v_pages = torch.full_like(k_pages, float("nan"))
    q_rot = pyllm.rotary(q.clone(), k[:, :0], cos, sin, positions, interleaved=interleaved,
                         backend=backend)[0]
    pyllm.paged_kv_append(k_pages, v_pages, k, v, slots, q=q, cos=cos, sin=sin,
                          positions=positions, interleaved=interleaved, backend=backend)
    assert torch.equal(q, q_rot)
    keep = slots >= 0
    page_of, row = slots[keep] // page, slots[keep] % page
    assert torch.equal(v_pages[page_of, row], v[keep])
    written = torch.zeros(pages, page, dtype=torch.bool, device="cuda")
    written[page_of, row] = True
    assert torch.isnan(k_pages[~written]).all() and torch.isnan(v_pages[~written]).all()
    truth = reference.rotary(k[keep][None].double(), cos, sin, positions[keep][None],
                             interleaved=interleaved)[0]
    theirs = pytorch_rotary(k[keep][None], cos, sin, positions[keep][None], interleaved)[0]
    check_rule(k_pages[page_of, row], truth, theirs, what=f"paged append {backend}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (1000, 3000, 777), (8, 4096, 4096)], ids=str)
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "silu"])
def test_linear(shape, dtype, act, backend):
    require("linear", backend)
    m, kdim, n = shape
    x, w, b = randn(m, kdim, dtype=dtype), randn(n, kdim, dtype=dtype, scale=kdim ** -0.5, seed=1), \
        randn(n, dtype=dtype, seed=2)
    with poisoned_outputs():
        y = pyllm.linear(x, w, b, act, backend=backend)
    check_rule(y, reference.linear(*as64(x, w, b), act),
               reference.ACTIVATIONS[act](F.linear(x, w, b)), what=f"linear {backend}")
    grad = randn(m, n, dtype=dtype, seed=3)
    ours = grads_of(lambda *t: pyllm.linear(*t, act, backend=backend), (x, w, b), grad)
    exact = grads_of(lambda *t: reference.linear(*t, act), as64(x, w, b), grad)
    theirs = grads_of(lambda *t: reference.ACTIVATIONS[act](F.linear(*t)), (x, w, b), grad)
    for g, t, p in zip(ours, exact, theirs):
        check_rule(g, t, p, factor=3, what=f"linear {backend} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_fused_residual_norms(op, dtype, backend):
    require(op, backend)
    shape = (2048, 4096)
    x, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    w = randn(shape[-1], dtype=dtype, seed=2) + 1
    b = randn(shape[-1], dtype=dtype, seed=3) if op == "add_layer_norm" else None
    params = (w,) if op == "add_rms_norm" else (w, b)
    grads = (randn(*shape, dtype=dtype, seed=4), randn(*shape, dtype=dtype, seed=5))

    def theirs(x, r, *p):
        s = x + r
        y = F.rms_norm(s, shape[-1:], p[0], 1e-5) if op == "add_rms_norm" else \
            F.layer_norm(s, shape[-1:], p[0], p[1], 1e-5)
        return y, s

    fn = getattr(pyllm, op)
    with poisoned_outputs():
        y, s = fn(x, r, *params, 1e-5, backend=backend)
    truth = getattr(reference, op)(*as64(x, r, *params), 1e-5)
    pt = theirs(x, r, *params)
    check_rule(y, truth[0], pt[0], what=f"{op} {backend} y")
    check_rule(s, truth[1], pt[1], what=f"{op} {backend} sum")
    leaves = [t.detach().requires_grad_() for t in (x, r, *params)]
    torch.autograd.backward(fn(*leaves, 1e-5, backend=backend), grads)
    exact = [t.detach().double().requires_grad_() for t in (x, r, *params)]
    torch.autograd.backward(getattr(reference, op)(*exact, 1e-5)[:2], [g.double() for g in grads])
    ref = [t.detach().requires_grad_() for t in (x, r, *params)]
    torch.autograd.backward(theirs(*ref), grads)
    for a, e, p in zip(leaves, exact, ref):
        check_rule(a.grad, e.grad, p.grad, factor=3, what=f"{op} {backend} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2048, 4096, 11008), (7, 4096, 11008)], ids=str)
def test_swiglu(shape, dtype, backend):
    require("swiglu", backend)
    m, kdim, n = shape
    x = randn(m, kdim, dtype=dtype)
    wg, wu = (randn(n, kdim, dtype=dtype, scale=kdim ** -0.5, seed=s) for s in (1, 2))
    bg, bu = (randn(n, dtype=dtype, seed=s) for s in (3, 4))
    grad = randn(m, n, dtype=dtype, seed=5)

    def theirs(x, wg, wu, bg, bu):
        return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)

    with poisoned_outputs():
        y = pyllm.swiglu(x, wg, wu, bg, bu, backend=backend)
    check_rule(y, reference.swiglu(*as64(x, wg, wu, bg, bu)), theirs(x, wg, wu, bg, bu),
               what=f"swiglu {backend}")
    ours = grads_of(lambda *t: pyllm.swiglu(*t, backend=backend), (x, wg, wu, bg, bu), grad)
    exact = grads_of(reference.swiglu, as64(x, wg, wu, bg, bu), grad)
    pt = grads_of(theirs, (x, wg, wu, bg, bu), grad)
    for g, t, p in zip(ours, exact, pt):
        check_rule(g, t, p, factor=3, what=f"swiglu {backend} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("shape", [(4, 2048, 32, 8, 128, 128), (1, 8192, 16, 16, 80, 32)],
                         ids=str)
def test_rotary(shape, interleaved, dtype, backend):
    require("rotary", backend)
    from test_rotary import pytorch_rotary

    b, s, h, hkv, d, rd = shape
    q, k = randn(b, s, h, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype, seed=1)
    cos, sin = (t.cuda() for t in pyllm.rotary_tables(rd, 16384, 500000.0))
    pos = torch.randint(0, 16384, (b, s), device="cuda", generator=torch.Generator("cuda"))
    q2, k2 = q.clone(), k.clone()
    pyllm.rotary(q2, k2, cos, sin, pos, interleaved=interleaved, backend=backend)
    for name, ours, x in (("q", q2, q), ("k", k2, k)):
        truth = reference.rotary(x.double(), cos.double(), sin.double(), pos,
                                 interleaved=interleaved)
        check_rule(ours, truth, pytorch_rotary(x, cos, sin, pos, interleaved),
                   what=f"rotary {name} {backend}")


# Each of these holds ~25 GB on the GPU (float64 logits and gradients over a
# 128k vocabulary): in parallel runs (tools/gpu_check.py, --dist loadgroup)
# they share one worker instead of landing on several at once.
@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_cross_entropy(options, dtype, backend):
    require("cross_entropy", backend)
    import test_cross_entropy as cases

    rows, vocab = 4096, 128256
    logits = randn(rows, vocab, dtype=dtype, scale=3.0)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::7] = -100
    kw = cases.OPTIONS[options]
    leaf = logits.detach().requires_grad_()
    loss = pyllm.cross_entropy(leaf, target, backend=backend, **kw)
    loss.backward()
    exact = logits.double().requires_grad_()
    truth = cases.truth_loss(exact, target, **kw)
    truth.backward()
    mine = logits.detach().requires_grad_()
    theirs = cases.pytorch_loss(mine, target, **kw)
    theirs.backward()
    check_rule(loss.float(), truth, theirs.float(), what=f"cross_entropy {backend}")
    check_rule(leaf.grad, exact.grad, mine.grad, factor=3, what=f"cross_entropy {backend} grad")
