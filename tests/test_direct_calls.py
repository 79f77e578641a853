"""The dispatcher-free path of small eager CPU inference calls (pyllm/ops/direct.py,
csrc/direct_calls.cpp): it gives the operators' results, and it is taken only
where nothing stands between the call and the CPU kernel (grad, modes,
autocast, the profiler, torch.compile, subclasses, a named backend). The same
for the packed products of pyllm.nn's packed modules (linear_packed_direct,
swiglu_packed_direct) and the norm modules."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pyllm
from harness import KERNEL_DTYPES, generator, noncontiguous, poisoned_outputs, randn
from pyllm.ops import direct

OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")


def _inputs(op, shape, dtype, params, key=""):
    gen = generator("direct", op, shape, dtype, params, key)
    x = randn(shape, dtype, gen=gen, scale=2.0, offset=0.5)
    r = randn(shape, dtype, gen=gen) if op.startswith("add_") else None
    w = b = None
    if params != "none":
        ptype = torch.float32 if params == "float32" else dtype
        w = randn(shape[-1:], ptype, gen=gen, offset=1.0)
        b = None if "rms" in op else randn(shape[-1:], ptype, gen=gen)
    return x, r, w, b


def _face(op, x, r, w, b, eps=1e-5, **kw):
    """The face's outputs as a tuple: (y,) or (y, sum)."""
    args = ((x, r) if r is not None else (x,)) + ((w,) if "rms" in op else (w, b))
    out = getattr(pyllm, op)(*args, eps, **kw)
    return out if isinstance(out, tuple) else (out,)


def _operator(op, x, r, w, b, eps=1e-5):
    """The registered operator's outputs (through the dispatcher), as _face."""
    args = ((x, r) if r is not None else (x,)) + ((w,) if "rms" in op else (w, b))
    out = getattr(torch.ops.pyllm, op)(*args, eps)
    return out[:2] if r is not None else out[:1]


@pytest.fixture
def routed(monkeypatch):
    """Counts the calls that went the routed way (checks, then torch.ops)."""
    calls = []
    real = pyllm.backend.route

    def counting(op, tensor, backend=None):
        calls.append(op)
        return real(op, tensor, backend)

    monkeypatch.setattr(pyllm.backend, "route", counting)
    return calls


@pytest.mark.parametrize("params", ("none", "same", "float32"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 4096), (3, 1000), (2, 5, 17), (0, 9), (300, 333)],
                         ids=str)
@pytest.mark.parametrize("op", OPS)
def test_direct_equals_the_operator(op, shape, dtype, params, routed):
    x, r, w, b = _inputs(op, shape, dtype, params)
    with torch.no_grad(), poisoned_outputs():
        ours = _face(op, x, r, w, b)
    assert routed == [], "the call went through torch.ops"
    for got, want in zip(ours, _operator(op, x, r, w, b)):
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", OPS)
def test_direct_takes_noncontiguous_inputs(op, routed):
    x, r, w, b = _inputs(op, (65, 300), torch.bfloat16, "same", "strided")
    x, w = noncontiguous(x), noncontiguous(w)
    r = r.t().contiguous().t() if r is not None else None
    assert not x.is_contiguous() and not w.is_contiguous()
    with torch.inference_mode():
        ours = _face(op, x, r, w, b)
    assert routed == []
    for got, want in zip(ours, _operator(op, x.contiguous(), r, w, b)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", OPS)
def test_direct_in_grad_mode_when_nothing_requires_grad(op, routed):
    x, r, w, b = _inputs(op, (4, 64), torch.float32, "same")
    out = _face(op, x, r, w, b)
    assert routed == [] and not any(t.requires_grad for t in out)


@pytest.mark.parametrize("op", OPS)
def test_default_eps_and_backend_cpu(op, routed):
    x, r, w, b = _inputs(op, (4, 64), torch.bfloat16, "same")
    with torch.no_grad():
        if "rms" in op:  # eps=None: torch.finfo(x.dtype).eps, as the operator path
            got = _face(op, x, r, w, b, eps=None)
            want = _operator(op, x, r, w, b, eps=torch.finfo(x.dtype).eps)
            assert all(torch.equal(g, t) for g, t in zip(got, want))
        _face(op, x, r, w, b, backend="cpu")
        with pyllm.use_backend("cpu"):
            _face(op, x, r, w, b)
    assert routed == []


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _FunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _routed_ways():
    """Contexts (name, factory) under which a norm must go through torch.ops."""
    return [
        ("requires grad", None),
        ("backend reference", lambda: pyllm.use_backend("reference")),
        ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        ("profiler", lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])),
        ("dispatch mode", _Recording),
        ("function mode", _FunctionMode),
    ]


