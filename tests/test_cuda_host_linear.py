"""The CUDA tensor-core GEMM (csrc/cuda/gemm_kernel.cu: cp.async pipeline,
ldmatrix, mma.sync m16n8k16) run on the host through the CUDA execution model
of tests/cuda_host/, composed the way csrc/cuda/linear.cpp composes it, against
the float64 reference under the harness rule: every epilogue and activation,
forward and backward, fp16 and bf16, edge tiles in m, n and k, both tile
configurations, the SwiGLU two-weight tile, and the element-wise fallback for
k or pointers that are not 16-byte multiples."""

import ctypes

import pytest
import torch

from cuda_host_kernels import DTYPE_CODE, Guarded, check_launch, guarded_input, library, ptr
from harness import as64, check_rule, generator, randn
from pyllm import reference
from test_linear import make, pytorch_linear, pytorch_swiglu

GPU_DTYPES = (torch.float16, torch.bfloat16)
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
EPILOGUES = {"forward": 0, "swiglu": 1, "act_grad": 2, "swiglu_grad": 3}
# (m, k, n): the small tile (m <= 64) and the big one (m > 64), edges in every
# dimension, k a multiple of 8 (cp.async) or not (element loads).
SHAPES = [(1, 8, 1), (7, 40, 17), (64, 72, 130), (130, 88, 72), (65, 37, 9)]


def host_gemm(a, b, *, b2=None, bias=None, bias2=None, grad=None, activation="none",
              epilogue="forward", offset=0):
    """epilogue(a @ b^T) from the host-model kernel: out, or (out, out2) for
    swiglu_grad. a [m, k], b and b2 [n, k]."""
    m, k = a.shape
    n = b.shape[0]
    ga, gb, gb2, ggrad = (guarded_input(t.contiguous() if t is not None else None, offset)
                          for t in (a, b, b2, grad))
    gbias, gbias2 = (guarded_input(t.float() if t is not None else None) for t in (bias, bias2))
    like = torch.empty((m, n), dtype=a.dtype)
    out = Guarded(like, offset=offset)
    out2 = Guarded(like, offset=offset) if epilogue == "swiglu_grad" else None
    code = library().host_gemm(
        ga.ptr, gb.ptr, ptr(gb2), ptr(gbias), ptr(gbias2), ptr(ggrad), out.ptr, ptr(out2),
        *(ctypes.c_int64(v) for v in (m, n, k, k, k, n, n)), DTYPE_CODE[a.dtype],
        ACTIVATIONS[activation], EPILOGUES[epilogue])
    check_launch(code, "gemm")
    for name, g in (("out", out), ("out2", out2), ("a", ga), ("b", gb)):
        if g is not None:
            g.check(name)
    return (out.tensor, out2.tensor) if out2 is not None else out.tensor


# The CUDA operators' composition (csrc/cuda/linear.cpp), on host tensors.
def linear(x, w, b, act, offset=0):
    return host_gemm(x, w, bias=b, activation=act, offset=offset)


def linear_backward(gy, x, w, b, act):
    dz = gy if act == "none" else host_gemm(x, w, bias=b, grad=gy, activation=act,
                                            epilogue="act_grad")
    dx = host_gemm(dz, w.t().contiguous())
    dw = host_gemm(dz.t().contiguous(), x.t().contiguous())
    db = dz.float().sum(0).to(b.dtype) if b is not None else None
    return dx, dw, db


def swiglu(x, wg, wu, bg, bu):
    return host_gemm(x, wg, b2=wu, bias=bg, bias2=bu, epilogue="swiglu")


def swiglu_backward(gy, x, wg, wu, bg, bu):
    dgate, dup = host_gemm(x, wg, b2=wu, bias=bg, bias2=bu, grad=gy, epilogue="swiglu_grad")
    dx = host_gemm(torch.cat([dgate, dup], 1), torch.cat([wg, wu], 0).t().contiguous())
    dwg = host_gemm(dgate.t().contiguous(), x.t().contiguous())
    dwu = host_gemm(dup.t().contiguous(), x.t().contiguous())
    dbg = dgate.float().sum(0).to(bg.dtype) if bg is not None else None
    dbu = dup.float().sum(0).to(bu.dtype) if bu is not None else None
    return dx, dwg, dwu, dbg, dbu


def autograd(fn, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad.to(leaves[0].dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_forward(shape, dtype, act):
    x, w, b = make(shape, dtype, "cuda-host")
    y = linear(x, w, b, act)
    check_rule(y, reference.linear(*as64(x, w, b), act), pytorch_linear(x, w, b, act))


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_linear_forward_without_bias_and_unaligned_pointers(dtype):
    x, w, _ = make((70, 64, 40), dtype, "cuda-host-unaligned", bias=False)
    for offset in (0, 1):  # offset 1: 2-byte aligned pointers, element loads
        y = linear(x, w, None, "gelu", offset=offset)
        check_rule(y, reference.linear(*as64(x, w), None, "gelu"), pytorch_linear(x, w, None, "gelu"))


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 40, 17), (130, 37, 72)], ids=str)
def test_linear_backward(shape, dtype, act):
    x, w, b = make(shape, dtype, "cuda-host-backward")
    gy = randn((shape[0], shape[2]), dtype, gen=generator("cuda-host-gy", shape, dtype))
    ours = linear_backward(gy, x, w, b, act)
    truth = autograd(lambda *t: reference.linear(*t, act), as64(x, w, b), gy)
    theirs = autograd(lambda *t: pytorch_linear(*t, act), (x, w, b), gy)
    for what, g, t, p in zip(("x", "weight", "bias"), ours, truth, theirs):
        check_rule(g, t, p, factor=3, what=f"grad {what}")


def swiglu_inputs(shape, dtype):
    m, k, n = shape
    gen = generator("cuda-host-swiglu", shape, dtype)
    x = randn((m, k), dtype, gen=gen)
    wg, wu = (randn((n, k), dtype, gen=gen, scale=k ** -0.5) for _ in range(2))
    bg, bu = (randn((n,), dtype, gen=gen) for _ in range(2))
    return x, wg, wu, bg, bu


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 8, 1), (7, 40, 17), (130, 88, 72), (65, 37, 9)], ids=str)
def test_swiglu_forward(shape, dtype):
    args = swiglu_inputs(shape, dtype)
    check_rule(swiglu(*args), reference.swiglu(*as64(*args)), pytorch_swiglu(*args))


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 40, 17), (70, 37, 72)], ids=str)
def test_swiglu_backward(shape, dtype):
    args = swiglu_inputs(shape, dtype)
    gy = randn((shape[0], shape[2]), dtype, gen=generator("cuda-host-swiglu-gy", shape, dtype))
    ours = swiglu_backward(gy, *args)
    truth = autograd(reference.swiglu, as64(*args), gy)
    theirs = autograd(pytorch_swiglu, args, gy)
    for what, g, t, p in zip(("x", "weight_gate", "weight_up", "bias_gate", "bias_up"), ours, truth,
                             theirs):
        check_rule(g, t, p, factor=3, what=f"grad {what}")


def test_float32_is_refused_by_the_launcher():
    x = torch.randn(4, 8)
    g = Guarded(x, fill=x)
    out = Guarded(torch.empty(4, 4))
    code = library().host_gemm(g.ptr, g.ptr, ptr(None), ptr(None), ptr(None), ptr(None), out.ptr,
                               ptr(None), *(ctypes.c_int64(v) for v in (4, 4, 8, 8, 8, 4, 4)),
                               DTYPE_CODE[torch.float32], 0, 0)
    assert code != 0
