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

from pyllm.nn import Attention, KVCache, Linear, RMSNorm, SwiGLU

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

    @classmethod
    def from_hf(cls, config) -> "LlamaConfig":
        """From a ``transformers.LlamaConfig`` (or any object with its
        attributes); a ``rope_type`` other than the default (e.g. scaled
        rotary embeddings) raises ``NotImplementedError``."""
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"pyllm LlamaConfig: rope_type {rope['rope_type']!r} is not "
                                      "supported (only the default rotary embedding)")
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size,
                   config.num_hidden_layers, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None), getattr(config, "head_dim", None),
                   config.rms_norm_eps, float(theta), bool(config.tie_word_embeddings))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: attention then SwiGLU MLP, each added to the residual."""

    def __init__(self, c: LlamaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **factory)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                   head_dim=c.head_dim, rope_base=c.rope_theta, **factory)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **factory)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, **factory)

    def forward(self, x, residual, cache, positions, mask):
        h, residual = (self.input_layernorm(x), x) if residual is None else \
            self.input_layernorm(x, residual)
        h = self.self_attn(h, cache=cache, positions=positions, mask=mask)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, device, dtype)
                                    for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device=device, dtype=dtype)


class LlamaForCausalLM(nn.Module):
    """LLaMA-style causal language model.

    ``forward(input_ids, attention_mask=None, caches=None)``: input_ids
    ``(batch, seq)`` int64; attention_mask ``(batch, seq_total)`` of 1/0 over
    the cached plus new tokens (0 = padding, e.g. left padding); caches from
    :meth:`new_caches` (one :class:`pyllm.nn.KVCache` per layer), appended to.
    Returns logits ``(batch, seq, vocab_size)`` in the parameters' dtype.
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
    def from_hf(cls, hf_model) -> "LlamaForCausalLM":
        """The same model from a ``transformers`` ``LlamaForCausalLM`` (its
        weights are copied; a missing or mismatched tensor raises naming it)."""
        hf_state = hf_model.state_dict()
        p = next(iter(hf_state.values()))
        model = cls(LlamaConfig.from_hf(hf_model.config), device=p.device, dtype=p.dtype)
        ours = model.state_dict()
        missing = [k for k in ours if k not in hf_state]
        if missing:
            raise KeyError(f"pyllm LlamaForCausalLM.from_hf: the checkpoint has no {missing[0]}"
                           f" ({len(missing)} missing)")
        for key, tensor in ours.items():
            if hf_state[key].shape != tensor.shape:
                raise ValueError(f"pyllm LlamaForCausalLM.from_hf: {key} has shape "
                                 f"{tuple(hf_state[key].shape)}, expected {tuple(tensor.shape)}")
        model.load_state_dict({k: hf_state[k] for k in ours})
        return model.eval()

    def new_caches(self, batch: int, max_tokens: int) -> list[KVCache]:
        """One pre-allocated KV cache per layer."""
        return [layer.self_attn.new_cache(batch, max_tokens) for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        past = caches[0].length if caches else 0
        mask = positions = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            mask = keep[:, None, None, :past + s]                     # key padding
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + s]
        x, residual = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, caches[i] if caches else None, positions, mask)
        x, _ = self.model.norm(x, residual)
        return self.lm_head(x)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0,
                 generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
        """Prefill then token-by-token decoding with pre-allocated KV caches.

        Args:
            input_ids: ``(batch, prompt)``, prompts left-padded with
                ``attention_mask`` 0 where padding.
            max_new_tokens: tokens to add.
            temperature: 0 is greedy; else sample from softmax(logits / t),
                restricted to the ``top_k`` most likely and the smallest set
                with probability ``top_p``.
            eos_token_id: a sequence that produced it gets ``pad_token_id`` after.
            callback: called with each step's new tokens ``(batch,)`` (streaming).

        Returns:
            ``(batch, prompt + max_new_tokens)`` int64 (or shorter when every
            sequence stopped).
        """
        b, prompt = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
        caches = self.new_caches(b, prompt + max_new_tokens)
        tokens, done = input_ids, torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, mask, caches)[:, -1].float()
            nxt = _choose(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            if callback is not None:
                callback(nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            step_ids = nxt[:, None]
        return tokens


def _choose(logits, temperature, top_k, top_p, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
