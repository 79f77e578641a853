"""Property-based tests (hypothesis), shared by the per-backend test files
(test_properties.py for the CPU kernels and the reference backend,
test_cuda_host_properties.py for the CUDA kernels on the host model,
interpreter/test_triton_properties.py for the Triton kernels).

Each ``draw_*`` function draws one call of an op: random shapes with 0 and 1
among the sizes, random layouts (non-contiguous, transposed, expanded views),
broadcast bias shapes, GQA ratios, varlen length lists with empty and
length-1 sequences, eps and scale values. Each ``check_*`` function runs the
call through a backend and holds outputs and gradients to the harness rule
(float64 reference as the truth, PyTorch's own answer in the dtype under test).

Budget: the ``ci`` profile (the default, derandomised: the same examples on
every run) runs a few examples per test; ``PYLLM_HYPOTHESIS=long`` runs
hundreds (``make test-long``). The session's total of examples is printed
at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from harness import noncontiguous, transposed
from pyllm import reference
from pyllm.accuracy import judge, max_error

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=400, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("PYLLM_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)


def budget(ci: int) -> settings:
    """Settings for a slow backend (the Triton interpreter): ``ci`` examples
    per test in the ci profile, 25 times as many in the long one."""
    return settings(max_examples=ci if PROFILE == "ci" else 25 * ci)

#: Examples that passed in this process, per op/backend (tests/conftest.py
#: reports them; hypothesis' own retries while shrinking a failure are not
#: counted, nor examples rejected by assume()).
EXAMPLES: dict[str, int] = {}


def count(name: str) -> None:
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1


# -- the rule, with the noise of cancelling sums ----------------------------------------------

def _perturbed(inputs64, dtype, seed):
    """The inputs, each element moved by a random relative eps(dtype)."""
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs64:
        if t is None or not t.is_floating_point():
            out.append(t)
            continue
        noise = (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1) * eps
        out.append(t * (1 + noise))
    return out


def sensitivity(fn, inputs64, dtype, grads, draws: int = 2) -> list[float]:
    """Per result of ``fn(*inputs, grads=grads)`` (a list of float64 tensors:
    outputs, then gradients for the output gradients ``grads``), the larger of

    - how far it moves when the inputs are rounded once more in ``dtype``;
    - eps32 times the result for the inputs' and gradients' magnitudes
      (|x|, |W|, |dy|, ...): the size of the terms its sums add, and so the
      rounding of those sums in float32 where they cancel (a bias gradient
      over a few rows, say).

    There a single sample of PyTorch's own error can fall far below the
    rounding noise of any other order of sums; the property tests add a few
    times this to the rule's floor (:func:`check`)."""
    base = fn(*inputs64, grads=grads)
    worst = [0.0] * len(base)
    for seed in range(draws):
        moved = fn(*_perturbed(inputs64, dtype, seed), grads=grads)
        worst = [max(w, max_error(m, b)) if b is not None else 0.0
                 for w, m, b in zip(worst, moved, base)]
    magnitudes = fn(*[t.abs() if t is not None and t.is_floating_point() else t
                      for t in inputs64], grads=[g.abs() for g in grads])
    eps = torch.finfo(torch.float32).eps
    return [max(w, eps * float(m.abs().max())) if m is not None and m.numel() else w
            for w, m in zip(worst, magnitudes)]


#: Roundings allowed on the way, in units of ``noise``: a blocked sum of K
#: terms rounds about log2(K) times where PyTorch's may round once, and the
#: noise estimates count one rounding.
NOISE_ROUNDINGS = 8


def check(ours, truth, pytorch, noise: float, *, factor: float = 2.0, what: str = "output"):
    """The harness rule, its floor raised by NOISE_ROUNDINGS x ``noise`` (see
    :func:`sensitivity`): the property tests draw tiny and degenerate shapes
    (a row of 2, one key, three rows to sum) where one sample of PyTorch's own
    error can be far below the rounding noise of any other order of sums."""
    verdict = judge(ours, truth, pytorch, factor=factor, what=what)
    assert verdict.ok or (not torch.isnan(ours).any() and ours.shape == truth.shape
                          and verdict.error <= verdict.bound + NOISE_ROUNDINGS * noise), (
        f"{verdict.reason} (input-rounding noise {noise:.3g})")


