"""Training losses for the models: next-token (causal LM) and masked-LM
cross-entropy, computed in float32 whatever the logits' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "masked_lm_loss"]


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t.

    logits ``(batch, seq, vocab)``; input_ids ``(batch, seq)`` int64;
    attention_mask ``(batch, seq)`` 1/0: padded targets are left out.
    Returns a float32 scalar.
    """
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           targets.reshape(-1), ignore_index=-100)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100.

    logits ``(batch, seq, vocab)``; labels ``(batch, seq)`` int64 (the
    original token where masked, -100 elsewhere). Returns a float32 scalar.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)
