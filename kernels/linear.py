"""GEMM with fused epilogues in Triton: ``act(x @ W^T + b)``, the SwiGLU gate,
and their backward through the same kernel.

One kernel computes C = A @ B for operands given by their strides (x @ W^T,
dz @ W and dz^T @ x alike), in BLOCK_M x BLOCK_N tiles over BLOCK_K steps
with fp32 accumulation (fp16/bf16 on tensor cores; fp32 inputs in IEEE fp32),
programs ordered in groups of GROUP_M rows of tiles so that neighbouring
programs share B in L2 (Triton tutorial 03). The epilogue runs on the
accumulator before the store: bias and activation; the SwiGLU gate from a
second product over the same A tile; the activation's derivative times the
incoming gradient (the backward's dz); or accumulation into an fp32 output.
Tile configurations are autotuned per (M bucket, N, K).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pyllm.backend import triton_interpreting
from pyllm.invariance import is_batch_invariant
from pyllm.kernels.launch import on_device, register, shipped_config_index

ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}

# Epilogues
STORE, SWIGLU, GRAD_ACT, GRAD_SWIGLU, ACCUMULATE = 0, 1, 2, 3, 4


def _config(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


#: The shipped configurations (each compiles for sm_80 and sm_90 in fp16 and
#: bf16 within shared memory and without spills, with every epilogue:
#: tests/test_triton_compile.py; 128 x 256 tiles and 128 x 128 on 4 warps spill
#: once an activation's epilogue joins the accumulator, and were removed).
CONFIGS = [
    _config(128, 128, 64, 8, 3),  # 128 x 128 x 32 in 4 stages spilled on Triton 3.7
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
    _config(32, 64, 32, 2, 5),
    _config(16, 64, 64, 2, 4),  # decode-sized M
]
#: Two products per tile (SwiGLU): two accumulators, so smaller tiles.
CONFIGS_TWO = [
    _config(128, 64, 32, 8, 4),
    _config(64, 128, 32, 8, 3),
    _config(64, 64, 32, 4, 4),
    _config(32, 64, 32, 2, 4),
    _config(16, 64, 64, 2, 3),
]
#: Batch-invariant mode's tile (pyllm.batch_invariant()): one for every M, the
#: 64 x 64 x 32 of each list.
INVARIANT_CONFIG = 3
INVARIANT_CONFIG_TWO = 2
#: The Triton interpreter runs every candidate when autotuning: one small tile there.
INTERPRETER_CONFIGS = [_config(16, 32, 16, 1, 1, group=2)]


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:  # gelu (erf)
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh): z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * tl.sigmoid(2.0 * u)
    elif ACT == 3:  # silu, as z / (1 + e^-z): one rounding fewer than z * sigmoid(z)
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _activate_derivative(z, ACT: tl.constexpr):
    if ACT == 1:  # Phi(z) + z phi(z)
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + \
            z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:  # s + 2 z s (1 - s) u'(z), s = sigmoid(2u)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = s + 2.0 * z * s * (1.0 - s) * du
    elif ACT == 3:  # s (1 + z (1 - s))
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _matmul_kernel(A, B, B2, BIAS, BIAS2, C, C2, GY, M, N, K, M_BUCKET,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   stride_gm, stride_gn, ACT: tl.constexpr, EPILOGUE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    TWO: tl.constexpr = EPILOGUE == 1 or EPILOGUE == 3
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M rows of tiles go column by column together.
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    # 64-bit offsets only in the tiles' scalar base pointers; in-tile offsets
    # are 32-bit (a 2-D tensor of 64-bit offsets costs two registers per
    # element and made every configuration spill).
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = lm < M - m0
    n_ok = ln < N - n0
    a_ptrs = (A + m0 * stride_am) + lm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = (B + n0 * stride_bn) + rk[:, None] * stride_bk + ln[None, :] * stride_bn
    if TWO:
        b2_ptrs = (B2 + n0 * stride_bn) + rk[:, None] * stride_bk + ln[None, :] * stride_bn
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & (rk[None, :] < k_left), other=0.0)
        b_mask = (rk[:, None] < k_left) & n_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if TWO:
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
            if a.dtype == tl.float32:
                acc2 = tl.dot(a, b2.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(a, b2, acc2)
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = (C + m0 * stride_cm + n0 * stride_cn) + lm[:, None] * stride_cm + ln[None, :] * stride_cn
    if EPILOGUE == 4:  # accumulate into an fp32 output
        tl.store(c_ptrs, tl.load(c_ptrs, mask=mask, other=0.0) + acc, mask=mask)
    else:
        z = acc
        if HAS_BIAS:
            z += tl.load(BIAS + n0 + ln, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if TWO:
            up = acc2
            if HAS_BIAS:
                up += tl.load(BIAS2 + n0 + ln, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 2 or EPILOGUE == 3:
            g_ptrs = (GY + m0 * stride_gm + n0 * stride_gn) + lm[:, None] * stride_gm + \
                ln[None, :] * stride_gn
            gy = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        if EPILOGUE == 0:
            out = _activate(z, ACT)
        elif EPILOGUE == 1:
            out = _activate(z, 3) * up
        elif EPILOGUE == 2:
            out = gy * _activate_derivative(z, ACT)
        else:  # GRAD_SWIGLU: d gate into C, d up into C2
            out = gy * up * _activate_derivative(z, 3)
            c2_ptrs = (C2 + m0 * stride_cm + n0 * stride_cn) + lm[:, None] * stride_cm + \
                ln[None, :] * stride_cn
            tl.store(c2_ptrs, (gy * _activate(z, 3)).to(C2.dtype.element_ty), mask=mask)
        tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=mask)


def _tuned(configs):
    configs = INTERPRETER_CONFIGS if triton_interpreting() else configs
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"],
                           reset_to_zero=None)(_matmul_kernel)


matmul_kernel = _tuned(CONFIGS)
matmul_two_kernel = _tuned(CONFIGS_TWO)
# The accumulating epilogue reads C: autotuning it would add every trial run's
# product, so it runs untuned, on one configuration.
ACCUMULATE_CONFIG = INTERPRETER_CONFIGS[0] if triton_interpreting() else CONFIGS[3]
matmul_accumulate_kernel = triton.heuristics({
    name: (lambda args, v=value: v) for name, value in ACCUMULATE_CONFIG.kwargs.items()
})(_matmul_kernel)


@functools.lru_cache(maxsize=None)
def _fixed(two: bool, index: int):
    """_matmul_kernel launched with one shipped configuration, untuned."""
    config = (CONFIGS_TWO if two else CONFIGS)[index]
    return triton.heuristics({name: (lambda args, v=value: v)
                              for name, value in config.kwargs.items()})(_matmul_kernel)


def matmul(a, b, out, *, b2=None, bias=None, bias2=None, activation="none", epilogue=STORE,
           out2=None, grad=None):
    """out (M x N) <- epilogue(a (M x K) @ b (K x N)); any strides."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    # The biases are read with unit steps.
    bias, bias2 = (t.contiguous() if t is not None else None for t in (bias, bias2))
    grad_strides = (grad.stride(0), grad.stride(1)) if grad is not None else (0, 0)
    args = (a, b, b2 if b2 is not None else b, bias if bias is not None else out,
            bias2 if bias2 is not None else out, out, out2 if out2 is not None else out,
            grad if grad is not None else out, M, N, K, triton.next_power_of_2(min(M, 4096)),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            *grad_strides)
    flags = dict(ACT=ACTIVATION_CODES[activation], EPILOGUE=epilogue, HAS_BIAS=bias is not None)
    with on_device(a):
        if epilogue == ACCUMULATE:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
            matmul_accumulate_kernel[grid](*args, **flags, num_warps=ACCUMULATE_CONFIG.num_warps,
                                           num_stages=ACCUMULATE_CONFIG.num_stages)
        else:
            two = epilogue in (SWIGLU, GRAD_SWIGLU)
            kernel = matmul_two_kernel if two else matmul_kernel
            shipped = shipped_config_index()
            if shipped is not None:  # the interpreter, running a GPU configuration
                kernel = _fixed(two, shipped % len(CONFIGS_TWO if two else CONFIGS))
            elif is_batch_invariant() and not triton_interpreting():
                # One tile whatever M (the autotuner picks per M bucket). (The
                # interpreter has one configuration only.)
                kernel = _fixed(two, INVARIANT_CONFIG_TWO if two else INVARIANT_CONFIG)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
            kernel[grid](*args, **flags)
    return out


