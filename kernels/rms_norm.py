"""RMSNorm in Triton: one program per row.

A row of up to 64 KiB is held in registers and read once; longer rows are
streamed twice in blocks (sum of squares, then normalise). Statistics in
float32; the row offset is 64-bit, so any number of rows is safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyllm.backend import triton_interpreting
from pyllm.kernels.launch import on_device

#: Rows up to this many bytes are normalised from registers in one pass.
SINGLE_PASS_BYTES = 65536


@triton.jit
def rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps,
                            HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
                            SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def forward_config(n: int, element_size: int) -> dict:
    """Block size, pass count and warps for a row of ``n`` elements."""
    single = n * element_size <= SINGLE_PASS_BYTES
    block = triton.next_power_of_2(n) if single else 4096
    return {"BLOCK_N": block, "SINGLE_PASS": single,
            "num_warps": min(max(block // 256, 1), 16)}


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float):
    """The ``pyllm::rms_norm_triton`` implementation: ``(y, rstd)`` as pyllm::rms_norm."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    w = weight.contiguous() if weight is not None else x  # x: a never-read placeholder
    with on_device(x):
        rms_norm_forward_kernel[(rows,)](x, w, y, rstd, n, n, n, eps,
                                         HAS_WEIGHT=weight is not None,
                                         **forward_config(n, x.element_size()))
    return y, rstd


_lib = torch.library.Library("pyllm", "IMPL")
_lib.impl("rms_norm_triton", rms_norm_forward, "CUDA")
if triton_interpreting():
    _lib.impl("rms_norm_triton", rms_norm_forward, "CPU")
