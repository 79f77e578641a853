"""pyllm.linear / pyllm.swiglu on every backend that serves CPU tensors here,
against the float64 reference under the harness rule (PyTorch's own answer:
F.linear and the activation in the dtype under test), forward and backward,
the blocked and the skinny (M <= 16) paths; op registration; bad input."""

import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import (ISAS, KERNEL_DTYPES, as64, check_compiles_fullgraph, check_rule, generator,
                     grads_of, poisoned_outputs, randn, run_python, run_under_isa)
from pyllm import reference

CPU_BACKENDS = ("cpu", "reference")
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu")
# (rows of x, in_features, out_features): odd sizes, K not a multiple of the
# micro-kernel, the skinny path (M <= 16) and the blocked one.
SHAPES = [(1, 1, 1), (7, 7, 7), (16, 300, 130), (17, 300, 130), (127, 1000, 65), (1000, 127, 257),
          (3, 4096, 64)]


def make(shape, dtype, *key, bias=True):
    m, k, n = shape
    gen = generator("linear", shape, dtype, *key)
    x = randn((m, k), dtype, gen=gen)
    w = randn((n, k), dtype, gen=gen, scale=k ** -0.5)
    b = randn((n,), dtype, gen=gen) if bias else None
    return x, w, b


def pytorch_linear(x, w, b, act):
    return reference.ACTIVATIONS[act](F.linear(x, w, b))


def pytorch_swiglu(x, wg, wu, bg, bu):
    return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(shape, dtype, act, backend):
    x, w, b = make(shape, dtype)
    with poisoned_outputs():
        y = pyllm.linear(x, w, b, act, backend=backend)
    assert y.dtype == dtype and y.shape == (shape[0], shape[2])
    check_rule(y, reference.linear(*as64(x, w, b), act), pytorch_linear(x, w, b, act))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 64, 33), (100, 300, 64)], ids=str)
def test_forward_without_bias_and_float32_bias(shape, dtype):
    x, w, _ = make(shape, dtype, bias=False)
    y = pyllm.linear(x, w, None, "gelu")
    check_rule(y, reference.linear(*as64(x, w), None, "gelu"), pytorch_linear(x, w, None, "gelu"))
    b32 = randn((shape[2],), gen=generator("bias32", shape))
    y = pyllm.linear(x, w, b32, "silu")
    check_rule(y, reference.linear(*as64(x, w, b32), "silu"), pytorch_linear(x, w, b32.to(dtype), "silu"))


@pytest.mark.parametrize("layout", ["3-D x", "strided x", "transposed weight"])
def test_layouts(layout):
    gen = generator("linear layout", layout)
    if layout == "3-D x":
        x = randn((2, 9, 96), gen=gen)
        w = randn((40, 96), gen=gen)
    elif layout == "strided x":
        x = randn((30, 192), gen=gen)[:, ::2]
        w = randn((40, 96), gen=gen)
    else:  # weight stored (in, out) and used as its transpose
        x = randn((30, 96), gen=gen)
        w = randn((96, 40), gen=gen).t()
    b = randn((40,), gen=gen)
    with poisoned_outputs():
        y = pyllm.linear(x, w, b, "gelu_tanh")
    check_rule(y, reference.linear(*as64(x, w, b), "gelu_tanh"), pytorch_linear(x, w, b, "gelu_tanh"))
    grad = randn(y.shape, gen=gen)
    ours = grads_of(lambda *t: pyllm.linear(*t, "gelu_tanh"), (x, w, b), grad)
    exact = grads_of(lambda *t: reference.linear(*t, "gelu_tanh"), as64(x, w, b), grad)
    theirs = grads_of(lambda *t: pytorch_linear(*t, "gelu_tanh"), (x, w, b), grad)
    for g, t, p in zip(ours, exact, theirs):
        check_rule(g, t, p, factor=3)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 7), (16, 300, 130), (127, 1000, 65), (200, 64, 129)],
                         ids=str)
