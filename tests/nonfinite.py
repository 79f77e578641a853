"""NaN and Inf semantics, shared by the per-backend tests (test_nonfinite.py for
the CPU kernels and the reference backend, test_cuda_host_nonfinite.py for the
CUDA kernels on the host model, interpreter/test_triton_nonfinite.py for the
Triton kernels).

The rule: a NaN or Inf in an input gives the NaN/Inf pattern of PyTorch's
float64 composition of the op (F.rms_norm, F.layer_norm, F.linear plus the
activation, softmax(q k^T * scale + bias) v), in forward and backward:

- Forward outputs: the same elements are NaN, +inf and -inf.
- Gradients: the same elements are non-finite. (Whether an element is NaN or
  +-inf there depends on the order of the sums, e.g. inf - inf, which differs
  between any two formulas of the same gradient, PyTorch's own included.)
- Every other element is finite and close to the float64 truth.

Attention masks make "the composition" ambiguous: softmax(s) @ v multiplies a
masked key's v by P = 0, so in PyTorch's math composition a NaN in a masked
v poisons the rows that never see it (0 * NaN), while its flash kernels skip
whole masked tiles. So for attention the pattern is bounded: at least the
elements that depend on the non-finite input through keys the mask lets
through (the tight "dependence" truth, each query row attending to its own
visible keys only), at most those of the float64 composition
(pyllm.reference with autograd). Without a mask the two bounds coincide. For
the gradients the loose bound also admits FlashAttention's backward (P
recomputed as exp(s - lse), lse NaN for a row whose output is NaN): a query
with an infinite score (an Inf in q or k) has a NaN output and lse in every
flash kernel, flash-attn's included, and then a NaN P for every key.

The fully masked row keeps its own rule, apart from NaN inputs: a row that
sees no key gives zeros and lse = +inf (and zero gradients); a row with a
NaN or +inf score has lse NaN, never +inf.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness import generator, randn
from pyllm import reference

VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
FORWARD_OUTPUTS = ("out", "y", "sum")


@dataclass
class Case:
    """One op call with one non-finite input element.

    ``inputs`` maps argument names to tensors (``grad`` is the output's
    gradient); ``where`` names the poisoned input, ``value`` its key in VALUES.
    """

    op: str
    dtype: torch.dtype
    where: str
    value: str
    variant: str
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{str(self.dtype)[6:]}-{self.where}={self.value}"


def _poison(t: torch.Tensor, index, value: str) -> torch.Tensor:
    t = t.clone()
    t[index] = VALUES[value]
    return t


# -- attention --------------------------------------------------------------------------------

# variant: (batch, seq_q, seq_k, heads, heads_kv, head_dim, causal, masked_row)
ATTENTION_VARIANTS = {
    "plain": (2, 9, 11, 4, 2, 16, False, False),
    "causal": (2, 9, 11, 4, 2, 16, True, False),
    "masked-row": (1, 7, 9, 2, 1, 16, False, True),   # a bias with a row that sees nothing
    "decode": (1, 2, 600, 4, 1, 16, True, False),     # the split-KV path of the CPU kernels
}
# The poisoned element of each input: (batch, token, head, dim).
ATTENTION_AT = {"q": (0, 1, 1, 3), "k": (0, 5, 0, 3), "v": (0, 5, 0, 3), "grad": (0, 1, 1, 3)}


def attention_case(variant: str, dtype: torch.dtype, where: str, value: str) -> Case:
    b, sq, sk, h, hk, d, causal, masked_row = ATTENTION_VARIANTS[variant]
    gen = generator("nonfinite-attention", variant, dtype, where, value)
    inputs = {
        "q": randn((b, sq, h, d), dtype, gen=gen),
        "k": randn((b, sk, hk, d), dtype, gen=gen),
        "v": randn((b, sk, hk, d), dtype, gen=gen),
        "grad": randn((b, sq, h, d), dtype, gen=gen),
    }
    at = list(ATTENTION_AT[where])
    if variant == "decode" and where in "kv":
        at[1] = 400  # in the second key slice
    if variant == "decode" and where in ("q", "grad"):
        at[1] = 1
    inputs[where] = _poison(inputs[where], tuple(at), value)
    options = {"causal": causal, "bias": None}
    if masked_row:
        bias = randn((b, h, sq, sk), torch.float32, gen=gen)
        bias[0, 1, 2, :] = float("-inf")  # query 2 of head 1 sees no key
        bias[0, 0, 4, 5:] = float("-inf")  # query 4 of head 0 does not see key 5
        options["bias"] = bias
    return Case("attention", dtype, where, value, variant, inputs, options)


def _visible_rows(case: Case):
    """Per (batch, query, head): the keys that query sees (the dependence truth)."""
    q, k = case.inputs["q"], case.inputs["k"]
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    bias = case.options["bias"]
    for bi, i, hh in itertools.product(range(b), range(sq), range(h)):
        keys = torch.arange(sk)
        if case.options["causal"]:
            keys = keys[keys <= i + sk - sq]
        if bias is not None:
            keys = keys[~torch.isneginf(bias[bi, hh, i, keys])]
        yield bi, i, hh, hh // (h // hk), keys


def _attention_dependence(case: Case, q, k, v):
    """out and lse, each query row attending to its visible keys only (float64)."""
    b, sq, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    bias = case.options["bias"]
    out = [[[None] * h for _ in range(sq)] for _ in range(b)]
    lse = torch.empty(b, h, sq, dtype=torch.float64)
    for bi, i, hh, kh, keys in _visible_rows(case):
        if keys.numel() == 0:
            out[bi][i][hh] = q[bi, i, hh] * 0.0  # zeros, no gradient of note
            lse[bi, hh, i] = float("inf")
            continue
        s = (k[bi, keys, kh] @ q[bi, i, hh]) * scale
        if bias is not None:
            s = s + bias[bi, hh, i, keys].double()
        out[bi][i][hh] = torch.softmax(s, 0) @ v[bi, keys, kh]
        lse[bi, hh, i] = torch.logsumexp(s.detach(), 0)
    out = torch.stack([torch.stack([torch.stack(row) for row in seq]) for seq in out])
    return out, lse


def _attention_composition(case: Case, q, k, v):
    bias = case.options["bias"]
    return reference.attention(q, k, v, causal=case.options["causal"],
                               bias=None if bias is None else bias.double())


def _lse_convention(lse: torch.Tensor, out: torch.Tensor, case: Case) -> torch.Tensor:
    """lse = +inf only for rows that see no key; a row with an infinite score has lse NaN."""
    lse = lse.clone()
    empty = torch.zeros_like(lse, dtype=torch.bool)
    for bi, i, hh, _, keys in _visible_rows(case):
        empty[bi, hh, i] = keys.numel() == 0
    lse[torch.isposinf(lse) & ~empty] = float("nan")
    lse[empty & ~torch.isnan(lse)] = float("inf")
    return lse


def _autograd(fn, case: Case, names):
    leaves = [case.inputs[n].double().requires_grad_() for n in names]
    outs = fn(*leaves)
    first = outs[0] if isinstance(outs, tuple) else outs
    first.backward(case.inputs["grad"].double())
    return outs, {f"d{n}": t.grad for n, t in zip(names, leaves)}


def _flash_backward(case: Case, out, lse):
    """dq, dk, dv by FlashAttention's backward in float64: P = exp(s - lse)."""
    q, k, v, grad = (case.inputs[n].double() for n in ("q", "k", "v", "grad"))
    b, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    qh, kh, vh, gh, oh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2),
                                                      v.repeat_interleave(group, 2), grad, out))
    scale = 1.0 / math.sqrt(d)
    s = qh @ kh.transpose(-1, -2) * scale
    if case.options["causal"]:
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    if case.options["bias"] is not None:
        s = s + case.options["bias"].double()
    p = torch.where(torch.isposinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    dv = p.transpose(-1, -2) @ gh
    ds = p * (gh @ vh.transpose(-1, -2) - (gh * oh).sum(-1, keepdim=True))
    dq = ds @ kh * scale
    dk = ds.transpose(-1, -2) @ qh * scale
    regroup = lambda t: t.transpose(1, 2).reshape(b, sk, h // group, group, d).sum(3)
    return {"dq": dq.transpose(1, 2), "dk": regroup(dk), "dv": regroup(dv)}


def attention_bounds(case: Case):
    """(tight, loose): dicts of out, lse, dq, dk, dv in float64."""
    bounds = []
    for fn in (_attention_dependence, _attention_composition):
        (out, lse), grads = _autograd(lambda q, k, v: fn(case, q, k, v), case, "qkv")
        bounds.append({"out": out.detach(), "lse": _lse_convention(lse.detach(), out, case),
                       **grads})
    loose = bounds[1]
    for name, g in _flash_backward(case, loose["out"], loose["lse"]).items():
        # non-finite where either formula is: NaN marks the extra elements
        loose[name] = torch.where(torch.isfinite(g), loose[name], float("nan"))
    return bounds


def attention_cases(dtypes, variants=tuple(ATTENTION_VARIANTS), wheres=("q", "k", "v", "grad"),
                    values=tuple(VALUES)):
    return [attention_case(vr, dt, w, val)
            for vr, dt, w, val in itertools.product(variants, dtypes, wheres, values)]


# -- norms ------------------------------------------------------------------------------------

NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")
NORM_SHAPE = (5, 37)


def norm_case(op: str, dtype: torch.dtype, where: str, value: str) -> Case:
    gen = generator("nonfinite-norm", op, dtype, where, value)
    rows, n = NORM_SHAPE
    inputs = {"x": randn((rows, n), dtype, gen=gen), "weight": randn((n,), dtype, gen=gen),
              "grad": randn((rows, n), dtype, gen=gen)}
    if op.startswith("add_"):
        inputs["residual"] = randn((rows, n), dtype, gen=gen)
    if "layer" in op:
        inputs["bias"] = randn((n,), dtype, gen=gen)
    at = (3,) if where in ("weight", "bias") else (2, 3)
    inputs[where] = _poison(inputs[where], at, value)
    return Case(op, dtype, where, value, "norm", inputs, {"eps": 1e-5})


def norm_wheres(op: str):
    return (("x", "residual") if op.startswith("add_") else ("x",)) + ("weight",) + (
        ("bias",) if "layer" in op else ()) + ("grad",)


def norm_args(case: Case):
    """The differentiable inputs of the op, in its argument order."""
    return [n for n in ("x", "residual", "weight", "bias") if n in case.inputs]


def norm_composition(case: Case, *ts):
    """(y, sum) by F.rms_norm / F.layer_norm of x (+ residual), in the inputs' dtype."""
    named = dict(zip(norm_args(case), ts))
    x = named["x"] + named["residual"] if "residual" in named else named["x"]
    n = x.shape[-1]
    if "layer" in case.op:
        y = F.layer_norm(x, (n,), named["weight"], named["bias"], case.options["eps"])
    else:
        y = F.rms_norm(x, (n,), named["weight"], case.options["eps"])
    return y, x


def norm_bounds(case: Case):
    (y, total), grads = _autograd(lambda *ts: norm_composition(case, *ts), case, norm_args(case))
    truth = {"y": y.detach(), **grads}
    if "residual" in case.inputs:
        truth["sum"] = total.detach()
    return truth, truth


def norm_cases(dtypes, ops=NORM_OPS, values=tuple(VALUES)):
    return [norm_case(op, dt, w, val) for op, dt, val in itertools.product(ops, dtypes, values)
            for w in norm_wheres(op)]


# -- linear -----------------------------------------------------------------------------------

LINEAR_OPS = ("linear-none", "linear-gelu", "linear-gelu_tanh", "linear-silu", "swiglu")
LINEAR_SHAPE = (6, 40, 24)  # rows, in, out


def linear_case(op: str, dtype: torch.dtype, where: str, value: str) -> Case:
    gen = generator("nonfinite-linear", op, dtype, where, value)
    m, k, n = LINEAR_SHAPE
    inputs = {"x": randn((m, k), dtype, gen=gen)}
    weights = ("weight_gate", "weight_up") if op == "swiglu" else ("weight",)
    biases = ("bias_gate", "bias_up") if op == "swiglu" else ("bias",)
    for w in weights:
        inputs[w] = randn((n, k), dtype, gen=gen, scale=0.2)
    for b in biases:
        inputs[b] = randn((n,), dtype, gen=gen)
    inputs["grad"] = randn((m, n), dtype, gen=gen)
    at = (5,) if where.startswith("bias") else (2, 7)
    inputs[where] = _poison(inputs[where], at, value)
    return Case(op, dtype, where, value, "linear", inputs, {})


def linear_args(case: Case):
    if case.op == "swiglu":
        return ["x", "weight_gate", "weight_up", "bias_gate", "bias_up"]
    return ["x", "weight", "bias"]


def linear_composition(case: Case, *ts):
    if case.op == "swiglu":
        x, wg, wu, bg, bu = ts
        return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    x, w, b = ts
    return reference.ACTIVATIONS[case.op.split("-", 1)[1]](F.linear(x, w, b))


def linear_bounds(case: Case):
    y, grads = _autograd(lambda *ts: linear_composition(case, *ts), case, linear_args(case))
    truth = {"y": y.detach(), **grads}
    return truth, truth


def linear_cases(dtypes, ops=LINEAR_OPS, values=tuple(VALUES)):
    cases = []
    for op, dt, val in itertools.product(ops, dtypes, values):
        probe = linear_case(op, dt, "x", val)
        cases += [linear_case(op, dt, w, val) for w in probe.inputs]
    return cases


def bounds(case: Case):
    if case.op == "attention":
        return attention_bounds(case)
    if case.op in NORM_OPS:
        return norm_bounds(case)
    return linear_bounds(case)


# -- running pyllm ops with autograd, and the check --------------------------------------------

def run_pyllm(case: Case, backend: str) -> dict:
    """The op through pyllm's public functions on ``backend``, forward and
    backward: a dict of the outputs and gradients named as in the bounds."""
    import pyllm

    if case.op == "attention":
        names = ["q", "k", "v"]
    elif case.op in NORM_OPS:
        names = norm_args(case)
    else:
        names = linear_args(case)
    leaves = [case.inputs[n].clone().requires_grad_() for n in names]
    named = dict(zip(names, leaves))
    result = {}
    with pyllm.use_backend(backend):
        if case.op == "attention":
            out, lse = pyllm.attention(*leaves, causal=case.options["causal"],
                                       bias=case.options["bias"], return_lse=True)
            result.update(out=out, lse=lse)
        elif case.op in NORM_OPS:
            fn = getattr(pyllm, case.op)
            kw = {"eps": case.options["eps"]}
            args = [named["x"]] + ([named["residual"]] if "residual" in named else [])
            args.append(named["weight"])
            if "bias" in named:
                args.append(named["bias"])
            outs = fn(*args, **kw)
            if case.op.startswith("add_"):
                result.update(y=outs[0], sum=outs[1])
            else:
                result.update(y=outs)
        elif case.op == "swiglu":
            result["y"] = pyllm.swiglu(*leaves)
        else:
            result["y"] = pyllm.linear(*leaves, activation=case.op.split("-", 1)[1])
        main = result["out"] if case.op == "attention" else result["y"]
        main.backward(case.inputs["grad"])
    result.update({f"d{n}": t.grad for n, t in named.items()})
    return {k: v.detach() for k, v in result.items()}


def _tolerance(dtype):
    return {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 5e-2)


def check(case: Case, ours: dict, tight: dict, loose: dict) -> None:
    """Asserts the rule of this module for every output and gradient of one call."""
    for name, t in tight.items():
        got = ours[name].double()
        lo, hi, mine = ~torch.isfinite(t), ~torch.isfinite(loose[name]), ~torch.isfinite(got)
        what = f"{case.id}: {name}"
        missing = (lo & ~mine).nonzero().tolist()
        assert not missing, f"{what}: finite where the input's NaN/Inf must show, at {missing[:5]}"
        extra = (mine & ~hi).nonzero().tolist()
        assert not extra, f"{what}: NaN/Inf where PyTorch's composition is finite, at {extra[:5]}"
        if name in FORWARD_OUTPUTS or name == "lse":
            sure = lo & hi & (torch.isnan(t) == torch.isnan(loose[name]))
            for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                               ("-inf", torch.isneginf)):
                wrong = (sure & (test(t) != test(got))).nonzero().tolist()
                assert not wrong, f"{what}: not {kind} as in PyTorch, at {wrong[:5]}"
        finite = ~mine & ~lo
        scale = t[finite].abs().max().item() if finite.any() else 1.0
        tol = _tolerance(case.dtype) * max(1.0, scale)
        err = (got[finite] - t[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= tol, f"{what}: finite elements off the truth by {err:.3g} (> {tol:.3g})"
