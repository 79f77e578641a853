"""LayerNorm and RMSNorm in Triton, forward and backward, with the fused
residual add (``y = norm(x + residual)``, returning the sum).

Forward: one program per row. A row of up to SINGLE_PASS_ELEMENTS is held in
registers and read once; longer rows are streamed in blocks (statistics, then
the output). Statistics in float32; LayerNorm's variance is the mean of
squared deviations. Row offsets are 64-bit.

Backward (after the Triton layer-norm tutorial): each program owns a chunk of
rows, writes their dx, and sums grad_y * xhat (and grad_y) into its own row of
a partial buffer; a second kernel adds the partial rows in order. No atomics:
the result does not depend on scheduling.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pyllm.kernels.launch import on_device, register

#: Rows up to this many elements are normalised from registers in one pass
#: (x, the sum, weight and bias of 8192 elements over 256 threads fit in
#: registers; more spill, as the compilation tests check).
SINGLE_PASS_ELEMENTS = 8192
#: The backward keeps more per element: at 8192 Triton 3.9 spills on sm_90
#: (8 or 16 warps), so rows past 4096 elements are streamed.
BACKWARD_SINGLE_PASS_ELEMENTS = 4096
#: Block of a streamed row, and its warps.
STREAM_BLOCK = 1024
STREAM_WARPS = 4
#: Warps per single-pass block size: chosen so that no variant (fp16/bf16,
#: sm_80/sm_90, with residual, weight and bias) spills a register, as
#: tests/test_triton_compile.py checks; ptxas spills one register for some
#: neighbouring choices.
FORWARD_WARPS = {128: 1, 256: 2, 512: 4, 1024: 4, 2048: 8, 4096: 16, 8192: 4}
#: Programs of the backward (each sums its rows' parameter gradients).
BACKWARD_PROGRAMS = 64


@triton.jit
def _row_input(x_row, r_row, s_row, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, rounded to the sum's dtype and stored) as float32."""
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = (x + tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)).to(
            s_row.dtype.element_ty)
        tl.store(s_row + offs, total, mask=mask)
        x = total.to(tl.float32)
    return x