def test_backward(shape, dtype, act, backend):
    x, w, b = make(shape, dtype, "backward")
    grad = randn((shape[0], shape[2]), dtype, gen=generator("linear grad", shape, dtype))
    with poisoned_outputs():
        ours = grads_of(lambda *t: pyllm.linear(*t, act, backend=backend), (x, w, b), grad)
    exact = grads_of(lambda *t: reference.linear(*t, act), as64(x, w, b), grad)
    theirs = grads_of(lambda *t: pytorch_linear(*t, act), (x, w, b), grad)
    for name, g, t, p in zip(("x", "weight", "bias"), ours, exact, theirs):
        assert g.dtype == dtype
        check_rule(g, t, p, factor=3, what=f"grad {name}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 300, 130), (127, 1000, 65)], ids=str)
def test_backward_with_and_without_a_bias_gradient(shape, dtype):
    """Without a bias gradient, dZ = grad_y * act'(z) goes straight to the
    products' dtype (bf16 rounded in the epilogue on AVX512-BF16); with one,
    it stays fp32 for the bias sum and is rounded before the products: the
    same x and weight gradients, bit for bit. Without a bias at all: the rule."""
    x, w, b = make(shape, dtype, "bias grad")
    grad = randn((shape[0], shape[2]), dtype, gen=generator("bias grad g", shape, dtype))
    for act in ("gelu", "silu"):
        with_bias_grad = grads_of(lambda *t: pyllm.linear(*t, act), (x, w, b), grad)
        frozen = b.detach()
        without = grads_of(lambda x_, w_: pyllm.linear(x_, w_, frozen, act), (x, w), grad)
        assert torch.equal(with_bias_grad[0], without[0]) and torch.equal(with_bias_grad[1], without[1])
        with poisoned_outputs():
            ours = grads_of(lambda *t: pyllm.linear(*t, None, act), (x, w), grad)
        exact = grads_of(lambda *t: reference.linear(*t, None, act), as64(x, w), grad)
        theirs = grads_of(lambda *t: pytorch_linear(*t, None, act), (x, w), grad)
        for name, g, t, p in zip(("x", "weight"), ours, exact, theirs):
            check_rule(g, t, p, factor=3, what=f"grad {name} ({act}, no bias)")
    xs, wg, wu, bg, bu = make_swiglu(shape, dtype, "bias grad")
    with_bias_grad = grads_of(lambda *t: pyllm.swiglu(*t), (xs, wg, wu, bg, bu), grad)
    without = grads_of(lambda x_, g_, u_: pyllm.swiglu(x_, g_, u_, bg.detach(), bu.detach()),
                       (xs, wg, wu), grad)
    for a, c in zip(with_bias_grad[:3], without):
        assert torch.equal(a, c)


def make_swiglu(shape, dtype, *key, bias=True):
    m, k, n = shape
    gen = generator("swiglu", shape, dtype, *key)
    x = randn((m, k), dtype, gen=gen)
    wg = randn((n, k), dtype, gen=gen, scale=k ** -0.5)
    wu = randn((n, k), dtype, gen=gen, scale=k ** -0.5)
    bg = randn((n,), dtype, gen=gen) if bias else None
    bu = randn((n,), dtype, gen=gen) if bias else None
    return x, wg, wu, bg, bu


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 7), (16, 300, 130), (127, 256, 344)], ids=str)
def test_swiglu(shape, dtype, bias, backend):
    args = make_swiglu(shape, dtype, bias=bias)
    with poisoned_outputs():
        y = pyllm.swiglu(*args, backend=backend)
    check_rule(y, reference.swiglu(*as64(*args)), pytorch_swiglu(*args))
    grad = randn(y.shape, dtype, gen=generator("swiglu grad", shape, dtype))
    with poisoned_outputs():
        ours = grads_of(lambda *t: pyllm.swiglu(*t, backend=backend), args, grad)
    exact = grads_of(lambda *t: reference.swiglu(*t), as64(*args), grad)
    theirs = grads_of(lambda *t: pytorch_swiglu(*t), args, grad)
    for name, g, t, p in zip(("x", "w_gate", "w_up", "b_gate", "b_up"), ours, exact, theirs):
        if g is not None:
            check_rule(g, t, p, factor=3, what=f"grad {name}")


