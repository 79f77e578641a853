"""Training losses for the models: next-token (causal LM) and masked-LM
cross-entropy on :func:`pyllm.cross_entropy` (float32 inside whatever the
logits' dtype), and the causal LM loss fused with the LM head
(:func:`pyllm.linear_cross_entropy`: no ``tokens x vocab`` logits)."""

from __future__ import annotations

import torch

import pyllm

__all__ = ["causal_lm_loss", "causal_lm_loss_fused", "masked_lm_loss"]


def _targets(input_ids, attention_mask):
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return targets.reshape(-1)


def _mean(per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the rows not ignored, float32."""
    return per_row.sum() / (targets != -100).sum()


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t.

    logits ``(batch, seq, vocab)``; input_ids ``(batch, seq)`` int64;
    attention_mask ``(batch, seq)`` 1/0: padded targets are left out.
    Returns a float32 scalar.
    """
    targets = _targets(input_ids, attention_mask)
    rows = pyllm.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                               reduction="none")
    return _mean(rows, targets)


def causal_lm_loss_fused(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``logits = hidden @ weight.T (+ bias)``
    without the logits: the LM head and the loss in chunks of tokens
    (:func:`pyllm.linear_cross_entropy`).

    hidden ``(batch, seq, hidden)`` (the final norm's output); weight
    ``(vocab, hidden)``. Returns a float32 scalar.
    """
    # every position predicts the next token; the last one nothing (ignored),
    # so hidden is used as it is, not sliced into a copy
    targets = torch.nn.functional.pad(_targets(input_ids, attention_mask).view(
        input_ids.shape[0], -1), (0, 1), value=-100).reshape(-1)
    return pyllm.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets,
                                      bias, out_dtype=torch.float32)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100.

    logits ``(batch, seq, vocab)``; labels ``(batch, seq)`` int64 (the
    original token where masked, -100 elsewhere). Returns a float32 scalar.
    """
    targets = labels.reshape(-1)
    return _mean(pyllm.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                     reduction="none"), targets)
