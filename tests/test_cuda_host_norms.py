"""The CUDA norm kernels (csrc/cuda/norm_kernel.cu) run on the host through
the CUDA execution model of tests/cuda_host/, called the way
csrc/cuda/norms.cpp calls them, against the float64 reference under the
harness rule: LayerNorm/RMSNorm with and without the fused residual, forward
and backward, every dtype, warp-per-row and CTA-per-row layouts, vectorised
and unaligned (scalar) paths, guard regions around every buffer."""

import ctypes

import pytest
import torch

from cuda_host_kernels import DTYPE_CODE, Guarded, check_launch, guarded_input, library, ptr
from harness import KERNEL_DTYPES, as64, check_rule, generator, grads_of, randn
from test_norms import Norm

OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")
# (7, 127): a warp per row, scalar; (127, 1000): a warp per row, vectorised
# (and a chunk with no rows in the backward); (3, 4104): a CTA per row.
SHAPES = [(1, 1), (7, 127), (127, 1000), (3, 4104)]


def param_code(x, w, b):
    p = w if w is not None else b
    return DTYPE_CODE[torch.float32 if p is not None and p.dtype == torch.float32 else x.dtype]


def host_forward(norm, x, r, w, b, eps, offset=0):
    """(y, sum or None, mean or None, rstd), as the CUDA operator computes them."""
    n = x.shape[-1]
    rows = x.numel() // n
    gx, gr, gw, gb = (guarded_input(t, offset) for t in (x, r, w, b))
    y = Guarded(x, offset=offset)
    s = Guarded(x, offset=offset) if r is not None else None
    stats = torch.empty(x.shape[:-1], dtype=torch.float32)
    mean = None if norm.rms else Guarded(stats)
    rstd = Guarded(stats)
    code = library().host_norm_forward(
        gx.ptr, ptr(gr), ptr(gw), ptr(gb), y.ptr, ptr(s), ptr(mean), rstd.ptr,
        ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_float(eps), DTYPE_CODE[x.dtype],
        param_code(x, w, b), int(norm.rms))
    check_launch(code, "norm forward")
    for name, g in (("y", y), ("sum", s), ("mean", mean), ("rstd", rstd), ("x", gx)):
        if g is not None:
            g.check(name)
    return (y.tensor, s.tensor if s else None, mean.tensor if mean else None, rstd.tensor)


def host_backward(norm, grad_y, x, mean, rstd, w, grad_sum, want_bias):
    """(grad_x, grad_weight or None, grad_bias or None) from the CUDA kernels."""
    lib = library()
    n = x.shape[-1]
    rows = x.numel() // n
    chunks = lib.host_norm_backward_chunks(ctypes.c_int64(rows), ctypes.c_int64(n))
    gg, gx, gw, gs = (guarded_input(t) for t in (grad_y, x, w, grad_sum))
    gmean, grstd = guarded_input(mean), guarded_input(rstd)
    dx = Guarded(x)
    partial = torch.empty(chunks, n)
    pw = Guarded(partial) if w is not None else None
    pb = Guarded(partial) if want_bias else None
    code = lib.host_norm_backward(gg.ptr, gx.ptr, ptr(gmean), grstd.ptr, ptr(gw), ptr(gs), dx.ptr,
                                  ptr(pw), ptr(pb), ctypes.c_int64(rows), ctypes.c_int64(n),
                                  DTYPE_CODE[x.dtype], param_code(x, w, None), int(norm.rms))
    check_launch(code, "norm backward")
    totals = []
    for name, p in (("partial weight", pw), ("partial bias", pb)):
        if p is None:
            totals.append(None)
            continue
        p.check(name)
        total = Guarded(torch.empty(n))
        check_launch(lib.host_column_sum(p.ptr, ctypes.c_int64(chunks), ctypes.c_int64(n),
                                         total.ptr), "column sum")
        total.check(name + " total")
        ptype = w.dtype if w is not None else x.dtype
        totals.append(total.tensor.to(ptype))
    dx.check("grad_x")
    return dx.tensor, totals[0], totals[1]


def cases():
    for op in OPS:
        for dtype in KERNEL_DTYPES:
            for shape in SHAPES:
                for params in (("none", "same", "float32") if shape == (127, 1000) else ("same",)):
                    yield op, shape, dtype, params


@pytest.mark.parametrize("op, shape, dtype, params", list(cases()), ids=str)
def test_forward(op, shape, dtype, params):
    norm = Norm(op)
    x, r, w, b = norm.inputs(shape, dtype, params, "cuda-host")
    eps = 1e-5
    y, s, mean, rstd = host_forward(norm, x, r, w, b, eps)
    truths = norm.reference(*as64(x, r, w, b), eps)
    theirs = norm.pytorch(x, r, w, b, eps)
    check_rule(y, truths[0], theirs[0], what="y")
    if norm.fused:
        check_rule(s, truths[1], theirs[1], what="sum")
    assert not torch.isnan(rstd).any()


@pytest.mark.parametrize("offset", (1, 3))
@pytest.mark.parametrize("op", ("add_rms_norm", "add_layer_norm"))
def test_forward_unaligned_pointers_take_the_scalar_path(op, offset):
    norm = Norm(op)
    x, r, w, b = norm.inputs((5, 1000), torch.bfloat16, "same", "unaligned")
    y, s, _, _ = host_forward(norm, x, r, w, b, 1e-5, offset=offset)
    truths = norm.reference(*as64(x, r, w, b), 1e-5)
    theirs = norm.pytorch(x, r, w, b, 1e-5)
    check_rule(y, truths[0], theirs[0], what="y")
    check_rule(s, truths[1], theirs[1], what="sum")


@pytest.mark.parametrize("op, shape, dtype, params", list(cases()), ids=str)
def test_backward(op, shape, dtype, params):
    norm = Norm(op)
    x, r, w, b = norm.inputs(shape, dtype, params, "cuda-host-backward")
    gen = generator(op, "cuda-host-grads", shape, dtype)
    grads = [randn(shape, dtype, gen=gen) for _ in range(2 if norm.fused else 1)]
    eps = 1e-5
    _, s, mean, rstd = host_forward(norm, x, r, w, b, eps)
    normalised = s if norm.fused else x
    dx, dw, db = host_backward(norm, grads[0], normalised, mean, rstd, w,
                               grads[1] if norm.fused else None, want_bias=b is not None)
    truth = grads_of(lambda *t: norm.reference(*t, eps), as64(x, r, w, b), grads)
    cast = (lambda p: p.to(dtype) if p is not None else None)
    theirs = grads_of(lambda *t: norm.pytorch(*t, eps), (x, r, cast(w), cast(b)), grads)
    ours = (dx, dx if norm.fused else None, dw, db)
    for what, g, t, p in zip(("x", "residual", "weight", "bias"), ours, truth, theirs):
        if t is None:
            continue
        check_rule(g, t, p.to(g.dtype), factor=3, what=f"grad {what}")


def test_backward_is_deterministic():
    norm = Norm("layer_norm")
    x, _, w, b = norm.inputs((127, 1000), torch.float32, "same", "determinism")
    g = randn((127, 1000), gen=generator("determinism-grad"))
    _, _, mean, rstd = host_forward(norm, x, None, w, b, 1e-5)
    first = host_backward(norm, g, x, mean, rstd, w, None, True)
    second = host_backward(norm, g, x, mean, rstd, w, None, True)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)
