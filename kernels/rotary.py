"""Rotary position embedding in Triton, in place on q and k (pyllm::rotary).

One program per (token, block of heads): it reads the token's position, the
cos/sin rows of that position once, and rotates the pairs of every head in its
block, in float32, rounding once. A position outside the tables gives NaN in
the rotated part (its loads are masked: nothing is read outside the tables).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyllm.kernels.launch import on_device, register

#: Elements of a program's (heads x pairs) tile.
TILE = 2048


@triton.jit
def rotary_kernel(X, COS, SIN, POS, stride_b, stride_s, stride_h, seq, heads, half, max_positions,
                  INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    token = tl.program_id(0)
    b = token // seq
    s = token - b * seq
    pos = tl.load(POS + token)
    in_table = (pos >= 0) & (pos < max_positions)
    i = tl.arange(0, BLOCK_P)
    pair_ok = i < half
    # row 0 read for a position outside the tables, its values replaced by NaN
    # (a scalar condition in a load's mask is refused by Triton 3.9's interpreter)
    row = tl.where(in_table, pos, 0) * half
    c = tl.load(COS + row + i, mask=pair_ok, other=0.0)
    sn = tl.load(SIN + row + i, mask=pair_ok, other=0.0)
    c = tl.where(in_table, c, float("nan"))
    sn = tl.where(in_table, sn, float("nan"))
    if CONJUGATE:
        sn = -sn
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    base = X + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + \
        h[:, None].to(tl.int64) * stride_h
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + half
    mask = (h[:, None] < heads) & pair_ok[None, :]
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c[None, :] - x2 * sn[None, :]
    y2 = x2 * c[None, :] + x1 * sn[None, :]
    tl.store(base + first[None, :], y1.to(X.dtype.element_ty), mask=mask)
    tl.store(base + second[None, :], y2.to(X.dtype.element_ty), mask=mask)


def launch_config(heads: int, half: int) -> dict:
    """(BLOCK_H, BLOCK_P, warps) for a tensor of ``heads`` heads of ``half`` pairs."""
    block_p = triton.next_power_of_2(max(half, 1))
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), TILE // block_p))
    return {"BLOCK_H": block_h, "BLOCK_P": block_p, "num_warps": 4 if block_h * block_p >= 1024 else 2}


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor, interleaved: bool, conjugate: bool) -> None:
    """pyllm::rotary_triton: q (batch, seq, heads, head_dim) and k rotated in
    place (the Python face checked the arguments)."""
    batch, seq = q.shape[:2]
    half = cos.shape[1]
    if batch * seq == 0 or half == 0:
        return
    with on_device(q):
        for x in (q, k):
            if x.shape[2] == 0:
                continue
            config = launch_config(x.shape[2], half)
            grid = (batch * seq, triton.cdiv(x.shape[2], config["BLOCK_H"]))
            rotary_kernel[grid](x, cos, sin, positions, x.stride(0), x.stride(1), x.stride(2), seq,
                                x.shape[2], half, cos.shape[0], INTERLEAVED=interleaved,
                                CONJUGATE=conjugate, **config)


register("rotary_triton", rotary)