LAYOUTS = ("contiguous", "noncontiguous", "transposed", "expanded")
sizes = st.sampled_from([0, 1, 2, 3, 5, 7])


def tensor(draw, shape, dtype, *, scale=1.0, offset=0.0, layouts=LAYOUTS):
    """Random values in a random layout (the same values whatever the layout)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(layouts))
    if layout == "expanded" and len(shape) >= 2 and shape[0] > 1:
        row = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float64)
        return (row * scale + offset).to(dtype).expand(shape)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "noncontiguous" and len(shape) >= 1:
        return noncontiguous(t)
    if layout == "transposed" and len(shape) >= 2:
        return transposed(t)
    return t


# -- norms ------------------------------------------------------------------------------------

def draw_norm(draw, op: str, dtype: torch.dtype) -> dict:
    lead = draw(st.lists(sizes, min_size=0, max_size=2))
    n = draw(st.one_of(st.integers(1, 9), st.integers(10, 300), st.sampled_from([1024, 1031])))
    shape = (*lead, n)
    call = {"x": tensor(draw, shape, dtype, scale=2.0, offset=0.5)}
    call["residual"] = tensor(draw, shape, dtype) if op.startswith("add_") else None
    params = draw(st.sampled_from(["none", "same", "float32", "weight only"]))
    ptype = torch.float32 if params == "float32" else dtype
    rms = "rms" in op
    call["weight"] = None if params == "none" else tensor(draw, (n,), ptype, offset=1.0,
                                                           layouts=("contiguous", "noncontiguous"))
    call["bias"] = (None if rms or params in ("none", "weight only")
                    else tensor(draw, (n,), ptype, layouts=("contiguous", "noncontiguous")))
    call["eps"] = draw(st.sampled_from([1e-5, 1e-6, 1e-2, 0.5]))
    call["grads"] = [tensor(draw, shape, dtype, layouts=("contiguous",))
                     for _ in range(2 if op.startswith("add_") else 1)]
    return call


def _norm_args(op, x, r, w, b):
    return ((x, r) if op.startswith("add_") else (x,)) + ((w,) if "rms" in op else (w, b))


def norm_pytorch(op, x, r, w, b, eps):
    """PyTorch in the dtype under test (parameters cast to it): (y,) or (y, sum)."""
    cast = (lambda p: p.to(x.dtype) if p is not None else None)
    total = x + r if op.startswith("add_") else x
    n = x.shape[-1:]
    y = F.rms_norm(total, n, cast(w), eps) if "rms" in op else \
        F.layer_norm(total, n, cast(w), cast(b), eps)
    return (y, total) if op.startswith("add_") else (y,)


def norm_truth(op, x, r, w, b, eps):
    out = getattr(reference, op)(*_norm_args(op, x, r, w, b), eps)
    return out[:2] if op.startswith("add_") else out[:1]


def _grads(fn, inputs, grads):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    # an input no output depends on (any input of an empty result) has a zero gradient
    return [None if t is None else t.grad if t.grad is not None else torch.zeros_like(t)
            for t in leaves]


def _as64(ts):
    return [t.double() if t is not None else None for t in ts]


def check_norm(op: str, call: dict, run) -> None:
    """``run(op, x, residual, weight, bias, eps, grads) -> (outputs, grads)``."""
    x, r, w, b, eps = (call[k] for k in ("x", "residual", "weight", "bias", "eps"))
    inputs = (x, r, w, b)
    outs, grads = run(op, *inputs, eps, call["grads"])
    fused = op.startswith("add_")

    def truth_all(*ts, grads=call["grads"]):
        found = list(norm_truth(op, *ts, eps))
        return found + _grads(lambda *u: norm_truth(op, *u, eps), ts, grads)

    truth = truth_all(*_as64(inputs))
    noise = sensitivity(truth_all, _as64(inputs), x.dtype, call["grads"])
    first = 2 if fused else 1
    # dx = rstd (w g - xhat mean(w g xhat)) (- the mean's part for LayerNorm)
    # cancels along xhat, wholly for a short row (n = 1: LayerNorm's dx is 0,
    # RMSNorm's eps rstd^3 w g): a float32 evaluation is off by about
    # eps32 max|rstd w g| there, whatever the formula.
    if x.numel():
        x64 = x.double() + (r.double() if fused else 0)
        rstd = torch.rsqrt((x64 - (0 if "rms" in op else x64.mean(-1, keepdim=True))).pow(2)
                           .mean(-1, keepdim=True) + eps)
        wg = call["grads"][0].double() * (w.double() if w is not None else 1.0)
        terms = torch.finfo(torch.float32).eps * float((rstd * wg).abs().max())
        for j in (0, 1):
            if truth[first + j] is not None:
                noise[first + j] = max(noise[first + j], terms)
    theirs = norm_pytorch(op, *inputs, eps)
    cast = (lambda p: p.to(x.dtype) if p is not None else None)
    theirs_g = _grads(lambda *ts: norm_pytorch(op, *ts, eps), (x, r, cast(w), cast(b)),
                      call["grads"])
    for i, (what, o, p) in enumerate(zip(("y", "sum"), outs, theirs)):
        assert o.shape == truth[i].shape and o.dtype == x.dtype, (what, o.shape, o.dtype)
        check(o, truth[i], p, noise[i], what=what)
    for j, (what, g, p) in enumerate(zip(("x", "residual", "weight", "bias"), grads, theirs_g)):
        t = truth[first + j]
        if t is None:
            continue
        assert g is not None and g.shape == t.shape, what
        check(g, t, p.to(g.dtype), noise[first + j], factor=3, what=f"grad {what}")

def pyllm_norm(backend):
    """A ``run`` for check_norm through pyllm's public functions on ``backend``
    (the drawn views themselves are the autograd leaves: their layouts reach
    the op)."""
    import pyllm

    def run(op, x, r, w, b, eps, grads):
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (x, r, w, b)]
        out = getattr(pyllm, op)(*_norm_args(op, *leaves), eps, backend=backend)
        outs = out if op.startswith("add_") else (out,)
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
        return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]
    return run


# -- linear -----------------------------------------------------------------------------------

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu")


def draw_linear(draw, op: str, dtype: torch.dtype) -> dict:
    lead = draw(st.lists(sizes, min_size=0, max_size=2))
    m = draw(st.one_of(sizes, st.integers(8, 70)))
    k = draw(st.one_of(st.sampled_from([0, 1, 2, 7]), st.integers(8, 140)))
    n = draw(st.one_of(st.sampled_from([0, 1, 3]), st.integers(4, 90)))
    shape = (*lead, m, k)
    call = {"x": tensor(draw, shape, dtype)}
    weights = ("weight_gate", "weight_up") if op == "swiglu" else ("weight",)
    for w in weights:
        call[w] = tensor(draw, (n, k), dtype, scale=max(k, 1) ** -0.5,
                         layouts=("contiguous", "noncontiguous", "transposed"))
    bias = draw(st.sampled_from(["none", "same", "float32"]))
    btype = torch.float32 if bias == "float32" else dtype
    for b in (("bias_gate", "bias_up") if op == "swiglu" else ("bias",)):
        call[b] = None if bias == "none" else tensor(draw, (n,), btype,
                                                      layouts=("contiguous", "noncontiguous"))
    call["activation"] = "none" if op == "swiglu" else draw(st.sampled_from(ACTIVATIONS))
    call["grad"] = tensor(draw, (*lead, m, n), dtype, layouts=("contiguous",))
    return call


def linear_inputs(op, call):
    names = ("x", "weight_gate", "weight_up", "bias_gate", "bias_up") if op == "swiglu" else \
        ("x", "weight", "bias")
    return [call[n] for n in names]


def linear_truth(op, act, *ts):
    return reference.swiglu(*ts) if op == "swiglu" else reference.linear(*ts, act)


def linear_pytorch(op, act, *ts):
    x = ts[0]
    ts = [t.to(x.dtype) if t is not None else None for t in ts]
    if op == "swiglu":
        x, wg, wu, bg, bu = ts
        return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    x, w, b = ts
    return reference.ACTIVATIONS[act](F.linear(x, w, b))


def check_linear(op: str, call: dict, run) -> None:
    """``run(op, inputs, activation, grad) -> (y, grads)``."""
    inputs, act = linear_inputs(op, call), call["activation"]
    y, grads = run(op, inputs, act, call["grad"])

    def truth_all(*ts, grads=(call["grad"],)):
        return [linear_truth(op, act, *ts)] + _grads(lambda *u: linear_truth(op, act, *u), ts,
                                                     grads)

    truth = truth_all(*_as64(inputs))
    noise = sensitivity(truth_all, _as64(inputs), inputs[0].dtype, [call["grad"]])
    assert y.shape == truth[0].shape and y.dtype == inputs[0].dtype
    check(y, truth[0], linear_pytorch(op, act, *inputs), noise[0])
    theirs_g = _grads(lambda *ts: linear_pytorch(op, act, *ts), inputs, [call["grad"]])
    for i, (g, p) in enumerate(zip(grads, theirs_g)):
        t = truth[1 + i]
        if t is None:
            continue
        assert g is not None and g.shape == t.shape, i
        check(g, t, p.to(g.dtype), noise[1 + i], factor=3, what=f"grad of input {i}")

def pyllm_linear(backend):
    import pyllm

    def run(op, inputs, act, grad):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        if op == "swiglu":
            y = pyllm.swiglu(*leaves, backend=backend)
        else:
            y = pyllm.linear(*leaves, act, backend=backend)
        y.backward(grad)
        return y.detach(), [t.grad if t is not None else None for t in leaves]
    return run


# -- attention --------------------------------------------------------------------------------

HEAD_DIMS = (1, 7, 16, 40, 64, 80, 96, 128, 160, 256)
BIASES = ("none", "key padding", "heads x keys", "full float32", "bool")


def draw_attention(draw, dtype: torch.dtype, *, max_seq: int = 40, head_dims=HEAD_DIMS) -> dict:
    batch = draw(st.sampled_from([0, 1, 1, 2, 3]))
    seq_q = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(3, max_seq)))
    seq_k = draw(st.one_of(st.sampled_from([1, 2]), st.integers(3, max_seq)))
    heads_kv = draw(st.integers(1, 3))
    heads = heads_kv * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from(head_dims))
    qkv_layouts = ("contiguous", "noncontiguous", "expanded")
    call = {
        "q": tensor(draw, (batch, seq_q, heads, d), dtype, layouts=qkv_layouts),
        "k": tensor(draw, (batch, seq_k, heads_kv, d), dtype, layouts=qkv_layouts),
        "v": tensor(draw, (batch, seq_k, heads_kv, d), dtype, layouts=qkv_layouts),
        "causal": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, 0.05, 0.3, 1.0])),
        "grad": tensor(draw, (batch, seq_q, heads, d), dtype, layouts=("contiguous",)),
    }
    kind = draw(st.sampled_from(BIASES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bias = None
    if kind == "key padding":  # right padding, key 0 always kept
        bias = torch.zeros(batch, 1, 1, seq_k, dtype=dtype)
        for b in range(batch):
            bias[b, ..., 1 + int(torch.randint(seq_k, (1,), generator=gen)):] = float("-inf")
    elif kind == "heads x keys":
        bias = torch.randn(1, heads, 1, seq_k, generator=gen).to(dtype)
    elif kind == "full float32":
        bias = torch.randn(batch, heads, seq_q, seq_k, generator=gen)
    elif kind == "bool":  # random, key 0 always allowed: no row is masked whole by it
        bias = torch.rand(batch, 1, seq_q, seq_k, generator=gen) < 0.7
        bias[..., 0] = True
    call["bias"] = bias
    return call


def attention_pytorch(q, k, v, causal=False, scale=None, bias=None):
    """SDPA in the dtype under test; rows that see no key are zeros."""
    from test_attention import pytorch_attention
    if q.numel() == 0:
        return q * 0.0  # empty, but on the autograd graph
    return pytorch_attention(q, k, v, causal=causal, scale=scale, bias=bias)


def _float_bias(bias):
    if bias is not None and bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=torch.float64).masked_fill(~bias, float("-inf"))
    return None if bias is None else bias.double()


def _attention_truth(q, k, v, causal, scale, bias):
    return reference.attention(q, k, v, causal=causal, scale=scale, bias=_float_bias(bias))[0]


def _flash_backward_rounding(noise, truth, lse, q, k, v, grad, scale):
    """Adds to the noise of the gradients the float32 roundings of
    FlashAttention's backward (every kernel here computes it so, as
    flash-attn does), which cancel exactly in PyTorch's composition where a
    query sees one key:

    - P = exp(s - lse) is recomputed from a float32 lse and a float32 s
      summed in another order than the forward's: relative error up to about
      2 eps32 (|lse| + |q| |k| scale) in every gradient (|q| |k| bounds the
      dot product's sum of |q_i k_i|);
    - dS = P (dP - D), D = rowsum(dO * O): dP and D are two float32 sums of
      size |dO| |v| (equal where a query sees one key, dq = 0 then), so dq and
      dk are off by about eps32 |dO| |v| |k| scale and eps32 |dO| |v| |q| scale.
    """
    if q.numel() == 0 or k.numel() == 0:
        return noise
    eps = torch.finfo(torch.float32).eps
    finite = lse[torch.isfinite(lse)]
    norm = lambda t: float(t.double().norm(dim=-1).max())
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse_max = float(finite.abs().max()) if finite.numel() else 0.0
    p_rel = 2 * eps * (lse_max + norm(q) * norm(k) * scale)
    ds = eps * norm(grad) * norm(v) * scale
    size = lambda t: float(t.abs().max()) if t.numel() else 0.0
    return [noise[0],
            max(noise[1], ds * norm(k) + p_rel * size(truth[1])),
            max(noise[2], ds * norm(q) + p_rel * size(truth[2])),
            max(noise[3], p_rel * size(truth[3]))]


def check_attention(call: dict, run) -> None:
    """``run(q, k, v, causal, scale, bias, grad) -> (out, grads)``."""
    q, k, v = call["q"], call["k"], call["v"]
    opts = dict(causal=call["causal"], scale=call["scale"], bias=call["bias"])
    out, grads = run(q, k, v, opts["causal"], opts["scale"], opts["bias"], call["grad"])

    def truth_all(*ts, grads=(call["grad"],)):
        return [_attention_truth(*ts, **opts)] + _grads(
            lambda *u: _attention_truth(*u, **opts), ts, grads)

    inputs64 = [t.double() for t in (q, k, v)]
    truth = truth_all(*inputs64)
    lse = reference.attention(*inputs64, causal=opts["causal"], scale=opts["scale"],
                              bias=_float_bias(opts["bias"]))[1]
    noise = _flash_backward_rounding(sensitivity(truth_all, inputs64, q.dtype, [call["grad"]]), truth, lse,
                                     q, k, v, call["grad"], call["scale"])
    assert out.shape == q.shape and out.dtype == q.dtype
    check(out, truth[0], attention_pytorch(q, k, v, **opts), noise[0])
    theirs_g = _grads(lambda *ts: attention_pytorch(*ts, **opts), (q, k, v), [call["grad"]])
    for i, (name, g, p) in enumerate(zip("qkv", grads, theirs_g)):
        check(g, truth[1 + i], p, noise[1 + i], factor=3, what=f"grad {name}")

def pyllm_attention(backend):
    import pyllm

    def run(q, k, v, causal, scale, bias, grad):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = pyllm.attention(*leaves, causal=causal, scale=scale, bias=bias, backend=backend)
        out.backward(grad)
        return out.detach(), [t.grad for t in leaves]
    return run


def draw_varlen(draw, dtype: torch.dtype, *, max_len: int = 30, head_dims=HEAD_DIMS) -> dict:
    count_ = draw(st.integers(1, 4))
    lq = draw(st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, max_len)),
                       min_size=count_, max_size=count_))
    lk = draw(st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, max_len)),
                       min_size=count_, max_size=count_))
    heads_kv = draw(st.integers(1, 3))
    heads = heads_kv * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from(head_dims))
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32)
    return {
        "q": tensor(draw, (sum(lq), heads, d), dtype, layouts=("contiguous", "noncontiguous")),
        "k": tensor(draw, (sum(lk), heads_kv, d), dtype, layouts=("contiguous", "noncontiguous")),
        "v": tensor(draw, (sum(lk), heads_kv, d), dtype, layouts=("contiguous", "noncontiguous")),
        "cu_q": cu(lq), "cu_k": cu(lk), "causal": draw(st.booleans()),
        "grad": tensor(draw, (sum(lq), heads, d), dtype, layouts=("contiguous",)),
    }


def _per_sequence(fn, q, k, v, cu_q, cu_k):
    outs = [fn(q[cu_q[i]:cu_q[i + 1]][None], k[cu_k[i]:cu_k[i + 1]][None],
               v[cu_k[i]:cu_k[i + 1]][None])[0] for i in range(len(cu_q) - 1)]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _varlen_pytorch(q, k, v, cu_q, cu_k, causal):
    def one(qs, ks, vs):
        if qs.shape[1] == 0:
            return qs
        if ks.shape[1] == 0:
            return torch.zeros_like(qs)
        return attention_pytorch(qs, ks, vs, causal=causal)
    return _per_sequence(one, q, k, v, cu_q, cu_k)


def check_varlen(call: dict, run) -> None:
    """``run(q, k, v, cu_q, cu_k, causal, grad) -> (out, grads)``."""
    q, k, v, cu_q, cu_k, causal = (call[n] for n in ("q", "k", "v", "cu_q", "cu_k", "causal"))
    out, grads = run(q, k, v, cu_q, cu_k, causal, call["grad"])
    truth_fn = lambda *ts: reference.attention_varlen(*ts, cu_q, cu_k, causal=causal)[0]

    def truth_all(*ts, grads=(call["grad"],)):
        return [truth_fn(*ts)] + _grads(truth_fn, ts, grads)

    inputs64 = [t.double() for t in (q, k, v)]
    truth = truth_all(*inputs64)
    lse = reference.attention_varlen(*inputs64, cu_q, cu_k, causal=causal)[1]
    noise = _flash_backward_rounding(sensitivity(truth_all, inputs64, q.dtype, [call["grad"]]), truth, lse,
                                     q, k, v, call["grad"], None)
    check(out, truth[0], _varlen_pytorch(q, k, v, cu_q, cu_k, causal), noise[0])
    theirs_g = _grads(lambda *ts: _varlen_pytorch(*ts, cu_q, cu_k, causal), (q, k, v),
                      [call["grad"]])
    for i, (name, g, p) in enumerate(zip("qkv", grads, theirs_g)):
        check(g, truth[1 + i], p, noise[1 + i], factor=3, what=f"grad {name}")

def pyllm_varlen(backend):
    import pyllm

    def run(q, k, v, cu_q, cu_k, causal, grad):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = pyllm.attention_varlen(*leaves, cu_q, cu_k, causal=causal, backend=backend)
        out.backward(grad)
        return out.detach(), [t.grad for t in leaves]
    return run