@pytest.mark.parametrize("name, context", _routed_ways(), ids=[n for n, _ in _routed_ways()])
@pytest.mark.parametrize("op", OPS)
def test_routed_when_something_stands_between(op, name, context, routed):
    x, r, w, b = _inputs(op, (3, 32), torch.float32, "same")
    if context is None:
        w = w.detach().requires_grad_()
        out = _face(op, x, r, w, b)
        assert out[0].requires_grad and out[0].grad_fn is not None
    else:
        with torch.no_grad(), context() as active:
            _face(op, x, r, w, b)
        if isinstance(active, _Recording):
            assert f"pyllm.{op}.default" in active.ops
        if isinstance(active, _FunctionMode):
            assert active.calls > 0
        if isinstance(active, torch.profiler.profile):
            assert any(e.name == f"pyllm::{op}" for e in active.events())
    assert routed == [op]


def test_routed_for_subclasses_and_other_devices(routed):
    x, _, w, b = _inputs("layer_norm", (3, 32), torch.float32, "same")
    with torch.no_grad():
        pyllm.layer_norm(x.to("meta"), w.to("meta"), b.to("meta"))
        pyllm.layer_norm(x.double(), w.double(), b.double())  # the reference's dtype
        pyllm.layer_norm(x, torch.nn.Parameter(w), torch.nn.Parameter(b))  # plain: direct
    assert routed == ["layer_norm", "layer_norm"]


def test_vmap_goes_the_routed_way():
    x, _, w, _ = _inputs("rms_norm", (5, 3, 32), torch.float32, "same")
    with torch.no_grad():
        try:
            got = torch.vmap(lambda t: pyllm.rms_norm(t, w, 1e-6))(x)
        except RuntimeError as e:  # no batching rule: refused, never bypassed
            assert "vmap" in str(e) or "Batching rule" in str(e) or "batch" in str(e).lower()
            return
        assert torch.equal(got, torch.stack([pyllm.rms_norm(t, w, 1e-6) for t in x]))


def test_bad_arguments_get_the_faces_errors():
    x = torch.randn(3, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="pyllm.layer_norm: eps must be a finite"):
            pyllm.layer_norm(x, None, None, float("inf"))
        with pytest.raises(ValueError, match=r"pyllm.rms_norm: weight must have shape \(4,\)"):
            pyllm.rms_norm(x, torch.ones(5))
        with pytest.raises(TypeError, match="pyllm.add_layer_norm: residual must be float32"):
            pyllm.add_layer_norm(x, x.half())
        with pytest.raises(TypeError, match="pyllm.layer_norm: x must be a tensor"):
            pyllm.layer_norm([1.0, 2.0])
        with pytest.raises(TypeError, match="weight and bias must have one dtype"):
            pyllm.layer_norm(x.bfloat16(), torch.ones(4, dtype=torch.bfloat16), torch.ones(4))


def test_nan_and_inf_propagate_as_the_operator():
    x = torch.randn(4, 40)
    x[1, 3], x[2, 7] = float("nan"), float("inf")
    w, b = torch.randn(40), torch.randn(40)
    w[5] = float("nan")
    for op in OPS:
        r = torch.randn(4, 40) if op.startswith("add_") else None
        with torch.no_grad():
            got = _face(op, x, r, w, b)
        for g, want in zip(got, _operator(op, x, r, w, b)):
            assert torch.equal(g.isnan(), want.isnan())
            assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(want))


def test_compiled_calls_stay_in_the_graph():
    """torch.compile traces the routed way (no graph break at the direct call)."""
    w, b = torch.randn(64), torch.randn(64)

    def f(x):
        return pyllm.layer_norm(pyllm.rms_norm(x, w) * 2, w, b)

    x = torch.randn(3, 64)
    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), f(x))


