"""Hugging Face ``transformers`` attention on pyllm's kernel, through the
library's own registry of attention functions (``AttentionInterface``): no
model source is rewritten. :func:`pyllm.patch` selects it with
``model.set_attn_implementation("pyllm")``.
"""

from __future__ import annotations

import torch

import pyllm

__all__ = ["IMPLEMENTATION", "register"]

IMPLEMENTATION = "pyllm"
_registered = False


def pyllm_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs):
    """The ``transformers`` attention-function signature on :func:`pyllm.attention`.

    ``query`` ``(batch, heads, seq_q, head_dim)``, ``key``/``value``
    ``(batch, heads_kv, seq_k, head_dim)`` (GQA without repeating them);
    ``attention_mask`` a bool (True = attend) or additive mask broadcastable to
    ``(batch, heads, seq_q, seq_k)``, or None with the module's causal flag.
    Returns ``(out (batch, seq_q, heads, head_dim), None)``. Raises
    ``NotImplementedError`` for attention dropout while training,
    ``output_attentions`` and ``position_bias`` (use another implementation).
    """
    if dropout and module.training:
        raise NotImplementedError("pyllm attention: attention dropout is not supported; set "
                                  "attention_dropout=0 or use another attn_implementation")
    if kwargs.get("output_attentions", False) or kwargs.get("position_bias") is not None:
        raise NotImplementedError("pyllm attention: output_attentions and position_bias are not "
                                  "supported; use attn_implementation='eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    out = pyllm.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          causal=causal, scale=scaling, bias=attention_mask)
    return out, None


def register() -> bool:
    """Registers "pyllm" with transformers' attention and mask registries;
    False when transformers is not installed."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(IMPLEMENTATION, pyllm_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # bool masks, None when causal
    _registered = True
    return True