def _rows(x):
    """(..., K) -> (M, K) with rows contiguous along K (the layout the
    configurations are compiled and checked for)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # defined for K = 0 too
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _weight(w):
    return w if w.stride(-1) == 1 else w.contiguous()


def _empty(shape, like, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


# -- the ops ------------------------------------------------------------------

def linear(x, weight, bias, activation):
    x2, weight = _rows(x), _weight(weight)
    y = _empty((x2.shape[0], weight.shape[0]), x)
    matmul(x2, weight.t(), y, bias=bias, activation=activation)
    return y.view(*x.shape[:-1], weight.shape[0])


def swiglu(x, weight_gate, weight_up, bias_gate, bias_up):
    x2, weight_gate, weight_up = _rows(x), _weight(weight_gate), _weight(weight_up)
    y = _empty((x2.shape[0], weight_gate.shape[0]), x)
    matmul(x2, weight_gate.t(), y, b2=weight_up.t(), bias=bias_gate, bias2=bias_up,
           epilogue=SWIGLU)
    return y.view(*x.shape[:-1], weight_gate.shape[0])


def _bias_grad(dz, bias):
    return dz.float().sum(0).to(bias.dtype)


def linear_backward(grad_y, x, weight, bias, activation, output_mask):
    x2, gy, weight = _rows(x), _rows(grad_y), _weight(weight)
    dz = gy
    if activation != "none":  # dz = grad_y * act'(x W^T + b), in x's dtype
        dz = _empty(gy.shape, x)
        matmul(x2, weight.t(), dz, bias=bias, activation=activation, epilogue=GRAD_ACT, grad=gy)
    dx = dw = db = None
    if output_mask[0]:
        dx = matmul(dz, weight, _empty(x2.shape, x)).view(x.shape)
    if output_mask[1]:
        dw = matmul(dz.t(), x2, _empty(weight.shape, weight))
    if output_mask[2] and bias is not None:
        db = _bias_grad(dz, bias)
    return dx, dw, db


def swiglu_backward(grad_y, x, weight_gate, weight_up, bias_gate, bias_up, output_mask):
    x2, gy = _rows(x), _rows(grad_y)
    weight_gate, weight_up = _weight(weight_gate), _weight(weight_up)
    dgate = _empty(gy.shape, x)
    dup = _empty(gy.shape, x)
    matmul(x2, weight_gate.t(), dgate, b2=weight_up.t(), bias=bias_gate, bias2=bias_up,
           epilogue=GRAD_SWIGLU, out2=dup, grad=gy)
    dx = dwg = dwu = dbg = dbu = None
    if output_mask[0]:
        dx32 = matmul(dgate, weight_gate, _empty(x2.shape, x, torch.float32))
        matmul(dup, weight_up, dx32, epilogue=ACCUMULATE)
        dx = dx32.to(x.dtype).view(x.shape)
    if output_mask[1]:
        dwg = matmul(dgate.t(), x2, _empty(weight_gate.shape, weight_gate))
    if output_mask[2]:
        dwu = matmul(dup.t(), x2, _empty(weight_up.shape, weight_up))
    if output_mask[3] and bias_gate is not None:
        dbg = _bias_grad(dgate, bias_gate)
    if output_mask[4] and bias_up is not None:
        dbu = _bias_grad(dup, bias_up)
    return dx, dwg, dwu, dbg, dbu


for _name, _fn in [("linear_triton", linear), ("swiglu_triton", swiglu),
                   ("linear_backward_triton", linear_backward),
                   ("swiglu_backward_triton", swiglu_backward)]:
    register(_name, _fn)
