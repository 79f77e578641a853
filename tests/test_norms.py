"""The norm ops (rms_norm, add_rms_norm, layer_norm, add_layer_norm) on every
backend that serves CPU tensors here, against the float64 reference under the
harness rule, forward and backward; op registration checks; bad input."""

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import (ISAS, as64, check_compiles_fullgraph, grads_of, KERNEL_DTYPES, ODD_SIZES, check_rule, generator, noncontiguous,
                     poisoned_outputs, randn, run_under_isa, transposed)
from pyllm import reference

CPU_BACKENDS = ("cpu", "reference")
OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")
SHAPES = [(rows, n) for rows in (1, 7, 127) for n in ODD_SIZES] + [(2, 3, 1000), (0, 7)]
PARAMS = ("none", "same", "float32")


class Norm:
    """One norm op: how to call pyllm, the reference and PyTorch's own version."""

    def __init__(self, op):
        self.op = op
        self.rms = "rms" in op
        self.fused = op.startswith("add_")

    def inputs(self, shape, dtype, params, *key):
        gen = generator(self.op, shape, dtype, params, *key)
        x = randn(shape, dtype, gen=gen, scale=2.0, offset=0.5)
        r = randn(shape, dtype, gen=gen) if self.fused else None
        w = b = None
        if params != "none":
            ptype = torch.float32 if params == "float32" else dtype
            w = randn(shape[-1:], ptype, gen=gen, offset=1.0)
            b = None if self.rms else randn(shape[-1:], ptype, gen=gen)
        return x, r, w, b

    def pyllm(self, x, r, w, b, eps, backend=None):
        """Outputs as a tuple: (y,) or (y, sum)."""
        fn = getattr(pyllm, self.op)
        args = ((x, r) if self.fused else (x,)) + ((w,) if self.rms else (w, b))
        out = fn(*args, eps, backend=backend)
        return out if self.fused else (out,)

    def reference(self, x, r, w, b, eps):
        args = ((x, r) if self.fused else (x,)) + ((w,) if self.rms else (w, b))
        out = getattr(reference, self.op)(*args, eps)
        return out[:2] if self.fused else out[:1]

    def pytorch(self, x, r, w, b, eps):
        """PyTorch in the dtype under test (parameters cast to it)."""
        cast = (lambda p: p.to(x.dtype) if p is not None else None)
        total = x + r if self.fused else x
        n = x.shape[-1:]
        y = F.rms_norm(total, n, cast(w), eps) if self.rms else \
            F.layer_norm(total, n, cast(w), cast(b), eps)
        return (y, total) if self.fused else (y,)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward(op, shape, dtype, params, backend):
    norm = Norm(op)
    x, r, w, b = norm.inputs(shape, dtype, params)
    eps = 1e-5
    with poisoned_outputs():
        outs = norm.pyllm(x, r, w, b, eps, backend)
    truths = norm.reference(*as64(x, r, w, b), eps)
    theirs = norm.pytorch(x, r, w, b, eps)
    for what, ours, truth, pt in zip(("y", "sum"), outs, truths, theirs):
        assert ours.dtype == dtype and ours.shape == x.shape and ours.is_contiguous()
        check_rule(ours, truth, pt, what=what)


