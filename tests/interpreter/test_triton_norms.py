"""The Triton norm kernels (kernels/norm.py) on CPU tensors in the Triton
interpreter, against the float64 reference under the harness rule, forward and
backward (collected only with TRITON_INTERPRET=1; tests/test_triton_interpreter.py
runs them).

bf16 is not interpreted: the interpreter computes bf16 arithmetic on raw bits
(an upstream bug), so bf16 is proven by compilation (tests/test_triton_compile.py).
"""

import pytest
import torch

import pyllm
from harness import as64, check_rule, generator, grads_of, noncontiguous, poisoned_outputs, randn
from test_norms import OPS, Norm

INTERPRETED_DTYPES = (torch.float32, torch.float16)
# Odd sizes, and a row longer than one register block (streamed in blocks).
SHAPES = [(1, 1), (7, 7), (3, 1000), (2, 20000)]


def test_triton_serves_cpu_tensors_here():
    for op in OPS:
        assert pyllm.backend.op_table()[op]["triton"].startswith("cpu")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward_and_backward(op, shape, dtype):
    norm = Norm(op)
    x, r, w, b = norm.inputs(shape, dtype, "same", "triton")
    eps = 1e-5
    with poisoned_outputs():
        outs = norm.pyllm(x, r, w, b, eps, "triton")
    for ours, truth, pt in zip(outs, norm.reference(*as64(x, r, w, b), eps),
                               norm.pytorch(x, r, w, b, eps)):
        check_rule(ours, truth, pt)
    gen = generator("triton grads", op, shape, dtype)
    grads = [randn(shape, dtype, gen=gen) for _ in range(2 if norm.fused else 1)]
    with poisoned_outputs():
        ours = grads_of(lambda *t: norm.pyllm(*t, eps, "triton"), (x, r, w, b), grads)
    exact = grads_of(lambda *t: norm.reference(*t, eps), as64(x, r, w, b), grads)
    theirs = grads_of(lambda *t: norm.pytorch(*t, eps), (x, r, w, b), grads)
    for name, g, t, p in zip(("x", "residual", "weight", "bias"), ours, exact, theirs):
        if g is not None:
            check_rule(g, t, p.to(g.dtype), factor=3, what=f"grad {name}")


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm"])
def test_noncontiguous_and_float32_parameters(op):
    norm = Norm(op)
    x, r, w, b = norm.inputs((5, 300), torch.float16, "float32", "strided")
    x = noncontiguous(x)
    with poisoned_outputs():
        outs = norm.pyllm(x, r, w, b, 1e-6, "triton")
    for ours, truth, pt in zip(outs, norm.reference(*as64(x, r, w, b), 1e-6),
                               norm.pytorch(x, r, w, b, 1e-6)):
        check_rule(ours, truth, pt)
