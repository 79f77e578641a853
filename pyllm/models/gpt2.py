"""GPT-2 (learned absolute positions, pre-norm LayerNorm blocks, fused QKV
projection, tanh-GELU MLP, tied LM head) built only from :mod:`pyllm.nn`
modules.

Module names follow Hugging Face's ``GPT2LMHeadModel``; its ``Conv1D``
weights (stored ``(in, out)``) are transposed into :class:`pyllm.nn.Linear`'s
``(out, in)`` by :meth:`GPT2LMHeadModel.from_hf`. The residual stream uses
the fused add + LayerNorm: each norm returns ``(norm(x + residual), x + residual)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import pyllm
from pyllm.models.checkpoint import model_from_hf
from pyllm.models.generation import GenerationMixin, last_tokens, positions_from_mask
from pyllm.nn import KVCache, LayerNorm, Linear, PagedKVCache
from pyllm.nn.packing import PacksForInference

__all__ = ["GPT2Config", "GPT2LMHeadModel"]

# Hugging Face activation names -> pyllm.nn.Linear activations
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu"}


@dataclasses.dataclass
class GPT2Config:
    """Sizes of a GPT-2 model (names as Hugging Face's ``GPT2Config``;
    ``n_inner`` None means 4 * n_embd)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.activation_function not in _ACTIVATIONS:
            raise NotImplementedError(f"pyllm GPT2Config: activation_function "
                                      f"{self.activation_function!r} is not supported (one of "
                                      f"{', '.join(_ACTIVATIONS)})")

    @classmethod
    def from_hf(cls, config) -> "GPT2Config":
        """From a ``transformers.GPT2Config`` (or an object with its
        attributes). Attention variants GPT-2 small/medium/large/xl do not use
        (``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn``,
        unscaled attention) raise ``NotImplementedError``."""
        for flag, ok in (("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
            if bool(getattr(config, flag, ok)) != ok:
                raise NotImplementedError(f"pyllm GPT2Config: {flag}={not ok} is not supported")
        return cls(config.vocab_size, config.n_positions, config.n_embd, config.n_layer,
                   config.n_head, getattr(config, "n_inner", None),
                   getattr(config, "activation_function", "gelu_new"),
                   getattr(config, "layer_norm_epsilon", 1e-5),
                   bool(getattr(config, "tie_word_embeddings", True)))


class GPT2Attention(nn.Module):
    """Causal self-attention with one fused QKV projection (``c_attn``)."""

    def __init__(self, c: GPT2Config, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim = c.n_head, c.n_embd // c.n_head
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd, device=device, dtype=dtype)
        self.c_proj = Linear(c.n_embd, c.n_embd, device=device, dtype=dtype)

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        p = self.c_attn.weight
        return KVCache(batch, max_tokens, self.num_heads, self.head_dim, dtype=p.dtype,
                       device=p.device)

    def new_paged_cache(self, batch: int, max_tokens: int, page_size: int = 16):
        p = self.c_attn.weight
        return PagedKVCache(batch, max_tokens, self.num_heads, self.head_dim,
                            page_size=page_size, dtype=p.dtype, device=p.device)

    def forward(self, x, cache, mask, cu_seqlens=None):
        b, s, width = x.shape
        if isinstance(cache, PagedKVCache):  # each sequence's own tokens, no mask
            counts = cache.step_counts(x.shape, cu_seqlens, "pyllm GPT2Attention")
            q, k, v = self.c_attn(x).view(b * s, 3, self.num_heads, self.head_dim).unbind(1)
            cache.append(k, v, counts)
            return self.c_proj(cache.attention(q, counts, causal=True).reshape(b, s, width))
        # -1 heads: under tensor parallelism (pyllm.distributed.FusedColwiseParallel
        # on c_attn) each rank holds its own heads of q, k and v
        q, k, v = self.c_attn(x).view(b, s, 3, -1, self.head_dim).unbind(2)
        if cache is not None:
            k, v = cache.append(k, v)
        out = pyllm.attention(q, k, v, causal=True, bias=mask)
        return self.c_proj(out.reshape(b, s, -1))


class GPT2MLP(nn.Module):
    def __init__(self, c: GPT2Config, device=None, dtype=None):
        super().__init__()
        inner = c.n_inner or 4 * c.n_embd
        self.c_fc = Linear(c.n_embd, inner, activation=_ACTIVATIONS[c.activation_function],
                           device=device, dtype=dtype)
        self.c_proj = Linear(inner, c.n_embd, device=device, dtype=dtype)

    def forward(self, x):
        return self.c_proj(self.c_fc(x))


class GPT2Block(nn.Module):
    """Pre-norm block: attention then MLP, each added to the residual."""

    def __init__(self, c: GPT2Config, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.ln_1 = LayerNorm(c.n_embd, c.layer_norm_epsilon, **factory)
        self.attn = GPT2Attention(c, **factory)
        self.ln_2 = LayerNorm(c.n_embd, c.layer_norm_epsilon, **factory)
        self.mlp = GPT2MLP(c, **factory)

    def forward(self, x, residual, cache, mask, cu_seqlens=None):
        h, residual = (self.ln_1(x), x) if residual is None else self.ln_1(x, residual)
        h, residual = self.ln_2(self.attn(h, cache, mask, cu_seqlens), residual)
        return self.mlp(h), residual


class GPT2Model(PacksForInference, nn.Module):
    def __init__(self, c: GPT2Config, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, **factory)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd, **factory)
        self.h = nn.ModuleList(GPT2Block(c, device, dtype) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon, **factory)


class GPT2LMHeadModel(GenerationMixin, PacksForInference, nn.Module):
    """GPT-2 causal language model.

    ``forward(input_ids, attention_mask=None, caches=None, last_only=False)``:
    input_ids ``(batch, seq)`` int64; attention_mask ``(batch, seq_total)`` of
    1/0 over the cached plus new tokens (0 = padding; positions count only
    real tokens, as Hugging Face's generate); caches from :meth:`new_caches`,
    appended to, or from :meth:`new_paged_caches` (no attention_mask; packed
    ``(1, tokens)`` input_ids with ``cu_seqlens`` add sequences of different
    lengths, as :func:`pyllm.models.generation.forward_paged`). Returns
    logits ``(batch, seq, vocab_size)`` in the parameters' dtype (only the
    last token's with ``last_only``).
    :meth:`generate` decodes (greedy, sampling, stop tokens, streaming).
    No dropout: training runs without it.
    """

    def __init__(self, config: GPT2Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, device, dtype)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, device=device,
                              dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @classmethod
    def from_hf(cls, source, *, dtype: torch.dtype | None = None) -> "GPT2LMHeadModel":
        """The same model from a ``transformers`` ``GPT2LMHeadModel`` /
        ``GPT2Model`` or a checkpoint directory (``config.json`` and
        ``*.safetensors`` or ``pytorch_model.bin``), in the checkpoint's dtype
        unless ``dtype`` is given. A missing tensor raises ``KeyError``
        naming it, a mismatched one ``ValueError``."""
        conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
        return model_from_hf(
            source, lambda config, state, **f: cls(GPT2Config.from_hf(config), **f),
            "pyllm GPT2LMHeadModel.from_hf", dtype, prefixes=("transformer",),
            transposed=lambda k: k.endswith(conv1d))

    def new_caches(self, batch: int, max_tokens: int) -> list[KVCache]:
        """One pre-allocated KV cache per layer (at most ``n_positions`` tokens)."""
        if max_tokens > self.config.n_positions:
            raise ValueError(f"pyllm GPT2LMHeadModel: {max_tokens} tokens exceed n_positions "
                             f"({self.config.n_positions})")
        return [block.attn.new_cache(batch, max_tokens) for block in self.transformer.h]

    def new_paged_caches(self, batch: int, max_tokens: int, page_size: int = 16) -> list:
        """One :class:`pyllm.nn.PagedKVCache` per layer (at most ``n_positions`` tokens)."""
        if max_tokens > self.config.n_positions:
            raise ValueError(f"pyllm GPT2LMHeadModel: {max_tokens} tokens exceed n_positions "
                             f"({self.config.n_positions})")
        return [block.attn.new_paged_cache(batch, max_tokens, page_size)
                for block in self.transformer.h]

    def _forward_paged(self, input_ids, attention_mask, caches, last_only, cu_seqlens):
        if attention_mask is not None:
            raise ValueError("pyllm: paged KV caches hold each sequence's own tokens: pass no "
                             "attention_mask (pack sequences of different lengths with "
                             "cu_seqlens)")
        counts = caches[0].step_counts(input_ids.shape, cu_seqlens, "pyllm GPT2LMHeadModel")
        _, positions = caches[0].token_positions(counts)
        if positions.numel() and int(positions.max()) >= self.config.n_positions:
            raise ValueError(f"pyllm GPT2LMHeadModel: {int(positions.max()) + 1} tokens exceed "
                             f"n_positions ({self.config.n_positions})")
        t = self.transformer
        x, residual = t.wte(input_ids) + t.wpe(positions.view(input_ids.shape)), None
        for block, cache in zip(t.h, caches):
            x, residual = block(x, residual, cache, None, cu_seqlens)
        if last_only:
            x, residual = last_tokens(x, residual, cu_seqlens)
        x, _ = t.ln_f(x, residual)
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, last_only: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if caches and isinstance(caches[0], PagedKVCache):
            return self._forward_paged(input_ids, attention_mask, caches, last_only, cu_seqlens)
        b, s = input_ids.shape
        past = caches[0].length if caches else 0
        if past + s > self.config.n_positions:
            raise ValueError(f"pyllm GPT2LMHeadModel: {past + s} tokens exceed n_positions "
                             f"({self.config.n_positions})")
        mask = None
        if attention_mask is None:
            positions = torch.arange(past, past + s, device=input_ids.device)
        else:
            mask = attention_mask.to(torch.bool)[:, None, None, :past + s]  # key padding
            positions = positions_from_mask(attention_mask, past, s)
        t = self.transformer
        x, residual = t.wte(input_ids) + t.wpe(positions), None
        for i, block in enumerate(t.h):
            x, residual = block(x, residual, caches[i] if caches else None, mask)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        x, _ = t.ln_f(x, residual)
        return self.lm_head(x)