@pytest.mark.parametrize("layout", ("strided", "transposed"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward_noncontiguous(op, dtype, layout):
    norm = Norm(op)
    x, r, w, b = norm.inputs((127, 1000), dtype, "same", layout)
    change = noncontiguous if layout == "strided" else transposed
    x = change(x)
    r = change(r) if r is not None else None
    w, b = noncontiguous(w), (noncontiguous(b) if b is not None else None)
    assert not x.is_contiguous() and not w.is_contiguous()
    with poisoned_outputs():
        outs = norm.pyllm(x, r, w, b, 1e-6)
    for ours, truth, pt in zip(outs, norm.reference(*as64(x, r, w, b), 1e-6),
                               norm.pytorch(x, r, w, b, 1e-6)):
        check_rule(ours, truth, pt)


@pytest.mark.parametrize("op", ("rms_norm", "layer_norm"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_statistics_outputs(op, dtype):
    norm = Norm(op)
    x, _, w, b = norm.inputs((7, 127), dtype, "same")
    with poisoned_outputs():
        if norm.rms:
            _, rstd = torch.ops.pyllm.rms_norm(x, w, 1e-6)
            stats, expected = (rstd,), reference.rms_norm(x.double(), w.double(), 1e-6)[1:]
        else:
            _, mean, rstd = torch.ops.pyllm.layer_norm(x, w, b, 1e-6)
            stats, expected = (mean, rstd), reference.layer_norm(*as64(x, w, b), 1e-6)[1:]
    for got, want in zip(stats, expected):
        assert got.dtype == torch.float32 and got.shape == (7,)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


def test_layer_norm_variance_is_not_cancelled_by_a_large_mean():
    """E[x^2] - E[x]^2 in fp32 loses everything here; the two-pass variance doesn't."""
    gen = generator("cancellation")
    x = randn((4, 4096), gen=gen, offset=1000.0)
    y = pyllm.layer_norm(x, None, None, 1e-5)
    check_rule(y, reference.layer_norm(x.double(), None, None, 1e-5)[0],
               F.layer_norm(x, (4096,), None, None, 1e-5))


def test_default_eps_is_pytorchs():
    x, _, w, _ = Norm("rms_norm").inputs((7, 127), torch.bfloat16, "same")
    x = x * 1e-2  # small enough that eps matters
    y = pyllm.rms_norm(x, w)
    expected = F.rms_norm(x.float(), (127,), w.float()).to(torch.bfloat16)  # eps=None: finfo(x).eps
    check_rule(y, reference.rms_norm(*as64(x, w), torch.finfo(torch.bfloat16).eps)[0], expected)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 127), (127, 1000), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_backward(op, shape, dtype, params, backend):
    norm = Norm(op)
    x, r, w, b = norm.inputs(shape, dtype, params, "backward")
    gen = generator(op, "grads", shape, dtype)
    grads = [randn(shape, dtype, gen=gen) for _ in range(2 if norm.fused else 1)]
    eps = 1e-5
    with poisoned_outputs():
        ours = grads_of(lambda *t: norm.pyllm(*t, eps, backend), (x, r, w, b), grads)
    truth = grads_of(lambda *t: norm.reference(*t, eps), as64(x, r, w, b), grads)
    cast = (lambda p: p.to(dtype) if p is not None else None)
    theirs = grads_of(lambda *t: norm.pytorch(*t, eps), (x, r, cast(w), cast(b)), grads)
    for what, g, t, p, inp in zip(("x", "residual", "weight", "bias"), ours, truth, theirs,
                                  (x, r, w, b)):
        if inp is None:
            continue
        assert g.dtype == inp.dtype, what
        check_rule(g, t, p.to(g.dtype), factor=3, what=f"grad {what}")


@pytest.mark.parametrize("op", OPS)
def test_backward_only_parameters(op):
    """Only the weight (and bias) require grad: grad_x is not computed, and the
    parameter gradients are still right."""
    norm = Norm(op)
    x, r, w, b = norm.inputs((7, 127), torch.float32, "same")
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    sum(o.sum() for o in norm.pyllm(x, r, w, b, 1e-6)).backward()
    w64, b64 = (t.detach().double().requires_grad_() if t is not None else None for t in (w, b))
    sum(o.sum() for o in norm.reference(*as64(x, r), w64, b64, 1e-6)).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    if b is not None:
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_thread_count_does_not_change_results(op):
    norm = Norm(op)
    x, r, w, b = norm.inputs((300, 1000), torch.float32, "same")
    grads = [randn((300, 1000), gen=generator("threads", i)) for i in range(2 if norm.fused else 1)]
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs = norm.pyllm(x, r, w, b, 1e-6, "cpu")
            results.append([*outs, *grads_of(lambda *t: norm.pyllm(*t, 1e-6, "cpu"), (x, r, w, b),
                                             grads)])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert (one is None and two is None) or torch.equal(one, two)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant (forced in a fresh process) meets the rule, forward and
    backward, for every norm op and dtype."""
    run_under_isa(isa, """
        import torch
        from test_norms import OPS, test_backward, test_forward
        for op in OPS:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                test_forward(op, (33, 1000), dtype, "same", "cpu")
                test_forward(op, (5, 7), dtype, "float32", "cpu")
                test_backward(op, (33, 1000), dtype, "same", "cpu")
    """)


# -- registration: opcheck and torch.compile ---------------------------------

def op_args(op, x, r, w, b, eps):
    norm = Norm(op)
    return ((x, r) if norm.fused else (x,)) + ((w,) if norm.rms else (w, b)) + (eps,)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, dtype):
    norm = Norm(op)
    x, r, w, b = norm.inputs((3, 5, 7), dtype, "same", "opcheck")
    overload = getattr(torch.ops.pyllm, op).default
    nograd = lambda t: t.detach() if t is not None else None  # noqa: E731
    grad = lambda t: t.detach().requires_grad_() if t is not None else None  # noqa: E731
    float32 = lambda t: t.float() if t is not None else None  # noqa: E731
    for args in [op_args(op, x, r, w, b, 1e-6), op_args(op, x, r, None, None, 1e-5),
                 op_args(op, grad(x), grad(r), grad(w), grad(b), 1e-6),
                 op_args(op, x, r, float32(w), float32(b), 0.1)]:
        torch.library.opcheck(overload, args)

    # The backward op, from the statistics the forward saved.
    outs = overload(*op_args(op, x, r, w, b, 1e-6))
    normalised = outs[1] if norm.fused else x
    g = randn(x.shape, dtype, gen=generator("opcheck grad", op, dtype))
    if norm.rms:
        rstd = outs[-1]
        masks = [(w, [True, True]), (w, [False, True]), (w, [True, False]), (None, [True, False])]
        for weight, mask in masks:
            for extra in (None, g):
                torch.library.opcheck(torch.ops.pyllm.rms_norm_backward.default,
                                      (nograd(g), normalised, rstd, weight, extra, mask))
    else:
        mean, rstd = outs[-2], outs[-1]
        masks = [(w, [True, True, True]), (w, [False, True, False]), (None, [True, False, True])]
        for weight, mask in masks:
            for extra in (None, g):
                torch.library.opcheck(torch.ops.pyllm.layer_norm_backward.default,
                                      (g, normalised, mean, rstd, weight, extra, mask))


class _Block(torch.nn.Module):
    """A pre-norm residual block using every norm op."""

    def __init__(self, n):
        super().__init__()
        self.proj = torch.nn.Linear(n, n)
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        h = self.proj(pyllm.rms_norm(x, self.weight, 1e-6)).relu()
        y, s = pyllm.add_rms_norm(h, x, self.weight, 1e-6)
        y2, s2 = pyllm.add_layer_norm(self.proj(y), s, self.weight, self.bias)
        return pyllm.layer_norm(s2 + y2, self.weight, self.bias)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    check_compiles_fullgraph(_Block(64), torch.randn(4, 9, 64), {op: 1 for op in OPS})







# -- bad input ----------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# Each class of bad input, as (arguments, error, words of the message), for
# rms_norm; the same cases are replayed on the other ops below.
BAD = [
    (([1.0, 2.0],), {}, TypeError, "x must be a tensor"),
    ((torch.arange(6).view(2, 3),), {}, TypeError, "x must be float16"),
    ((torch.tensor(1.0),), {}, ValueError, "at least 1 dimension"),
    ((_x(3, 0),), {}, ValueError, "non-empty last dimension"),
    ((_x(3, 4), _x(5)), {}, ValueError, "weight must have shape (4,)"),
    ((_x(3, 4), _x(2, 2)), {}, ValueError, "weight must have 1 dimension"),
    ((_x(3, 4, dtype=torch.bfloat16), _x(4, dtype=torch.float16)), {}, TypeError,
     "weight must be bfloat16, float32"),
    ((_x(3, 4), torch.ones(4, device="meta")), {}, ValueError,
     "weight must be on the same device as x"),
    ((_x(3, 4), None, -1.0), {}, ValueError, "eps must be a finite float >= 0"),
    ((_x(3, 4), None, float("nan")), {}, ValueError, "eps must be a finite"),
    ((_x(3, 4), None, torch.tensor(1e-5)), {}, TypeError, "eps must be a float"),
    ((torch.empty(2, 2**31, device="meta"),), {}, ValueError, "32-bit"),
    ((_x(3, 4),), {"backend": "fastest"}, ValueError, "unknown backend 'fastest'"),
    ((_x(3, 4).double(),), {"backend": "cpu"}, TypeError,
     "backend 'cpu' takes bfloat16, float16, float32 inputs, got torch.float64"),
]


def call(op, args, kwargs):
    """Calls ``op`` with rms_norm-shaped ``args`` (x, weight, eps)."""
    x, rest = args[0], list(args[1:])
    weight = rest.pop(0) if rest else None
    eps = rest.pop(0) if rest else None
    norm = Norm(op)
    front = (x, x.clone() if isinstance(x, torch.Tensor) else x) if norm.fused else (x,)
    params = (weight,) if norm.rms else (weight, None)
    if eps is None and not norm.rms:
        eps = 1e-5
    return getattr(pyllm, op)(*front, *params, eps, **kwargs)


@pytest.mark.parametrize("args, kwargs, error, words", BAD,
                         ids=[words for *_, words in BAD])
@pytest.mark.parametrize("op", OPS)
def test_bad_input(op, args, kwargs, error, words):
    with pytest.raises(error) as info:
        call(op, args, kwargs)
    assert words in str(info.value)
    assert f"pyllm.{op}" in str(info.value)


@pytest.mark.parametrize("op", ("add_rms_norm", "add_layer_norm"))
def test_bad_residual(op):
    fn = getattr(pyllm, op)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(3, 4\), got \(3, 5\)"):
        fn(_x(3, 4), _x(3, 5))
    with pytest.raises(TypeError, match="residual must be float32, got torch.bfloat16"):
        fn(_x(3, 4), _x(3, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="residual must be a tensor, got None"):
        fn(_x(3, 4), None)


def test_layer_norm_weight_and_bias_share_a_dtype():
    with pytest.raises(TypeError, match="weight and bias must have one dtype"):
        pyllm.layer_norm(_x(3, 4, dtype=torch.bfloat16), _x(4, dtype=torch.bfloat16), _x(4))


def test_direct_op_call_guards_memory():
    """torch.ops.pyllm.* skip the Python checks; the kernels still refuse shapes
    that would make them read out of bounds."""
    with pytest.raises(ValueError, match="weight and bias must have shape"):
        torch.ops.pyllm.rms_norm(_x(3, 4), _x(3), 1e-6)
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        torch.ops.pyllm.layer_norm(_x(3, 4).double(), None, None, 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        torch.ops.pyllm.add_rms_norm(_x(3, 4), _x(4, 3), None, 1e-6)
    with pytest.raises(ValueError, match="one value per row"):
        torch.ops.pyllm.rms_norm_backward(_x(3, 4), _x(3, 4), torch.ones(2), None, None,
                                          [True, False])


@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_a_clear_error(op):
    norm = Norm(op)
    x, r, w, b = norm.inputs((3, 4), torch.float32, "same")
    x.requires_grad_()
    (gx,) = torch.autograd.grad(norm.pyllm(x, r, w, b, 1e-5)[0].sum(), x, create_graph=True)
    backward_op = "rms_norm_backward" if norm.rms else "layer_norm_backward"
    with pytest.raises(RuntimeError, match=f"derivative for pyllm::{backward_op} is not implemented"):
        gx.sum().backward()
