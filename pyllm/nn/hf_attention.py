"""Hugging Face ``transformers`` attention on pyllm's kernel, through the
library's own registry of attention functions (``AttentionInterface``): no
model source is rewritten. :func:`pyllm.patch` selects it with
``model.set_attn_implementation("pyllm")``, after :func:`unsupported` found
nothing in the model that the kernels cannot honour.

What transformers' attention modules pass, and what becomes of it:

- honoured: the query/key/value (GQA without repeating k and v), the mask
  (built by ``sdpa_mask``: bool or None with the causal flag; sliding windows
  and padding are in it), ``scaling``, ``is_causal``, ``dropout`` = 0;
  ignored because the mask already says it: ``sliding_window``, the
  packed-sequence arguments (``cu_seq_lens_*``, ``max_length_*``,
  ``position_ids``);
- not honoured, found at patch time (the attention is then left alone and
  the patch report says why): ``softcap`` (logit softcapping), ``s_aux``
  (attention sinks), ``position_bias`` (T5's relative bias), any argument this
  module does not know;
- not honoured, known only at call time (``output_attentions=True``, attention
  dropout while training, or one of the above after all): the call goes to
  the implementation the model had before the patch, with its own mask
  format, and a RuntimeWarning says so. The output is then the original one.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import warnings
import weakref

import torch

import pyllm

__all__ = ["IMPLEMENTATION", "register", "unsupported", "remember_original"]

IMPLEMENTATION = "pyllm"
_registered = False

#: Arguments whose value never changes what the kernel must compute here.
_IGNORED = frozenset({"sliding_window", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                      "max_length_k", "position_ids", "is_causal", "scaling", "dropout",
                      "output_attentions", "attention_mask", "query", "key", "value"})
#: Arguments the kernels cannot honour when they are not None.
_UNHONOURED = {"softcap": "logit softcapping (softcap={value})",
               "s_aux": "attention sinks (s_aux)",
               "position_bias": "a relative position bias (position_bias)",
               "head_mask": "a head mask (head_mask)"}

# id(config) -> the attn_implementation it had before the patch (for
# fallbacks); configs are not hashable, so the entry goes with the config.
_ORIGINAL: dict[int, str] = {}


def remember_original(config, implementation: str | None) -> None:
    """Records the implementation a patched model had, for call-time fallbacks."""
    if id(config) not in _ORIGINAL:
        weakref.finalize(config, _ORIGINAL.pop, id(config), None)
    _ORIGINAL[id(config)] = implementation or "eager"


def _interface_call_keywords(cls) -> list[tuple[str, ast.expr]] | None:
    """The keyword arguments of the ``attention_interface(...)`` call in
    ``cls.forward``, or None when the forward has no such call (or no source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    if "attention_interface(" not in source:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "attention_interface"):
            return [(kw.arg, kw.value) for kw in node.keywords if kw.arg is not None]
    return None


def _value_of(module, expr: ast.expr):
    """The value of ``self.attr`` (or a constant) on ``module``; raises
    LookupError for any other expression."""
    if isinstance(expr, ast.Constant):
        return expr.value
    if (isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name)
            and expr.value.id == "self"):
        if not hasattr(module, expr.attr):
            raise LookupError(expr.attr)
        return getattr(module, expr.attr)
    raise LookupError(ast.unparse(expr))


def unsupported(model: torch.nn.Module) -> list[str]:
    """Why pyllm's attention cannot stand in for ``model``'s (empty: it can).

    Reads, for every attention module class of the model, the keyword
    arguments its forward passes to the attention function, and the values
    they take on each module (``softcap=self.attn_logit_softcapping`` and the
    like)."""
    reasons: list[str] = []
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return [f"{type(model).__name__} does not route its attention through transformers' "
                "AttentionInterface"]
    seen_classes: dict[type, list | None] = {}
    found = False
    for module in model.modules():
        cls = type(module)
        if cls not in seen_classes:
            seen_classes[cls] = _interface_call_keywords(cls)
        keywords = seen_classes[cls]
        if keywords is None:
            continue
        found = True
        for arg, expr in keywords:
            if arg in _IGNORED:
                continue
            try:
                value = _value_of(module, expr)
            except LookupError:
                value = ...
            if value is None:
                continue
            if arg in _UNHONOURED:
                shown = "?" if value is ... else value
                why = _UNHONOURED[arg].format(value=shown)
            else:
                why = f"an argument pyllm's attention does not know ({arg}={ast.unparse(expr)})"
            reason = f"{cls.__name__} passes {why}"
            if reason not in reasons:
                reasons.append(reason)
    if not found:
        reasons.append("no attention module calls transformers' attention function")
    return reasons


def _warn(reason: str) -> None:
    # Python's default warning filter shows it once per call site.
    warnings.warn(f"pyllm attention: {reason}; this call runs the model's original "
                      "attention implementation", RuntimeWarning, stacklevel=3)


def _call_time_reason(module, dropout, kwargs) -> str | None:
    if dropout and module.training:
        return f"attention dropout (p={dropout}) while training"
    if kwargs.get("output_attentions", False):
        return "output_attentions=True"
    for arg, what in _UNHONOURED.items():
        if kwargs.get(arg) is not None:
            return what.format(value=kwargs[arg])
    # Other keywords flow through from the model's forward (use_cache,
    # cache_position, ...) and, as for transformers' sdpa function, say
    # nothing about the attention: what an attention module passes itself was
    # read at patch time (unsupported()).
    return None


def _eager_mask(module, query, key, attention_mask, is_causal):
    """sdpa_mask's bool mask (or None for causal) as eager's additive mask."""
    sq, sk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None:
        if not (causal and sq > 1):
            return None
        keep = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        attention_mask = keep[None, None]
    if attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(attention_mask, zero, torch.finfo(query.dtype).min)


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = _ORIGINAL.get(id(getattr(module, "config", None)), "eager")
    if original != "eager" and original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask,
                                                 dropout=dropout, scaling=scaling,
                                                 is_causal=is_causal, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    mask = _eager_mask(module, query, key, attention_mask, is_causal)
    if eager is None:
        eager = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def pyllm_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs):
    """The ``transformers`` attention-function signature on :func:`pyllm.attention`.

    ``query`` ``(batch, heads, seq_q, head_dim)``, ``key``/``value``
    ``(batch, heads_kv, seq_k, head_dim)`` (GQA without repeating them);
    ``attention_mask`` a bool (True = attend) or additive mask broadcastable to
    ``(batch, heads, seq_q, seq_k)``, or None with the module's causal flag.
    Returns ``(out (batch, seq_q, heads, head_dim), None)``. A call the
    kernels cannot honour (see the module docstring) runs the model's original
    implementation instead, with a RuntimeWarning.
    """
    reason = _call_time_reason(module, dropout, kwargs)
    if reason is not None:
        _warn(reason)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                         kwargs)
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