@triton.jit
def norm_forward_kernel(X, R, W, B, Y, S, MEAN, RSTD, stride_x, stride_r, stride_y, stride_s, N,
                        eps, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                        SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    s_row = S + row * stride_s
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        mask = cols < N
        x = _row_input(x_row, r_row, s_row, cols, mask, HAS_RESIDUAL)
        if IS_RMS:
            mean = 0.0
            var = tl.sum(x * x, axis=0) / N
        else:
            mean = tl.sum(x, axis=0) / N
            d = tl.where(mask, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum (or sum of squares), writing the residual sum.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            x = _row_input(x_row, r_row, s_row, offs, offs < N, HAS_RESIDUAL)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        src_row = s_row if HAS_RESIDUAL else x_row
        if IS_RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / N
        else:
            mean = tl.sum(acc, axis=0) / N
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                x = tl.load(src_row + offs, mask=offs < N, other=0.0).to(tl.float32)
                d = tl.where(offs < N, x - mean, 0.0)
                acc2 += d * d
            var = tl.sum(acc2, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            mask = offs < N
            x = tl.load(src_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + offs, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def norm_backward_kernel(DY, X, W, MEAN, RSTD, DSUM, DX, DW_PARTIAL, DB_PARTIAL, stride_dy,
                         stride_x, stride_dsum, stride_dx, M, N, rows_per_program,
                         IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr,
                         WANT_DX: tl.constexpr, WANT_PARAMS: tl.constexpr,
                         BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr):
    # With g = dy * w and xhat = (x - mean) * rstd:
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  [+ dsum]
    # (RMSNorm: no mean(g)), dw = sum_rows dy * xhat, db = sum_rows dy.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    partial_row = pid.to(tl.int64) * N
    if SINGLE_PASS:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask, 1.0, 0.0)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
            if WANT_DX:
                g = dy * w
                c2 = tl.sum(g * xhat, axis=0) / N
                if IS_RMS:
                    dx = rstd * (g - xhat * c2)
                else:
                    dx = rstd * (g - tl.sum(g, axis=0) / N - xhat * c2)
                if HAS_DSUM:
                    dx += tl.load(DSUM + row64 * stride_dsum + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        if WANT_PARAMS:
            tl.store(DW_PARTIAL + partial_row + cols, dw, mask=mask)
            tl.store(DB_PARTIAL + partial_row + cols, db, mask=mask)
    else:
        if WANT_PARAMS:
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                tl.store(DW_PARTIAL + partial_row + offs, tl.zeros([BLOCK_N], dtype=tl.float32),
                         mask=offs < N)
                tl.store(DB_PARTIAL + partial_row + offs, tl.zeros([BLOCK_N], dtype=tl.float32),
                         mask=offs < N)
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                mean = 0.0
            else:
                mean = tl.load(MEAN + row)
            sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                mask = offs < N
                x = tl.load(X + row64 * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    g = dy * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
                else:
                    g = dy
                sum_g += g
                sum_gx += g * xhat
                if WANT_PARAMS:
                    p_dw = DW_PARTIAL + partial_row + offs
                    p_db = DB_PARTIAL + partial_row + offs
                    tl.store(p_dw, tl.load(p_dw, mask=mask, other=0.0) + dy * xhat, mask=mask)
                    tl.store(p_db, tl.load(p_db, mask=mask, other=0.0) + dy, mask=mask)
            c1 = tl.sum(sum_g, axis=0) / N
            c2 = tl.sum(sum_gx, axis=0) / N
            if IS_RMS:
                c1 = 0.0
            if WANT_DX:
                for start in range(0, N, BLOCK_N):
                    offs = start + cols
                    mask = offs < N
                    x = tl.load(X + row64 * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row64 * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
                    xhat = (x - mean) * rstd
                    if HAS_WEIGHT:
                        g = dy * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
                    else:
                        g = dy
                    dx = rstd * (g - c1 - xhat * c2)
                    if HAS_DSUM:
                        dx += tl.load(DSUM + row64 * stride_dsum + offs, mask=mask,
                                      other=0.0).to(tl.float32)
                    tl.store(DX + row64 * stride_dx + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def column_sum_kernel(P, OUT, rows, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = sum over the rows of P[r][n], in row order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, rows, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        tile = tl.load(P + r[:, None].to(tl.int64) * N + cols[None, :],
                       mask=(r[:, None] < rows) & (cols[None, :] < N), other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cols < N)


def forward_config(n: int) -> dict:
    """Block size, pass count and warps for a row of ``n`` elements."""
    if n > SINGLE_PASS_ELEMENTS:
        return {"BLOCK_N": STREAM_BLOCK, "SINGLE_PASS": False, "num_warps": STREAM_WARPS}
    block = triton.next_power_of_2(n)
    return {"BLOCK_N": block, "SINGLE_PASS": True, "num_warps": FORWARD_WARPS.get(block, 1)}


def backward_config(n: int) -> dict:
    """The backward holds x, dy, w and two accumulators per element: single
    pass up to BACKWARD_SINGLE_PASS_ELEMENTS, streamed past that."""
    if n > BACKWARD_SINGLE_PASS_ELEMENTS:
        return {"BLOCK_N": STREAM_BLOCK, "SINGLE_PASS": False, "num_warps": STREAM_WARPS}
    block = triton.next_power_of_2(n)
    return {"BLOCK_N": block, "SINGLE_PASS": True, "num_warps": min(max(block // 512, 1), 8)}


def _rows(x):
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def norm_forward(x, residual, weight, bias, eps, rms):
    """(y, sum or None, mean or None, rstd) of RMSNorm/LayerNorm of x (+ residual)."""
    # The kernels index every tensor with unit steps along the row.
    x, weight, bias = (t.contiguous() if t is not None else None for t in (x, weight, bias))
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    stats = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows > 0:
        r = residual.contiguous() if residual is not None else x
        with on_device(x):
            norm_forward_kernel[(rows,)](
                x, r, weight if weight is not None else x, bias if bias is not None else x, y,
                total if total is not None else y, mean if mean is not None else stats, stats,
                n, n, n, n, n, eps, IS_RMS=rms, HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                **forward_config(n))
    return y, total, mean, stats


def norm_backward(grad_y, x, mean, rstd, weight, grad_sum, want_dx, want_dw, want_db, rms):
    """(dx, dw, db), each None unless wanted."""
    x, grad_y = x.contiguous(), grad_y.contiguous()
    weight = weight.contiguous() if weight is not None else None
    n = x.shape[-1]
    rows = x.numel() // n
    want_params = want_dw or want_db
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_dx else None
    programs = max(1, min(BACKWARD_PROGRAMS, rows))
    per_program = (rows + programs - 1) // programs if rows else 0
    partial = torch.empty((2, programs, n), dtype=torch.float32, device=x.device) if want_params \
        else None
    dsum = grad_sum.contiguous() if grad_sum is not None else None
    if rows > 0:
        with on_device(x):
            norm_backward_kernel[(programs,)](
                grad_y, x, weight if weight is not None else x, mean if mean is not None else rstd,
                rstd, dsum if dsum is not None else x, dx if dx is not None else x,
                partial[0] if partial is not None else rstd,
                partial[1] if partial is not None else rstd, n, n, n, n, rows, n, per_program,
                IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_DSUM=dsum is not None,
                WANT_DX=want_dx, WANT_PARAMS=want_params, **backward_config(n))
    param_dtype = weight.dtype if weight is not None else x.dtype
    dw = db = None
    for which, wanted in ((0, want_dw), (1, want_db)):
        if not wanted:
            continue
        out = torch.empty((n,), dtype=param_dtype, device=x.device)
        if rows == 0:
            out.zero_()
        else:
            with on_device(x):
                column_sum_kernel[(triton.cdiv(n, 256),)](partial[which], out, programs, n,
                                                           BLOCK_R=16, BLOCK_N=256)
        if which == 0:
            dw = out
        else:
            db = out
    return dx, dw, db


# -- the ops ------------------------------------------------------------------

def rms_norm(x, weight, eps):
    y, _, _, rstd = norm_forward(x, None, weight, None, eps, rms=True)
    return y, rstd


def add_rms_norm(x, residual, weight, eps):
    y, total, _, rstd = norm_forward(x, residual, weight, None, eps, rms=True)
    return y, total, rstd


def rms_norm_backward(grad_y, x, rstd, weight, grad_sum, output_mask):
    dx, dw, _ = norm_backward(grad_y, x, None, rstd, weight, grad_sum, output_mask[0],
                              output_mask[1], False, rms=True)
    return dx, dw


def layer_norm(x, weight, bias, eps):
    y, _, mean, rstd = norm_forward(x, None, weight, bias, eps, rms=False)
    return y, mean, rstd


def add_layer_norm(x, residual, weight, bias, eps):
    return norm_forward(x, residual, weight, bias, eps, rms=False)


def layer_norm_backward(grad_y, x, mean, rstd, weight, grad_sum, output_mask):
    return norm_backward(grad_y, x, mean, rstd, weight, grad_sum, *output_mask, rms=False)


for _name, _fn in [("rms_norm_triton", rms_norm), ("add_rms_norm_triton", add_rms_norm),
                   ("rms_norm_backward_triton", rms_norm_backward),
                   ("layer_norm_triton", layer_norm), ("add_layer_norm_triton", add_layer_norm),
                   ("layer_norm_backward_triton", layer_norm_backward)]:
    register(_name, _fn)
