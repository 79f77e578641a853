"""Perplexity of a causal language model over a long text, with a sliding
window (the usual evaluation for models with a bounded context)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor, *,
               window: int, stride: int | None = None) -> float:
    """exp(mean negative log-likelihood) of every token after the first.

    The text is read in windows of ``window`` tokens that start ``stride``
    tokens apart (default ``window // 2``); each token is scored once, in
    the first window that contains it past the window's first position, with
    the window's earlier tokens as context (up to ``window - stride`` of them
    once the windows slide).

    Args:
        model: a causal LM called as ``model(ids)`` on ``(1, n)`` int64 ids,
            returning logits ``(1, n, vocab)`` (any pyllm model; for a
            ``transformers`` one pass ``lambda ids: hf(ids).logits``).
        input_ids: ``(seq,)`` or ``(1, seq)`` int64, seq >= 2.
        window: tokens per forward pass (at most the model's context).
        stride: tokens the window advances by, 1..window - 1.

    Returns:
        The perplexity as a Python float (NLL summed in float64).
    """
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError("pyllm perplexity: input_ids must be (seq,) or (1, seq) with seq >= 2, "
                         f"got {tuple(input_ids.shape)}")
    if window < 2:
        raise ValueError(f"pyllm perplexity: window must be >= 2, got {window}")
    stride = stride or window // 2
    if not 1 <= stride < window:
        raise ValueError(f"pyllm perplexity: stride must be in [1, window), got {stride}")
    n = ids.shape[1]
    nll, scored, begin = 0.0, 1, 0  # tokens before `scored` have been scored (token 0 never)
    while scored < n:
        end = min(begin + window, n)
        logits = model(ids[:, begin:end])
        first = scored - begin  # first target position inside the window, >= 1
        targets = ids[0, begin + first:end]
        nll += F.cross_entropy(logits[0, first - 1:end - begin - 1].double(), targets,
                               reduction="sum").item()
        scored = end
        begin += stride
    return math.exp(nll / (n - 1))
