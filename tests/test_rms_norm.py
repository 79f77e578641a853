"""pyllm.rms_norm / pyllm::rms_norm on every backend that serves CPU tensors here,
against the float64 reference under the harness rule; op registration checks;
bad input."""

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import (KERNEL_DTYPES, ODD_SIZES, check_rule, generator, noncontiguous,
                     poisoned_outputs, randn, run_python, transposed)
from pyllm import reference

CPU_BACKENDS = ("cpu", "reference")
SHAPES = [(rows, n) for rows in (1, 7, 127) for n in ODD_SIZES] + [(2, 3, 1000), (0, 7)]
WEIGHTS = ("none", "same", "float32")


def make_case(shape, dtype, weight_kind, *key):
    gen = generator("rms_norm", shape, dtype, weight_kind, *key)
    x = randn(shape, dtype, gen=gen, scale=2.0, offset=0.5)
    if weight_kind == "none":
        w = None
    else:
        w = randn(shape[-1:], torch.float32 if weight_kind == "float32" else dtype, gen=gen,
                  offset=1.0)
    return x, w


def pytorch_forward(x, w, eps):
    """PyTorch's own answer in the dtype under test."""
    return F.rms_norm(x, x.shape[-1:], w.to(x.dtype) if w is not None else None, eps)


def truth(x, w, eps):
    return reference.rms_norm(x.double(), w.double() if w is not None else None, eps)[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(shape, dtype, weight_kind, backend):
    x, w = make_case(shape, dtype, weight_kind)
    eps = 1e-5
    with poisoned_outputs():
        y = pyllm.rms_norm(x, w, eps, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    check_rule(y, truth(x, w, eps), pytorch_forward(x, w, eps))


@pytest.mark.parametrize("layout", ("strided", "transposed"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_forward_noncontiguous(dtype, layout):
    x, w = make_case((127, 1000), dtype, "same", layout)
    x = noncontiguous(x) if layout == "strided" else transposed(x)
    w = noncontiguous(w)
    assert not x.is_contiguous() and not w.is_contiguous()
    with poisoned_outputs():
        y = pyllm.rms_norm(x, w, 1e-6)
    check_rule(y, truth(x, w, 1e-6), pytorch_forward(x, w, 1e-6))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_rstd_output(dtype):
    x, w = make_case((7, 127), dtype, "same")
    with poisoned_outputs():
        _, rstd = torch.ops.pyllm.rms_norm(x, w, 1e-6)
    assert rstd.dtype == torch.float32 and rstd.shape == (7,)
    expected = reference.rms_norm(x.double(), w.double(), 1e-6)[1]
    torch.testing.assert_close(rstd.double(), expected, rtol=1e-5, atol=0)


def test_default_eps_is_pytorchs():
    x, w = make_case((7, 127), torch.bfloat16, "same")
    x = x * 1e-2  # small enough that eps matters
    y = pyllm.rms_norm(x, w)
    expected = F.rms_norm(x.float(), (127,), w.float()).to(torch.bfloat16)  # eps=None: finfo(x).eps
    check_rule(y, truth(x, w, torch.finfo(torch.bfloat16).eps), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 127), (127, 1000), (3, 5, 7)], ids=str)
def test_backward(shape, dtype, weight_kind, backend):
    x, w = make_case(shape, dtype, weight_kind, "backward")
    grad = randn(shape, dtype, gen=generator("rms_norm grad", shape, dtype))
    eps = 1e-5

    def grads(fn, x, w):
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_() if w is not None else None
        fn(x, w).backward(grad.to(x.dtype))
        return x.grad, (w.grad if w is not None else None)

    with poisoned_outputs():
        gx, gw = grads(lambda x, w: pyllm.rms_norm(x, w, eps, backend=backend), x, w)
    tx, tw = grads(lambda x, w: reference.rms_norm(x, w, eps)[0], x.double(),
                   w.double() if w is not None else None)
    px, pw = grads(lambda x, w: pytorch_forward(x, w, eps), x, w.to(dtype) if w is not None else None)
    check_rule(gx, tx, px, factor=3, what="grad x")
    if w is not None:
        assert gw.dtype == w.dtype
        check_rule(gw, tw, pw.to(w.dtype), factor=3, what="grad weight")


def test_backward_only_weight():
    x, w = make_case((7, 127), torch.float32, "same")
    w.requires_grad_()
    pyllm.rms_norm(x, w).sum().backward()
    w2 = w.detach().double().requires_grad_()
    reference.rms_norm(x.double(), w2, torch.finfo(torch.float32).eps)[0].sum().backward()
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-4, atol=1e-4)


def test_thread_count_does_not_change_results():
    x, w = make_case((300, 1000), torch.float32, "same")
    grad = randn((300, 1000), gen=generator("threads"))
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = pyllm.rms_norm(xi, wi, 1e-6, backend="cpu")
            y.backward(grad)
            results.append((y, xi.grad, wi.grad))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ("generic", "avx2", "avx512"))
