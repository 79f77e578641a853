"""Generation for the decoders: prefill, then token-by-token decoding with
pre-allocated KV caches; greedy, temperature, top-k and top-p sampling, stop
tokens, left-padded batches, streaming through a callback.

A model mixes in :class:`GenerationMixin` and provides
``new_caches(batch, max_tokens)`` and
``forward(input_ids, attention_mask, caches)`` -> logits
``(batch, seq, vocab)``.
"""

from __future__ import annotations

import torch

__all__ = ["GenerationMixin", "choose_next_token", "positions_from_mask"]


def positions_from_mask(attention_mask: torch.Tensor, past: int, seq: int) -> torch.Tensor:
    """Position ids ``(batch, seq)`` of the new tokens: the count of real
    tokens before each one (left padding does not advance positions), as
    Hugging Face's generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + seq]


def choose_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``(batch,)`` int64 from logits ``(batch, vocab)``: argmax
    when ``temperature`` is 0, else a sample of softmax(logits / temperature)
    restricted to the ``top_k`` most likely tokens and to the smallest set
    whose probability reaches ``top_p``."""
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


class GenerationMixin:
    """``generate`` for a decoder with ``new_caches`` and a cached ``forward``."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0,
                 generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
        """Prefill then token-by-token decoding with pre-allocated KV caches.

        Args:
            input_ids: ``(batch, prompt)`` int64, prompts left-padded with
                ``attention_mask`` ``(batch, prompt)`` 0 where padding.
            max_new_tokens: tokens to add.
            temperature: 0 is greedy; else sample from softmax(logits / t),
                restricted to the ``top_k`` most likely and the smallest set
                with probability ``top_p``.
            eos_token_id: a sequence that produced it gets ``pad_token_id`` after.
            generator: random source for sampling.
            callback: called with each step's new tokens ``(batch,)`` (streaming).

        Returns:
            ``(batch, prompt + max_new_tokens)`` int64 (shorter when every
            sequence stopped early).
        """
        b, prompt = input_ids.shape
        # No padding: no mask at all (positions follow the cache length, and
        # attention runs without a bias).
        mask = None if attention_mask is None or bool(attention_mask.all()) else \
            attention_mask.clone()
        caches = self.new_caches(b, prompt + max_new_tokens)
        tokens, done = input_ids, torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, mask, caches, last_only=True)[:, -1].float()
            nxt = choose_next_token(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            if callback is not None:
                callback(nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            step_ids = nxt[:, None]
        return tokens
