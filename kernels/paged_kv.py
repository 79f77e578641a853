"""The paged-KV append in Triton (pyllm::paged_kv_append_triton): new tokens'
keys and values written into their slots of a paged cache, the keys rotated
on the way (rotary embedding, as pyllm::rotary) when cos is given.

One program per (token, block of heads): it reads the token's slot (< 0:
nothing written) and, with rotary, the cos/sin rows of its position once;
each head row is read whole, its pairs rotated in float32 from a second
(partner-indexed) load of the same row, rounded once, and stored to the page.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyllm.kernels.launch import on_device, register

#: Elements of a program's (heads x head_dim) tile.
TILE = 2048


@triton.jit
def paged_kv_append_kernel(K, V, KP, VP, SLOTS, COS, SIN, POS,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_kpp, stride_kpt, stride_kph, stride_vpp, stride_vpt, stride_vph,
                           heads, head_dim, page_size, half,
                           ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(SLOTS + token)
    if slot >= 0:
        # below 2**31 (the op checks the cache's rows): a 32-bit division (a
        # 64-bit one is a ptxas subroutine with a stack frame)
        slot32 = slot.to(tl.int32)
        page32 = slot32 // page_size
        row = slot32 - page32 * page_size
        page = page32.to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < heads) & (d[None, :] < head_dim)
        t64 = token.to(tl.int64)
        h64 = h[:, None].to(tl.int64)
        k_row = K + t64 * stride_kt + h64 * stride_kh
        v_row = V + t64 * stride_vt + h64 * stride_vh
        kp_row = KP + page * stride_kpp + row * stride_kpt + h64 * stride_kph
        vp_row = VP + page * stride_vpp + row * stride_vpt + h64 * stride_vph
        tl.store(vp_row + d[None, :], tl.load(v_row + d[None, :], mask=mask), mask=mask)
        x = tl.load(k_row + d[None, :], mask=mask, other=0.0)
        if ROTARY:
            pos = tl.load(POS + token)
            if INTERLEAVED:
                second = (d % 2) == 1
                pair = d // 2
                partner = tl.where(second, d - 1, d + 1)
            else:
                second = d >= half
                pair = tl.where(second, d - half, d)
                partner = tl.where(second, d - half, d + half)
            rotated = d < 2 * half
            c = tl.load(COS + pos * half + pair, mask=rotated, other=1.0)
            s = tl.load(SIN + pos * half + pair, mask=rotated, other=0.0)
            y = tl.load(k_row + partner[None, :], mask=mask & rotated[None, :],
                        other=0.0).to(tl.float32)
            xf = x.to(tl.float32)
            # first of a pair: x1 c - x2 s; second: x2 c + x1 s
            out = tl.where(second[None, :], xf * c[None, :] + y * s[None, :],
                           xf * c[None, :] - y * s[None, :])
            x = tl.where(rotated[None, :], out.to(x.dtype), x)
        tl.store(kp_row + d[None, :], x, mask=mask)


def launch_config(heads: int, head_dim: int) -> dict:
    """(BLOCK_H, BLOCK_D, warps) for rows of ``heads`` x ``head_dim``."""
    block_d = triton.next_power_of_2(max(head_dim, 1))
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), TILE // block_d))
    return {"BLOCK_H": block_h, "BLOCK_D": block_d,
            "num_warps": 4 if block_h * block_d >= 1024 else 2}


def paged_kv_append(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, slots: torch.Tensor, cos, sin, positions,
                    interleaved: bool) -> None:
    """pyllm::paged_kv_append_triton (the Python face checked the arguments)."""
    tokens, heads, head_dim = k.shape
    if tokens == 0 or heads == 0 or head_dim == 0:
        return
    rotary = cos is not None
    config = launch_config(heads, head_dim)
    grid = (tokens, triton.cdiv(heads, config["BLOCK_H"]))
    placeholder = slots  # never read without rotary
    with on_device(k):
        paged_kv_append_kernel[grid](
            k, v, k_pages, v_pages, slots, cos if rotary else placeholder,
            sin if rotary else placeholder, positions if rotary else placeholder,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_pages.stride()[:3],
            *v_pages.stride()[:3], heads, head_dim, k_pages.shape[1],
            cos.shape[1] if rotary else 0, ROTARY=rotary, INTERLEAVED=bool(interleaved), **config)


register("paged_kv_append_triton", paged_kv_append)
