"""Hugging Face ``transformers`` causal-LM training loss on
:func:`pyllm.cross_entropy`.

A transformers causal LM computes its loss with ``self.loss_function`` (by
default ``transformers.loss.loss_utils.ForCausalLMLoss``: the logits upcast
to float32, a full copy, then ``F.cross_entropy``). :func:`patch` sets the
model's own ``loss_function`` (the attribute transformers provides for this)
to :func:`causal_lm_loss`, which takes the same arguments and gives the same
loss, with the softmax, loss and gradient in pyllm's kernel and no float32
copy of the logits. Only a model whose loss function is ``ForCausalLMLoss``
itself is patched; :func:`unpatch` removes the attribute again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyllm

__all__ = ["causal_lm_loss", "patch", "unpatch"]


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels=None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same result) on
    :func:`pyllm.cross_entropy`: float32 inside, the loss in float32."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    flat = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(flat.device)
    per_row = pyllm.cross_entropy(flat, target, ignore_index=ignore_index, reduction="none")
    if num_items_in_batch is None:
        return per_row.sum() / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(per_row.device)
    return per_row.sum() / num_items_in_batch


def patch(model) -> tuple[bool, str | None]:
    """(patched, why not) for ``model``'s loss function."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False, None
    current = getattr(model, "loss_function", None)
    if current is causal_lm_loss:
        return False, None
    if current is not ForCausalLMLoss:
        name = getattr(current, "__name__", type(current).__name__)
        return False, f"its loss function is {name}, not ForCausalLMLoss (loss left as is)"
    model.loss_function = causal_lm_loss
    return True, None


def unpatch(model) -> int:
    if model.__dict__.get("_loss_function") is causal_lm_loss:
        del model.__dict__["_loss_function"]
        return 1
    return 0