def test_direct_entry_returns_none_for_what_it_does_not_serve():
    from pyllm import _C

    x = torch.randn(2, 8)
    for args in [(x, None, None, None, "1e-5", False),  # eps not a float
                 (x, None, None, torch.ones(8), 1e-5, True),  # a bias for RMSNorm
                 (x, x[:, :4], None, None, 1e-5, False),  # residual of another shape
                 (x.int(), None, None, None, 1e-5, False),
                 (torch.randn(0), None, None, None, 1e-5, False),
                 (x, None, torch.ones(8, dtype=torch.float16), None, 1e-5, False),
                 ([1.0], None, None, None, 1e-5, False)]:
        with torch.no_grad():
            assert _C.norm_direct(*args) is None
    with torch.no_grad():
        assert direct.norm(x, None, None, 1e-5, False, "reference") is None
        assert isinstance(direct.norm(x, None, None, 1e-5, False, None), torch.Tensor)
        assert direct.add_norm(x, None, None, None, 1e-5, True, None) is None


# -- the packed products of pyllm.nn's modules ------------------------------------


def _packed_modules(dtype):
    from pyllm.nn import Attention, Linear, SwiGLU

    torch.manual_seed(5)
    return (Linear(70, 130, activation="silu", dtype=dtype).pack(),
            SwiGLU(70, 150, bias=True, dtype=dtype).pack(),
            Attention(70, 5, 1, head_dim=14, bias=True, dtype=dtype).pack())


@pytest.fixture
def faces(monkeypatch):
    """Counts the packed calls that went through the faces (checks, torch.ops)."""
    import pyllm.nn.attention
    import pyllm.nn.linear

    calls = []
    for module in (pyllm.nn.linear, pyllm.nn.attention):
        for name in ("linear_packed", "swiglu_packed"):
            if hasattr(module, name):
                real = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **k:
                                    calls.append(_n) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_packed_modules_call_the_kernels_directly(dtype, faces):
    x = randn((3, 7, 70), dtype, gen=generator("direct packed", dtype))
    for module in _packed_modules(dtype):
        with torch.no_grad():
            got = module(x)
        faces.clear()
        with torch.no_grad(), _Recording() as mode:  # the dispatcher's way: the operators
            want = module(x)
        assert faces and any("_packed" in op for op in mode.ops)
        assert torch.equal(got, want), type(module).__name__
        with torch.no_grad():
            faces.clear()
            module(x)
            assert faces == [], type(module).__name__


def test_packed_direct_entries_return_none_for_what_they_do_not_serve():
    from pyllm import _C

    linear = _packed_modules(torch.float32)[0]
    packed = linear._pack.packed
    x = torch.randn(2, 70)
    w = linear.weight
    with torch.no_grad():
        assert _C.linear_packed_direct(x, w, None, packed.panels, 130, "silu") is not None
        for args in [(x.bfloat16(), w, None, packed.panels, 130, "none"),  # panels of another dtype
                     (x[:, :69], w, None, packed.panels, 130, "none"),  # another in_features
                     (x, w, None, packed.panels, 200, "none"),  # more out_features than panels
                     (x, w, None, packed.panels, 130, "tanh"),  # no such activation
                     (x, w, torch.ones(3), packed.panels, 130, "none"),  # a bias of 3
                     (x.int(), w, None, packed.panels, 130, "none"),
                     (x, w, None, [1.0], 130, "none")]:
            assert _C.linear_packed_direct(*args) is None, args
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _C.linear_packed_direct(x, w, None, packed.panels, 130, "none") is None
        with _Recording():
            assert _C.linear_packed_direct(x, w, None, packed.panels, 130, "none") is None
    # grad mode: the weight requires grad (the packed op has no backward)
    assert _C.linear_packed_direct(x, w, None, packed.panels, 130, "none") is None
    assert _C.linear_packed_direct(x, w.detach(), None, packed.panels, 130, "none") is not None
    assert _C.linear_packed_direct(x.requires_grad_(), w.detach(), None, packed.panels, 130,
                                   "none") is None


@pytest.mark.parametrize("module", ["RMSNorm", "LayerNorm"])
def test_norm_modules_call_the_kernels_directly(module, routed):
    from pyllm import nn

    norm = getattr(nn, module)(64, 1e-5)
    x, r = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        y, total = norm(x, r)
        alone = norm(x)
    assert routed == []
    want = getattr(pyllm, f"add_{module[:-4].lower()}_norm".replace("rmsnorm", "rms").replace(
        "layernorm", "layer"))
    args = (x, r, norm.weight) if module == "RMSNorm" else (x, r, norm.weight, norm.bias)
    with torch.no_grad(), _Recording():
        expect = want(*args, 1e-5)
    assert torch.equal(y, expect[0]) and torch.equal(total, expect[1])
    assert alone.shape == x.shape
