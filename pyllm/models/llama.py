"""A LLaMA-style decoder (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU) built only from :mod:`pyllm.nn` modules.

Module names follow Hugging Face's ``LlamaForCausalLM``, so its state_dict
loads as it is (:meth:`LlamaForCausalLM.from_hf`). The residual stream uses
the fused add + RMSNorm: each norm returns ``(norm(x + residual), x + residual)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pyllm.models.checkpoint import model_from_hf
from pyllm.models.direct_decode import llama_layers
from pyllm.models.generation import GenerationMixin, forward_paged, positions_from_mask
from pyllm.nn import Attention, KVCache, Linear, PagedKVCache, RMSNorm, SwiGLU
from pyllm.nn.packing import PacksForInference

__all__ = ["LlamaConfig", "LlamaForCausalLM"]


@dataclasses.dataclass
class LlamaConfig:
    """Sizes of a LLaMA-style model (names as Hugging Face's ``LlamaConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    #: transformers' rope scaling (rope_type default, linear, dynamic, llama3,
    #: yarn and their keys); None: plain rotary embeddings.
    rope_parameters: dict | None = None
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, config) -> "LlamaConfig":
        """From a ``transformers.LlamaConfig`` (or any object with its
        attributes); its rope scaling (default, linear, dynamic, llama3, yarn)
        is kept; another ``rope_type`` (longrope) raises ``NotImplementedError``."""
        from pyllm.ops.rotary import ROPE_TYPES

        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        kind = rope.get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise NotImplementedError(f"pyllm LlamaConfig: rope_type {kind!r} is not supported "
                                      f"(supported: {', '.join(ROPE_TYPES)})")
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size,
                   config.num_hidden_layers, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None), getattr(config, "head_dim", None),
                   config.rms_norm_eps, float(theta), bool(config.tie_word_embeddings),
                   rope if kind != "default" else None,
                   getattr(config, "max_position_embeddings", None))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: attention then SwiGLU MLP, each added to the residual."""

    def __init__(self, c: LlamaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **factory)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                   head_dim=c.head_dim, rope_base=c.rope_theta,
                                   rope_parameters=c.rope_parameters,
                                   max_position_embeddings=c.max_position_embeddings, **factory)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **factory)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, **factory)

    def forward(self, x, residual, cache, positions, mask, cu_seqlens=None):
        h, residual = (self.input_layernorm(x), x) if residual is None else \
            self.input_layernorm(x, residual)
        h = self.self_attn(h, cache=cache, positions=positions, mask=mask, cu_seqlens=cu_seqlens)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(PacksForInference, nn.Module):
    def __init__(self, c: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, device, dtype)
                                    for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device=device, dtype=dtype)


class LlamaForCausalLM(GenerationMixin, PacksForInference, nn.Module):
    """LLaMA-style causal language model.

    ``forward(input_ids, attention_mask=None, caches=None, last_only=False)``:
    input_ids ``(batch, seq)`` int64; attention_mask ``(batch, seq_total)`` of
    1/0 over the cached plus new tokens (0 = padding, e.g. left padding);
    caches from :meth:`new_caches` (one :class:`pyllm.nn.KVCache` per layer),
    appended to, or from :meth:`new_paged_caches` (one
    :class:`pyllm.nn.PagedKVCache` per layer: no attention_mask; input_ids
    ``(batch, seq)`` adds seq tokens to each sequence, or packed ``(1,
    tokens)`` with ``cu_seqlens`` ``(batch + 1,)`` int32 adds sequences of
    different lengths). Returns logits ``(batch, seq, vocab_size)`` in the
    parameters' dtype (``(batch, 1, vocab_size)`` for the last token only
    with ``last_only``). :meth:`generate` decodes (see
    :class:`pyllm.models.generation.GenerationMixin`). After
    :meth:`pack_for_inference`, a call over ``KVCache`` caches without
    gradients runs the decoder layers in one C++ call
    (:func:`pyllm.models.direct_decode.llama_layers`), with the modules'
    outputs bit for bit.
    """

    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, device, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, device=device,
                              dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf(cls, source, *, dtype: torch.dtype | None = None) -> "LlamaForCausalLM":
        """The same model from a ``transformers`` ``LlamaForCausalLM`` (its
        weights are copied) or a checkpoint directory (``config.json`` and
        ``*.safetensors`` or ``pytorch_model.bin``), in the checkpoint's dtype
        unless ``dtype`` is given. A missing tensor raises ``KeyError`` naming
        it, a mismatched one ``ValueError``."""
        return model_from_hf(
            source, lambda config, state, **f: cls(LlamaConfig.from_hf(config), **f),
            "pyllm LlamaForCausalLM.from_hf", dtype, prefixes=("model",))

    def new_caches(self, batch: int, max_tokens: int) -> list[KVCache]:
        """One pre-allocated KV cache per layer."""
        return [layer.self_attn.new_cache(batch, max_tokens) for layer in self.model.layers]

    def new_paged_caches(self, batch: int, max_tokens: int, page_size: int = 16) -> list:
        """One :class:`pyllm.nn.PagedKVCache` per layer."""
        return [layer.self_attn.new_paged_cache(batch, max_tokens, page_size=page_size)
                for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, last_only: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if caches and isinstance(caches[0], PagedKVCache):
            return forward_paged(self.model, self.lm_head, input_ids, attention_mask, caches,
                                 last_only, cu_seqlens)
        b, s = input_ids.shape
        past = caches[0].length if caches else 0
        mask = positions = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            mask = keep[:, None, None, :past + s]                     # key padding
            positions = positions_from_mask(attention_mask, past, s)
        x, residual = self.model.embed_tokens(input_ids), None
        # packed CPU inference (generate after pack_for_inference): the
        # layers in one C++ call, or None (see pyllm.models.direct_decode)
        stack = llama_layers(self.model.layers, x, caches) if caches and mask is None else None
        if stack is not None:
            x, residual = stack
        else:
            for i, layer in enumerate(self.model.layers):
                x, residual = layer(x, residual, caches[i] if caches else None, positions, mask)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        x, _ = self.model.norm(x, residual)
        return self.lm_head(x)
