"""The paged KV cache's append: :func:`paged_kv_append` (new keys and values
into their slots, rotary embedding applied on the way) and the Python
registration (fake kernel) of ``pyllm::paged_kv_append``.

How an op is wired, file by file: CONTRIBUTING.md ("Adding an op").
"""

from __future__ import annotations

import torch

from pyllm import backend as _backend
from pyllm.checks import INT32_MAX, check_tensor
from pyllm.ops.registry import declare

__all__ = ["paged_kv_append", "paged_slots"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def paged_slots(block_table: torch.Tensor, page_size: int, sequence: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
    """The cache slots of tokens: ``block_table[sequence, position //
    page_size] * page_size + position % page_size``.

    Args:
        block_table: ``(batch, pages_per_sequence)`` int32 or int64.
        page_size: tokens per page.
        sequence, position: ``(tokens,)`` integers, each token's sequence
            (row of ``block_table``) and position in it.

    Returns ``(tokens,)`` int64 slots for :func:`paged_kv_append`.
    """
    sequence, position = sequence.long(), position.long()
    page = block_table.long()[sequence, position // page_size]
    return page * page_size + position % page_size


def paged_kv_append(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, slots: torch.Tensor, *, q: torch.Tensor | None = None,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None, interleaved: bool = False,
                    backend: str | None = None) -> None:
    """Writes new tokens' keys and values into a paged KV cache (vLLM's
    ``reshape_and_cache``, the append of ``flash_attn_with_kvcache``), with
    the rotary embedding applied to the keys on the way and to q in place.

    Token ``t``'s rows go to row ``slots[t] % page_size`` of page ``slots[t] //
    page_size`` (:func:`paged_slots`); a slot ``< 0`` is skipped (padding).
    Each slot should appear once (two tokens in one slot: either may win).

    Args:
        k_pages, v_pages: ``(pages, page_size, heads_kv, head_dim)``, written
            in place; any strides with a contiguous head_dim.
        k, v: the new tokens, ``(tokens, heads_kv, head_dim)`` or ``(batch,
            seq, heads_kv, head_dim)`` (flattened to ``batch * seq`` tokens),
            the pages' dtype (float16, bfloat16, float32; float64 on the
            reference backend). k itself is not changed.
        slots: ``(tokens,)`` (or k's leading shape) int32/int64.
        q: optional ``(tokens, heads, head_dim)`` or ``(batch, seq, heads,
            head_dim)`` queries of the same tokens, rotated in place (needs cos).
        cos, sin: ``(max_positions, rotary_dim // 2)`` float32 tables
            (:func:`pyllm.rotary_tables`): rotary embedding of the new keys
            (and q) by the angles of ``positions``, as :func:`pyllm.rotary`.
        positions: the tokens' positions, shaped like ``slots``, in ``[0,
            max_positions)``.
        interleaved: GPT-J pairs ``(2i, 2i + 1)`` instead of ``(i, i + half)``.
        backend: see :mod:`pyllm.backend`.

    Not differentiable (the cache is an inference structure).
    """
    op = "pyllm.paged_kv_append"
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages), ("k", k), ("v", v), ("q", q)):
        if type(t).__name__ == "DTensor":
            raise TypeError(f"{op}: {name} is a DTensor; the append writes into its inputs and "
                            "has no sharding rule: append the local shards (to_local())")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        check_tensor(op, name, t, dim=4)
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype or \
            v_pages.device != k_pages.device:
        raise ValueError(f"{op}: v_pages must match k_pages (shape {tuple(k_pages.shape)}, "
                         f"{k_pages.dtype}, {k_pages.device}), got {tuple(v_pages.shape)}, "
                         f"{v_pages.dtype}, {v_pages.device}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, min_dim=3)
        if t.dim() > 4:
            raise ValueError(f"{op}: {name} must be (tokens, heads_kv, head_dim) or (batch, seq, "
                             f"heads_kv, head_dim), got {tuple(t.shape)}")
        if t.dtype != k_pages.dtype or t.device != k_pages.device:
            raise TypeError(f"{op}: {name} must have the pages' dtype and device "
                            f"({k_pages.dtype}, {k_pages.device}), got {t.dtype}, {t.device}")
        if tuple(t.shape[-2:]) != tuple(k_pages.shape[-2:]):
            raise ValueError(f"{op}: {name}'s (heads_kv, head_dim) must be the pages' "
                             f"{tuple(k_pages.shape[-2:])}, got {tuple(t.shape[-2:])}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: k and v must have one shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k_pages, v_pages)):
        raise ValueError(f"{op}: the pages must not require grad (the cache is written in place)")
    lead = tuple(k.shape[:-2])
    check_tensor(op, "slots", slots, dtypes=_INDEX_DTYPES)
    if tuple(slots.shape) not in (lead, (k.shape[:-2].numel(),)) or slots.device != k.device:
        raise ValueError(f"{op}: slots must have shape {lead} (k's tokens) on {k.device}, got "
                         f"{tuple(slots.shape)} on {slots.device}")
    tokens = k.shape[:-2].numel()
    k3 = k.reshape(tokens, *k.shape[-2:])
    v3 = v.reshape(tokens, *v.shape[-2:])
    k3, v3 = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (k3, v3))
    slots = slots.reshape(tokens).to(torch.int64).contiguous()
    capacity = k_pages.shape[0] * k_pages.shape[1]
    if capacity > INT32_MAX:
        raise ValueError(f"{op}: the cache's pages x page_size = {capacity} rows must be at most "
                         f"2**31 - 1 (the kernels' slots are 32-bit)")
    if tokens and int(slots.max()) >= capacity:
        t = int((slots >= capacity).nonzero()[0, 0])
        raise ValueError(f"{op}: slots[{t}] = {int(slots[t])} is past the cache's pages x "
                         f"page_size = {capacity} rows")
    rotary = cos is not None or sin is not None or positions is not None
    if rotary:
        if cos is None or sin is None or positions is None:
            raise ValueError(f"{op}: rotary needs cos, sin and positions together")
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(op, name, t, dtypes=(torch.float32,), dim=2)
            if t.device != k.device:
                raise ValueError(f"{op}: {name} must be on k's device {k.device}, got {t.device}")
        if cos.shape != sin.shape or not 1 <= 2 * cos.shape[1] <= k.shape[-1]:
            raise ValueError(f"{op}: cos and sin must be one (max_positions, rotary_dim // 2) "
                             f"shape with 2 <= rotary_dim <= head_dim {k.shape[-1]}, got "
                             f"{tuple(cos.shape)} and {tuple(sin.shape)}")
        check_tensor(op, "positions", positions, dtypes=_INDEX_DTYPES)
        if positions.numel() != tokens or positions.device != k.device:
            raise ValueError(f"{op}: positions must have one entry per token ({tokens}) on "
                             f"{k.device}, got shape {tuple(positions.shape)} on "
                             f"{positions.device}")
        positions = positions.reshape(tokens).to(torch.int64).contiguous()
        if tokens and (int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]):
            raise ValueError(f"{op}: positions must lie in [0, {cos.shape[0]}) (the rows of "
                             f"cos/sin)")
        cos, sin = cos.contiguous(), sin.contiguous()
    elif q is not None:
        raise ValueError(f"{op}: q is only rotated: give cos, sin and positions with it")
    fn = _backend.route("paged_kv_append", k_pages, backend)
    if q is not None:
        from pyllm.ops.rotary import rotary as _rotary

        if q.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"{op}: q must have k's tokens {tuple(k.shape[:-2])}, got "
                             f"{tuple(q.shape[:-2])}")
        q3 = q.reshape(tokens, *q.shape[-2:])
        _rotary(q3, q3.new_empty((tokens, 0, q.shape[-1])), cos, sin, positions,
                interleaved=interleaved, backend=backend)
        if q3.untyped_storage().data_ptr() != q.untyped_storage().data_ptr():  # reshape copied
            q.copy_(q3.view(q.shape))
    fn(k_pages, v_pages, k3, v3, slots, cos if rotary else None, sin if rotary else None,
       positions if rotary else None, bool(interleaved))


def _paged_kv_append_fake(k_pages, v_pages, k, v, slots, cos, sin, positions, interleaved):
    return None


declare("paged_kv_append", fake=_paged_kv_append_fake, reference="paged_kv_append_op")
