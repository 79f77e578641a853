"""Tiny random Hugging Face ``transformers`` models of many architectures, for
the pyllm.patch safety tests (tests/test_patch_safety.py): decoders and
encoders, with the features whose attention arguments the kernels may not
honour (logit softcapping, sliding windows, attention sinks, relative position
bias, ALiBi), scaled where needed so that those features bite."""

from __future__ import annotations

import dataclasses

import torch

QK_NAMES = ("q_proj", "k_proj", "query", "key", "q", "k")
QK_SCALE = 6.0
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: its model type, config overrides, and whether it is a
    decoder (greedy generation is compared too)."""

    name: str
    model_type: str
    config: dict
    decoder: bool = True
    common: bool = True

    def build(self, attn_implementation: str, seed: int = 0):
        """The model in eval mode, weights scaled up (so that softcapping and
        the like bite); raises ValueError if the architecture has no such
        attn_implementation."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        kwargs = dict(COMMON) if self.common else {}
        kwargs.update(self.config)
        config = AutoConfig.for_model(self.model_type, **kwargs)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        cls = AutoModelForCausalLM if self.decoder else AutoModel
        model = cls.from_config(config, attn_implementation=attn_implementation)
        model.eval()
        # Random init is small: scale every weight up so that attention
        # scores are large enough for softcapping and the like to matter.
        # Queries and keys more, for scores well past a softcap of 2.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                    p.mul_(4.0)
                    if any(part in name.split(".") for part in QK_NAMES):
                        p.mul_(QK_SCALE)
        return model


GQA = dict(num_key_value_heads=2, head_dim=8)
ARCHITECTURES = [
    Arch("llama", "llama", dict(GQA)),
    Arch("mistral-sliding", "mistral", dict(GQA, sliding_window=4)),
    Arch("qwen2", "qwen2", dict(GQA)),
    Arch("qwen3", "qwen3", dict(GQA)),
    Arch("gemma", "gemma", dict(GQA)),
    Arch("gemma2-softcap", "gemma2", dict(GQA, attn_logit_softcapping=2.0,
                                          final_logit_softcapping=None, sliding_window=4)),
    Arch("gemma3-sliding", "gemma3_text", dict(GQA, sliding_window=4)),
    Arch("phi3", "phi3", dict(num_key_value_heads=2, pad_token_id=0)),
    Arch("gpt2", "gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96),
         common=False),
    Arch("gpt-neox", "gpt_neox", dict(rotary_pct=0.5)),
    Arch("opt", "opt", dict(ffn_dim=48, word_embed_proj_dim=32)),
    Arch("olmo2", "olmo2", dict(GQA)),
    Arch("starcoder2-sliding", "starcoder2", dict(GQA, sliding_window=4)),
    Arch("gpt-oss-sinks", "gpt_oss", dict(GQA, num_local_experts=4, num_experts_per_tok=2,
                                           sliding_window=4)),
    Arch("bloom-alibi", "bloom", dict(n_layer=2, n_head=4), ),
    Arch("bert", "bert", {}, decoder=False),
    Arch("roberta", "roberta", {}, decoder=False),
    Arch("distilbert", "distilbert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                          vocab_size=96, max_position_embeddings=64),
         decoder=False, common=False),
    Arch("t5-encoder", "t5", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                  vocab_size=96), decoder=False, common=False),
    Arch("electra", "electra", dict(embedding_size=32), decoder=False),
]
