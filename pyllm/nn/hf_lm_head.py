"""Hugging Face ``transformers`` causal LM: the LM head and the training loss
fused (:func:`pyllm.linear_cross_entropy`), opt-in.

A causal LM's training step computes ``logits = lm_head(hidden)`` for every
token, ``(batch, seq, vocab)``, and then the loss on them: the largest memory
peak of the step. :func:`patch` (``pyllm.patch(model, fused_lm_head=True)``)
gives the model its own ``forward`` that, **in training mode with labels**,
computes the loss from the final hidden states and ``lm_head.weight`` in
chunks of tokens and returns **``logits=None``** (as Liger-Kernel's fused
forward does): that is why it is opt-in; ``pyllm.patch`` alone never changes
a model's outputs. In eval mode, or without labels, the original forward runs.

Only models whose ``forward`` is LLaMA's, statement for statement, are
patched (Mistral, Qwen2/3, Gemma, Phi-3, OLMo and about fifty more copy it):
their loss is then known to be ``loss_function(lm_head(last_hidden_state),
labels)``. The lm_head must be a plain linear layer without hooks and the loss
function transformers' ``ForCausalLMLoss`` (or pyllm's own drop-in of it).
:func:`unpatch` removes the forward again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyllm
from pyllm.nn.hf_rotary import _body

__all__ = ["patch", "unpatch"]


def _llamas_forward_body():
    try:
        from transformers.models.llama import modeling_llama
    except ImportError:
        return None
    return _body(modeling_llama.LlamaForCausalLM.forward)


def _head(model):
    """(weight, bias) of the model's lm_head, or a reason it can't be fused."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(weight, torch.Tensor) or \
            weight.dim() != 2:
        return None, "its lm_head is not a linear layer"
    if type(head).forward not in (torch.nn.Linear.forward, pyllm.nn.Linear.forward):
        return None, f"its lm_head is a {type(head).__name__}, not a linear layer"
    if getattr(head, "activation", "none") != "none":
        return None, f"its lm_head has an activation ({head.activation})"
    if head._forward_hooks or head._forward_pre_hooks:
        return None, "its lm_head has forward hooks"
    return (weight, getattr(head, "bias", None)), None


def _why_not(model) -> str | None:
    canonical = _llamas_forward_body()
    if canonical is None:
        return "transformers' LLaMA is not importable"
    if _body(type(model).forward) != canonical:
        return f"{type(model).__name__}.forward is not LLaMA's (lm_head left unfused)"
    _, why = _head(model)
    if why is not None:
        return why
    from transformers.loss.loss_utils import ForCausalLMLoss

    from pyllm.nn.hf_loss import causal_lm_loss

    if getattr(model, "loss_function", None) not in (ForCausalLMLoss, causal_lm_loss):
        return "its loss function is not ForCausalLMLoss"
    if getattr(model.config, "final_logit_softcapping", None):
        return "it softcaps its logits after the lm_head"
    return None


def _fused_loss(hidden, weight, bias, labels, num_items_in_batch=None, ignore_index=-100,
                shift_labels=None, **_):
    """transformers' ForCausalLMLoss of ``hidden @ weight.T + bias`` (float32,
    same arguments) without the logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        return pyllm.linear_cross_entropy(flat, weight, target, bias, ignore_index=ignore_index,
                                          out_dtype=torch.float32)
    total = pyllm.linear_cross_entropy(flat, weight, target, bias, ignore_index=ignore_index,
                                       reduction="sum", out_dtype=torch.float32)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _make_forward(model):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils.generic import can_return_tuple

    original = type(model).forward

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        """LLaMA's causal-LM forward; in training with labels the LM head and
        the loss fused (pyllm.linear_cross_entropy), ``logits=None``."""
        fuse = (self.training and labels is not None and isinstance(logits_to_keep, int)
                and logits_to_keep == 0 and self.lm_head.weight.dtype in
                (torch.float16, torch.bfloat16, torch.float32))
        if not fuse:
            return original(self, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values,
                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(hidden.dtype)  # as pyllm.nn.Linear (nn.Linear would raise)
            bias = bias.to(hidden.dtype) if bias is not None else None
        loss = _fused_loss(hidden, weight, bias, labels, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    forward._pyllm_fused_lm_head = True
    return forward.__get__(model)


def patch(model) -> tuple[bool, str | None]:
    """(patched, why not): gives ``model`` the fused forward (see the module)."""
    if getattr(model.__dict__.get("forward"), "_pyllm_fused_lm_head", False):
        return False, None
    if "forward" in model.__dict__:
        return False, "the model already has a forward of its own (lm_head left unfused)"
    why = _why_not(model)
    if why is not None:
        return False, why
    model.forward = _make_forward(model)
    return True, None


def unpatch(model) -> int:
    if getattr(model.__dict__.get("forward"), "_pyllm_fused_lm_head", False):
        del model.__dict__["forward"]
        return 1
    return 0