def test_thread_count_does_not_change_results():
    x, w, b = make((300, 256, 200), torch.float32)
    xs, ws, bs = make((5, 256, 200), torch.float32, "skinny")
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads = grads_of(lambda *t: pyllm.linear(*t, "silu"), (x, w, b), torch.ones(300, 200))
            results.append((pyllm.linear(x, w, b, "gelu"), pyllm.linear(xs, ws, bs, "gelu"), *grads))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def check_skinny_sums_like_blocked(dtypes=KERNEL_DTYPES):
    """On AVX-512 the skinny kernels (2-16 rows: the weight transposed into
    panels, or read in place against x^T for more rows) sum each output in
    the blocked kernel's order: rows 0..M-1 of a 40-row call, bit for bit, at
    every M, for weights whose K ends inside a pair, a 128-byte chunk and a
    256-wide slice, N not a multiple of 16 or 64, a NaN and an Inf weight row,
    every dtype, linear with a bias and activation, and SwiGLU. Returns the
    number of comparisons."""
    gen = generator("skinny order")
    count = 0
    for dtype, (n, k) in itertools.product(dtypes, [(130, 515), (17, 33), (64, 256), (93, 1000)]):
        x = randn((40, k), dtype, gen=gen)
        w, w_up = randn((n, k), dtype, gen=gen), randn((n, k), dtype, gen=gen)
        w[n // 3, k // 2] = float("nan")
        w_up[n - 1, 0] = float("inf")
        b = randn((n,), dtype, gen=gen)
        full = pyllm.linear(x, w, b, "silu", backend="cpu")
        full_swiglu = pyllm.swiglu(x, w, w_up, backend="cpu")
        for m in range(2, 17):
            got = pyllm.linear(x[:m], w, b, "silu", backend="cpu")
            assert torch.equal(got.nan_to_num(7.0), full[:m].nan_to_num(7.0)), (dtype, n, k, m)
            assert torch.equal(got.isnan(), full[:m].isnan()), (dtype, n, k, m)
            got = pyllm.swiglu(x[:m], w, w_up, backend="cpu")
            assert torch.equal(got.nan_to_num(7.0), full_swiglu[:m].nan_to_num(7.0)), (dtype, n, k, m)
            count += 2
    return count


@pytest.mark.parametrize("isa", ("avx512", "avx512_bf16"))
def test_skinny_rows_sum_in_the_blocked_order(isa):
    run_under_isa(isa, """
        from test_linear import check_skinny_sums_like_blocked
        assert check_skinny_sums_like_blocked() == 3 * 4 * 15 * 2
    """)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant (forced in a fresh process) meets the rule."""
    run_under_isa(isa, """
        import torch
        from test_linear import (test_backward, test_backward_with_and_without_a_bias_gradient,
                                 test_forward, test_swiglu)
        for dtype in (torch.float32, torch.bfloat16):
            test_backward_with_and_without_a_bias_gradient((16, 300, 130), dtype)
            for shape in ((16, 300, 130), (127, 1000, 65)):
                for act in ("none", "gelu", "silu"):
                    test_forward(shape, dtype, act, "cpu")
            test_backward((127, 1000, 65), dtype, "gelu_tanh", "cpu")
            test_swiglu((16, 300, 130), dtype, True, "cpu")
            test_swiglu((127, 256, 344), dtype, True, "cpu")
    """)


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx", "vdpbf16ps"])
def test_bf16_gemm_with_and_without_amx(amx):
    """The bf16 blocked GEMM on AMX tiles (where the CPU has them) and on
    vdpbf16ps (PYLLM_CPU_AMX=0), each in a fresh process: edge rows (M not a
    multiple of 16), K tails (odd, under 32, several blocks of 256), partial
    panels, the backward's strided operands, SwiGLU, batch invariance, and
    pre-packed weights."""
    from pyllm import _C

    if amx == "1" and not _C.cpu_amx():
        pytest.skip("this CPU or OS gives no AMX-BF16 tiles (or PYLLM_CPU_AMX=0 is set)")
    result = run_python(textwrap.dedent(f"""
        from pyllm import _C
        assert _C.cpu_amx() == ({amx} == 1), _C.cpu_amx()
        import torch
        from test_linear import test_backward, test_forward, test_swiglu
        import test_batch_invariant as inv
        for shape in ((17, 300, 130), (127, 1000, 65), (40, 70, 31), (33, 129, 513), (1000, 127, 257)):
            for act in ("none", "gelu_tanh"):
                test_forward(shape, torch.bfloat16, act, "cpu")
        for act in ("none", "silu"):
            test_backward((127, 1000, 65), torch.bfloat16, act, "cpu")
        test_swiglu((127, 256, 344), torch.bfloat16, True, "cpu")
        inv.test_linear(torch.bfloat16, "silu")
        inv.test_swiglu(torch.bfloat16)
        from test_packed_linear import check_ops_match_unpacked
        assert check_ops_match_unpacked(dtypes=(torch.bfloat16,)) > 0  # packed panels on tiles
    """), env={"PYLLM_CPU_AMX": amx})
    assert result.returncode == 0, result.stderr[-3000:]


def test_opcheck():
    x, w, b = make((9, 32, 24), torch.float32, "opcheck")
    for args in [(x, w, b, "gelu"), (x, w, None, "none"),
                 (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), "silu")]:
        torch.library.opcheck(torch.ops.pyllm.linear.default, args)
    x, w, b = (t.detach() for t in (x, w, b))
    g = torch.randn(9, 24)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(torch.ops.pyllm.linear_backward.default, (g, x, w, b, "gelu_tanh", mask))
    args = make_swiglu((9, 32, 24), torch.float32, "opcheck")
    torch.library.opcheck(torch.ops.pyllm.swiglu.default, args)
    torch.library.opcheck(torch.ops.pyllm.swiglu.default,
                          tuple(t.requires_grad_() for t in args))
    args = tuple(t.detach() for t in args)
    torch.library.opcheck(torch.ops.pyllm.swiglu_backward.default, (g, *args, [True] * 5))


class _MLP(torch.nn.Module):
    def __init__(self, dim=32, hidden=48):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up2 = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = pyllm.linear(x, self.up.weight, self.up.bias, "gelu")
        h = h + pyllm.swiglu(x, self.gate.weight, self.up2.weight)
        return pyllm.linear(h, self.down.weight, self.down.bias)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    check_compiles_fullgraph(_MLP(), torch.randn(3, 5, 32), {"linear": 2, "swiglu": 1})




def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD = [
    (lambda: pyllm.linear(_t(3, 4), None), TypeError, "weight must be a tensor, got None"),
    (lambda: pyllm.linear(torch.tensor(1.0), _t(2, 1)), ValueError, "x must have at least 1 dimension"),
    (lambda: pyllm.linear(_t(3, 4), _t(2, 5)), ValueError, "weight must have shape (out_features, 4)"),
    (lambda: pyllm.linear(_t(3, 4), _t(2, 4, 1)), ValueError, "weight must have 2 dimension(s)"),
    (lambda: pyllm.linear(_t(3, 4), _t(2, 4).double()), TypeError, "weight must have x's dtype"),
    (lambda: pyllm.linear(_t(3, 4), torch.ones(2, 4, device="meta")), ValueError,
     "weight must be on x's device"),
    (lambda: pyllm.linear(_t(3, 4), _t(2, 4), _t(3)), ValueError, "bias must have shape (2,)"),
    (lambda: pyllm.linear(_t(3, 4, dtype=torch.bfloat16), _t(2, 4, dtype=torch.bfloat16),
                          _t(2, dtype=torch.float16)), TypeError, "bias must be bfloat16, float32"),
    (lambda: pyllm.linear(_t(3, 4), _t(2, 4), None, "relu"), ValueError,
     "activation must be one of none, gelu, gelu_tanh, silu, got 'relu'"),
    (lambda: pyllm.linear(_t(3, 4).long(), _t(2, 4).long()), TypeError, "x must be float16"),
    (lambda: pyllm.linear(_t(3, 4), _t(2, 4), backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (lambda: pyllm.swiglu(_t(3, 4), _t(2, 4), _t(3, 4)), ValueError,
     "weight_up must have 2 rows like weight_gate"),
    (lambda: pyllm.swiglu(_t(3, 4), _t(2, 4), _t(2, 4), _t(2), _t(2).double()), TypeError,
     "bias_up must be float32"),
]


@pytest.mark.parametrize("call, error, words", BAD, ids=[w for _, _, w in BAD])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
    assert "pyllm.linear" in str(info.value) or "pyllm.swiglu" in str(info.value)


def test_direct_op_call_guards_memory():
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, 4\) on cpu"):
        torch.ops.pyllm.linear(_t(3, 4), _t(2, 5), None, "none")
    with pytest.raises(ValueError, match="activation must be none, gelu, gelu_tanh or silu"):
        torch.ops.pyllm.linear(_t(3, 4), _t(2, 4), None, "tanh")
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.pyllm.linear(_t(3, 4), _t(2, 4), _t(3), "none")
    # the SwiGLU kernels read both biases as one type: mixed ones raise (the
    # backward read a bf16 bias as float32 before)
    bf = torch.bfloat16
    x, w, gy = _t(3, 4, dtype=bf), _t(2, 4, dtype=bf), _t(3, 2, dtype=bf)
    for call in (lambda: torch.ops.pyllm.swiglu(x, w, w, _t(2), _t(2, dtype=bf)),
                 lambda: torch.ops.pyllm.swiglu_backward(gy, x, w, w, _t(2), _t(2, dtype=bf),
                                                         [True] * 5)):
        with pytest.raises(TypeError, match="bias_gate and bias_up must have one dtype"):
            call()


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_extreme_preactivations(act, dtype):
    """Pre-activations far into both tails (|z| up to 100): finite, and right,
    forward and backward (sigmoid(-z) must not become inf * 0)."""
    z = torch.linspace(-100, 100, 401).to(dtype)[:, None]
    w = torch.ones(1, 1, dtype=dtype)
    grad = torch.ones(401, 1, dtype=dtype)
    ours = grads_of(lambda x: pyllm.linear(x, w, None, act), (z,), grad)[0]
    y = pyllm.linear(z, w, None, act)
    assert torch.isfinite(y).all() and torch.isfinite(ours).all()
    exact = grads_of(lambda x: reference.linear(x, w.double(), None, act), (z.double(),), grad)[0]
    theirs = grads_of(lambda x: pytorch_linear(x, w, None, act), (z,), grad)[0]
    check_rule(y, reference.linear(z.double(), w.double(), None, act), pytorch_linear(z, w, None, act))
    check_rule(ours, exact, theirs, factor=3)


# -- the CPU training pair: the forward keeps the pre-activation ---------------

@pytest.mark.parametrize("act", ("gelu", "gelu_tanh", "silu"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 7), (17, 300, 130), (127, 1000, 65)], ids=str)
def test_training_forward_keeps_the_preact(shape, dtype, act):
    """On CPU tensors pyllm.linear's autograd keeps x W^T + b (float32) and
    the backward takes it: the output is the no-grad output bit for bit, the
    kept pre-activation is the product, and the gradients are those of the
    op that recomputes it (pyllm::linear_backward), bit for bit."""
    x, w, b = make(shape, dtype, "preact")
    x = torch.cat([x, x], dim=1)[:, ::2]  # strided rows
    y_plain = pyllm.linear(x, w, b, act)
    with poisoned_outputs():
        y_keep, preact = torch.ops.pyllm.linear_with_preact(x, w, b, act)
    assert torch.equal(y_keep, y_plain)
    assert preact.dtype == torch.float32 and preact.shape == y_plain.shape
    check_rule(preact, reference.linear(*as64(x, w, b), "none"),
               pytorch_linear(x.float(), w.float(), b.float(), "none"))
    grad = randn(y_plain.shape, dtype, gen=generator("preact grad", shape, dtype))
    ours = grads_of(lambda *t: pyllm.linear(*t, act), (x, w, b), grad)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        with poisoned_outputs():
            kept = torch.ops.pyllm.linear_backward_from_preact(grad, x, w, b, preact, act, mask)
        recomputed = torch.ops.pyllm.linear_backward(grad, x, w, b, act, mask)
        for wanted, g, r, o in zip(mask, kept, recomputed, ours):
            assert (g is None) == (not wanted) == (r is None)
            if wanted:
                assert torch.equal(g, r) and torch.equal(g, o)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 7), (16, 300, 130), (127, 256, 344)], ids=str)
def test_swiglu_training_forward_keeps_the_preacts(shape, dtype, bias):
    """swiglu's training pair: the output is the no-grad one, gate and up are
    the two products, the gradients those of pyllm::swiglu_backward."""
    args = make_swiglu(shape, dtype, "preact", bias=bias)
    y_plain = pyllm.swiglu(*args)
    with poisoned_outputs():
        y_keep, gate, up = torch.ops.pyllm.swiglu_with_preact(*args)
    assert torch.equal(y_keep, y_plain)
    x, wg, wu, bg, bu = args
    for kept, weight, b in ((gate, wg, bg), (up, wu, bu)):
        assert kept.dtype == torch.float32
        check_rule(kept, reference.linear(*as64(x, weight, b), "none"),
                   pytorch_linear(x.float(), weight.float(), None if b is None else b.float(),
                                  "none"))
    grad = randn(y_plain.shape, dtype, gen=generator("swiglu preact grad", shape, dtype))
    ours = grads_of(lambda *t: pyllm.swiglu(*t), args, grad)
    mask = [True, True, True, bias, bias]
    with poisoned_outputs():
        kept = torch.ops.pyllm.swiglu_backward_from_preact(grad, *args, gate, up, mask)
    recomputed = torch.ops.pyllm.swiglu_backward(grad, *args, mask)
    for g, r, o in zip(kept, recomputed, ours):
        assert (g is None) == (r is None) == (o is None)
        if g is not None:
            assert torch.equal(g, r) and torch.equal(g, o)


def test_training_pair_opcheck_and_bad_preact():
    x, w, b = make((9, 32, 24), torch.float32, "opcheck preact")
    torch.library.opcheck(torch.ops.pyllm.linear_with_preact.default, (x, w, b, "gelu"))
    _, preact = torch.ops.pyllm.linear_with_preact(x, w, b, "gelu")
    g = torch.randn(9, 24)
    torch.library.opcheck(torch.ops.pyllm.linear_backward_from_preact.default,
                          (g, x, w, b, preact, "gelu", [True, True, True]))
    args = make_swiglu((9, 32, 24), torch.float32, "opcheck preact")
    torch.library.opcheck(torch.ops.pyllm.swiglu_with_preact.default, args)
    _, gate, up = torch.ops.pyllm.swiglu_with_preact(*args)
    torch.library.opcheck(torch.ops.pyllm.swiglu_backward_from_preact.default,
                          (g, *args, gate, up, [True] * 5))
    with pytest.raises(ValueError, match="preact must be float32 on the CPU with grad_y's shape"):
        torch.ops.pyllm.linear_backward_from_preact(g, x, w, b, preact[:, :5], "gelu",
                                                    [True, True, True])
    with pytest.raises(ValueError, match="up must be float32 on the CPU with grad_y's shape"):
        torch.ops.pyllm.swiglu_backward_from_preact(g, *args, gate, up.double(), [True] * 5)
    with pytest.raises(RuntimeError, match="derivative for pyllm::linear_with_preact"):
        torch.ops.pyllm.linear_with_preact(x.requires_grad_(), w, b, "gelu")[0].sum().backward()
