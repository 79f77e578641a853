"""Attention modules on :func:`pyllm.attention`: :class:`Attention` (self or
cross, causal, grouped-query, rotary position embeddings, a pre-allocated
:class:`KVCache`) and :class:`RotaryEmbedding`.

Projection names follow Hugging Face's Llama (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``), so its attention weights load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

import pyllm
from pyllm.nn.linear import Linear

__all__ = ["Attention", "KVCache", "RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, the "rotate half" layout of GPT-NeoX/Llama:
    ``x * cos + rotate_half(x) * sin`` with ``inv_freq = base^(-2i/d)``.

    Args:
        head_dim: even; base: the frequency base (10000 by default).

    ``forward(x, positions)``: x ``(batch, seq, heads, head_dim)``, positions
    ``(seq,)`` or ``(batch, seq)`` integers; returns x rotated, x's dtype
    (angles computed in float32).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"pyllm.nn.RotaryEmbedding: head_dim must be even, got {head_dim}")
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                             / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(x.device)
        angles = torch.cat([angles, angles], dim=-1)  # (..., seq, head_dim)
        if angles.dim() == 2:
            angles = angles[None]
        cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of past tokens, allocated once for ``max_tokens``.

    ``keys``/``values``: ``(batch, max_tokens, heads_kv, head_dim)``;
    ``length``: tokens filled. :meth:`append` writes new tokens and returns
    views of everything filled so far (no copy of the past).
    """

    def __init__(self, batch: int, max_tokens: int, heads_kv: int, head_dim: int, *,
                 dtype=None, device=None):
        shape = (batch, max_tokens, heads_kv, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = k.shape[1]
        if self.length + new > self.keys.shape[1]:
            raise ValueError(f"pyllm.nn.KVCache: {self.length} + {new} tokens exceed the "
                             f"{self.keys.shape[1]} allocated")
        self.keys[:, self.length:self.length + new] = k
        self.values[:, self.length:self.length + new] = v
        self.length += new
        return self.keys[:, :self.length], self.values[:, :self.length]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary
    embeddings and a KV cache.

    Args:
        hidden_size: model width (input and output features).
        num_heads: query heads; ``head_dim`` defaults to hidden_size // num_heads.
        num_kv_heads: key/value heads, dividing num_heads (default num_heads).
        bias: biases on q/k/v projections; ``out_bias`` on o_proj (default: bias).
        causal: causal self-attention (bottom-right aligned with a cache).
        rope_base: rotary embeddings with this base, or None for none.
        kv_size: width of the cross-attention context (default hidden_size).
        device, dtype: of the parameters.

    ``forward(x, context=None, *, cache=None, positions=None, mask=None)``:
    x ``(batch, seq, hidden_size)``; context ``(batch, seq_k, kv_size)`` for
    cross-attention (keys and values from it, no rotary, not causal);
    cache a :class:`KVCache` that the new keys/values are appended to;
    positions ``(seq,)`` or ``(batch, seq)`` for the rotary embedding (default
    cache length + arange(seq)); mask a bool (True = attend) or additive
    tensor broadcastable to ``(batch, heads, seq, seq_k)`` (e.g. key padding
    ``(batch, 1, 1, seq_k)``). Returns ``(batch, seq, hidden_size)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 causal: bool = True, rope_base: float | None = None, kv_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"pyllm.nn.Attention: num_kv_heads ({num_kv_heads}) must divide "
                             f"num_heads ({num_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.causal = causal
        kv_size = kv_size or hidden_size
        factory = {"device": device, "dtype": dtype}
        self.q_proj = Linear(hidden_size, num_heads * self.head_dim, bias, **factory)
        self.k_proj = Linear(kv_size, num_kv_heads * self.head_dim, bias, **factory)
        self.v_proj = Linear(kv_size, num_kv_heads * self.head_dim, bias, **factory)
        self.o_proj = Linear(num_heads * self.head_dim, hidden_size,
                             bias if out_bias is None else out_bias, **factory)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base, device) if rope_base else None

    def new_cache(self, batch: int, max_tokens: int, *, dtype=None, device=None) -> KVCache:
        """A :class:`KVCache` for this module (parameters' dtype/device by default)."""
        p = self.k_proj.weight
        return KVCache(batch, max_tokens, self.num_kv_heads, self.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        source = x if context is None else context
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(source).view(b, source.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(source).view(b, source.shape[1], self.num_kv_heads, self.head_dim)
        if self.rotary is not None and context is None:
            if positions is None:
                start = cache.length if cache is not None else 0
                positions = torch.arange(start, start + s, device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        causal = self.causal and context is None
        out = pyllm.attention(q, k, v, causal=causal, bias=mask)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