def test_every_cpu_isa_path(isa):
    """Each ISA variant (forced with PYLLM_CPU_ISA in a fresh process) meets the rule."""
    code = f"""
import torch, torch.nn.functional as F, pyllm, sys
sys.path.insert(0, "tests")
from harness import check_rule, generator, randn
from pyllm import _C, reference
print(_C.cpu_isa())
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    gen = generator("isa", dtype)
    x = randn((33, 1000), dtype, gen=gen, offset=0.5)
    w = randn((1000,), dtype, gen=gen, offset=1.0)
    g = randn((33, 1000), dtype, gen=gen)
    xr = x.clone().requires_grad_(); wr = w.clone().requires_grad_()
    y = pyllm.rms_norm(xr, wr, 1e-6, backend="cpu"); y.backward(g)
    x64 = x.double().requires_grad_(); w64 = w.double().requires_grad_()
    t = reference.rms_norm(x64, w64, 1e-6)[0]; t.backward(g.double())
    xp = x.clone().requires_grad_(); wp = w.clone().requires_grad_()
    p = F.rms_norm(xp, (1000,), wp, 1e-6); p.backward(g)
    check_rule(y, t, p)
    check_rule(xr.grad, x64.grad, xp.grad, factor=3)
    check_rule(wr.grad, w64.grad, wp.grad, factor=3)
"""
    result = run_python(code, env={"PYLLM_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = result.stdout.split()[0]
    order = ["generic", "avx2", "avx512", "avx512_bf16"]
    assert order.index(chosen) <= order.index(isa)
    assert chosen == isa or order.index(pyllm._C.cpu_isa_detected()) < order.index(isa)


# -- registration: opcheck and torch.compile ---------------------------------

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_opcheck(dtype):
    gen = generator("opcheck", dtype)
    x = randn((3, 5, 7), dtype, gen=gen)
    w = randn((7,), dtype, gen=gen)
    for args in [(x, w, 1e-6), (x, None, 1e-5), (x.requires_grad_(), w.requires_grad_(), 1e-6),
                 (x.detach(), w.detach().float(), 0.1)]:
        torch.library.opcheck(torch.ops.pyllm.rms_norm.default, args)
    x, w = x.detach(), w.detach()
    y, rstd = torch.ops.pyllm.rms_norm(x, w, 1e-6)
    g = randn(y.shape, dtype, gen=gen)
    for weight, mask in [(w, [True, True]), (w, [False, True]), (w, [True, False]),
                         (None, [True, False])]:
        torch.library.opcheck(torch.ops.pyllm.rms_norm_backward.default, (g, x, rstd, weight, mask))


class _NormMLP(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.proj = torch.nn.Linear(n, n)
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return self.proj(pyllm.rms_norm(x, self.weight, 1e-6)).relu()


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = _NormMLP(64)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    x = torch.randn(4, 9, 64, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.pyllm.rms_norm.default) == 1
    x2 = x.detach().clone().requires_grad_()
    ref = model(x2)
    torch.testing.assert_close(out, ref)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_torch_compile_inductor():
    torch.manual_seed(0)
    model = _NormMLP(64)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 64)
    torch.testing.assert_close(compiled(x), model(x))


# -- bad input ----------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call, error, words", [
    (lambda: pyllm.rms_norm([1.0, 2.0]), TypeError, "x must be a tensor"),
    (lambda: pyllm.rms_norm(torch.arange(6).view(2, 3)), TypeError, "x must be float16"),
    (lambda: pyllm.rms_norm(torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    (lambda: pyllm.rms_norm(_x(3, 0)), ValueError, "non-empty last dimension"),
    (lambda: pyllm.rms_norm(_x(3, 4), _x(5)), ValueError, "weight must have shape (4,)"),
    (lambda: pyllm.rms_norm(_x(3, 4), _x(2, 2)), ValueError, "weight must have 1 dimension"),
    (lambda: pyllm.rms_norm(_x(3, 4, dtype=torch.bfloat16), _x(4, dtype=torch.float16)),
     TypeError, "weight must be bfloat16, float32"),
    (lambda: pyllm.rms_norm(_x(3, 4), torch.ones(4, device="meta")), ValueError,
     "weight must be on the same device as x"),
    (lambda: pyllm.rms_norm(_x(3, 4), None, -1.0), ValueError, "eps must be a finite float >= 0"),
    (lambda: pyllm.rms_norm(_x(3, 4), None, float("nan")), ValueError, "eps must be a finite"),
    (lambda: pyllm.rms_norm(_x(3, 4), None, torch.tensor(1e-5)), TypeError, "eps must be a float"),
    (lambda: pyllm.rms_norm(torch.empty(2, 2**31, device="meta")), ValueError, "32-bit"),
    (lambda: pyllm.rms_norm(_x(3, 4), backend="fastest"), ValueError, "unknown backend 'fastest'"),
    (lambda: pyllm.rms_norm(_x(3, 4).double(), backend="cpu"), TypeError,
     "backend 'cpu' takes bfloat16, float16, float32 inputs, got torch.float64"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
    assert "pyllm.rms_norm" in str(info.value)


def test_direct_op_call_guards_memory():
    """torch.ops.pyllm.rms_norm skips the Python checks; the kernel still refuses
    shapes that would make it read out of bounds."""
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.pyllm.rms_norm(_x(3, 4), _x(3), 1e-6)
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        torch.ops.pyllm.rms_norm(_x(3, 4).double(), None, 1e-6)
    with pytest.raises(ValueError, match="rstd must be float32 with one value per row"):
        torch.ops.pyllm.rms_norm_backward(_x(3, 4), _x(3, 4), torch.ones(2), None, [True, False])


def test_double_backward_is_a_clear_error():
    x = _x(3, 4).requires_grad_()
    (gx,) = torch.autograd.grad(pyllm.rms_norm(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for pyllm::rms_norm_backward is not implemented"):
        gx.sum().backward()
