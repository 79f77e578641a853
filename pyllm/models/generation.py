"""Generation for the decoders: prefill, then token-by-token decoding with
pre-allocated KV caches; greedy, temperature, top-k and top-p sampling, stop
tokens, left-padded batches, streaming through a callback.

A model mixes in :class:`GenerationMixin` and provides
``new_caches(batch, max_tokens)`` and
``forward(input_ids, attention_mask, caches)`` -> logits
``(batch, seq, vocab)``; with ``new_paged_caches(batch, max_tokens,
page_size)`` and a forward that takes them (:func:`forward_paged`),
``generate(..., page_size=16)`` decodes through paged KV caches: prompts of
different lengths packed without padding.
"""

from __future__ import annotations

import torch

from pyllm.invariance import is_batch_invariant

__all__ = ["GenerationMixin", "choose_next_token", "forward_paged", "last_tokens",
           "positions_from_mask"]


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


def forward_paged(model, lm_head, input_ids: torch.Tensor, attention_mask, caches: list,
                  last_only: bool = False, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """A decoder's forward through :class:`pyllm.nn.PagedKVCache` caches (one
    per layer). ``model`` has ``embed_tokens``, ``layers`` (each
    ``layer(x, residual, cache, positions, mask, cu_seqlens)`` -> ``(x,
    residual)``) and ``norm(x, residual)``.

    input_ids ``(batch, seq)`` adds seq tokens to each cached sequence; packed
    ``(1, tokens)`` with ``cu_seqlens`` ``(batch + 1,)`` int32 adds
    ``cu_seqlens[i + 1] - cu_seqlens[i]`` to sequence i. Returns logits
    ``(batch, seq, vocab)`` (``(1, tokens, vocab)`` packed), or with
    ``last_only`` each sequence's last new token's ``(batch, 1, vocab)``
    (every sequence must get a token then)."""
    if attention_mask is not None:
        raise ValueError("pyllm: paged KV caches hold each sequence's own tokens: pass no "
                         "attention_mask (pack sequences of different lengths with cu_seqlens)")
    x, residual = model.embed_tokens(input_ids), None
    for layer, cache in zip(model.layers, caches):
        x, residual = layer(x, residual, cache, None, None, cu_seqlens)
    if last_only:
        x, residual = last_tokens(x, residual, cu_seqlens)
    x, _ = model.norm(x, residual)
    return lm_head(x)


def last_tokens(x: torch.Tensor, residual: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """(x, residual) ``(batch, seq, hidden)`` cut to each sequence's last token
    ``(batch, 1, hidden)``; packed ``(1, tokens, hidden)`` with ``cu_seqlens``:
    the last of each packed sequence (every one must have a token)."""
    if cu_seqlens is None:
        return x[:, -1:], residual[:, -1:]
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError("pyllm: last_only needs a new token in every sequence")
    last = cu_seqlens[1:].long() - 1
    return x[0, last][:, None], residual[0, last][:, None]


class GenerationMixin:
    """``generate`` for a decoder with ``new_caches`` and a cached ``forward``."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0,
                 generator: torch.Generator | None = None, callback=None,
                 page_size: int | None = None) -> torch.Tensor:
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
            page_size: decode through paged KV caches of pages of this many
                tokens (the model's ``new_paged_caches``): each prompt's real
                tokens are packed without padding and each sequence takes the
                pages it fills; the tokens are those of the contiguous caches.
                In batch-invariant mode (:func:`pyllm.batch_invariant`) a
                left-padded batch takes this path (pages of 16) by default:
                padding would move a sequence's keys, so its tokens would
                depend on the others' lengths.

        Returns:
            ``(batch, prompt + max_new_tokens)`` int64 (shorter when every
            sequence stopped early).
        """
        b = input_ids.shape[0]
        if page_size is None and is_batch_invariant() and attention_mask is not None and \
                not bool(attention_mask.all()):
            page_size = 16
        if page_size is not None:
            logits_of, step_ids = self._paged_steps(input_ids, attention_mask, max_new_tokens,
                                                    page_size)
        else:
            logits_of, step_ids = self._cached_steps(input_ids, attention_mask, max_new_tokens)
        tokens, done = input_ids, torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = logits_of(step_ids, step == 0)[:, -1].float()
            nxt = choose_next_token(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            if callback is not None:
                callback(nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            step_ids = nxt[:, None]
        return tokens

    def _cached_steps(self, input_ids, attention_mask, max_new_tokens):
        """(logits of a step's ids, the prompt's ids) through pre-allocated KV
        caches: the prompt at once (left padding masked), then one token per
        sequence per step."""
        b, prompt = input_ids.shape
        # No padding: no mask at all (positions follow the cache length, and
        # attention runs without a bias).
        mask = None if attention_mask is None or bool(attention_mask.all()) else \
            attention_mask.clone()
        caches = self.new_caches(b, prompt + max_new_tokens)

        def logits_of(step_ids, first):
            nonlocal mask
            if mask is not None and not first:  # the previous step's token is real
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            return self(step_ids, mask, caches, last_only=True)
        return logits_of, input_ids

    def _paged_steps(self, input_ids, attention_mask, max_new_tokens, page_size):
        """(logits of a step's ids, the first step's ids) through paged caches:
        the prompts' real tokens (attention_mask 1) packed and prefilled at
        once, then one token per sequence per step."""
        b = input_ids.shape[0]
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else \
            attention_mask.to(torch.bool)
        counts = keep.sum(1)
        if bool((counts == 0).any()):
            raise ValueError("pyllm generate: every prompt needs a real token (attention_mask "
                             "all 0 in a row)")
        caches = self.new_paged_caches(b, int(counts.max()) + max_new_tokens, page_size)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=input_ids.device)
        torch.cumsum(counts, 0, out=cu[1:])

        def logits_of(step_ids, first):
            return self(step_ids, None, caches, last_only=True, cu_seqlens=cu if first else None)
        return logits_of, input_ids[keep][None]
