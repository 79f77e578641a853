"""Hugging Face ``transformers`` attention on pyllm's kernel, through the
library's own registry of attention functions (``AttentionInterface``): no
model source is rewritten. :func:`pyllm.patch` selects it with
``model.set_attn_implementation("pyllm")``, after :func:`unsupported` found
nothing in the model that the kernels cannot honour.

What transformers' attention modules pass, and what becomes of it:

- honoured: the query/key/value (GQA without repeating k and v), the mask
  (bool or None with the causal flag, as for ``sdpa``: None with more keys
  than queries is causal from the top-left corner, a static cache's prefill),
  ``scaling``, ``is_causal``, ``dropout`` = 0, ``softcap`` (logit softcapping,
  in the kernel; but a model patched from ``sdpa``, which ignores it, keeps
  computing without it, so that patching changes no output),
  ``sliding_window`` (in the kernel, its tiles skipped), ``s_aux``
  (gpt-oss's attention sinks, folded around the kernel, with their gradient);
  ignored because the mask already says it: the packed-sequence arguments
  (``cu_seq_lens_*``, ``max_length_*``, ``position_ids``);
- the sliding window's mask: where every attention module of the model passes
  its layer's window (checked at patch time, :func:`window_in_kernel`), the
  mask function leaves out the ``seq_q x seq_k`` mask of a sliding-window
  layer wherever transformers would leave out a causal one (no padding), and
  the kernel applies the window; otherwise the dense mask is built as by
  ``sdpa_mask``;
- not honoured, found at patch time (the attention is then left alone and
  the patch report says why): ``position_bias`` (T5's relative bias), any
  argument this module does not know;
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

__all__ = ["IMPLEMENTATION", "register", "unsupported", "remember_original", "window_in_kernel",
           "remember_window_in_kernel", "pyllm_mask"]

IMPLEMENTATION = "pyllm"
_registered = False

#: Arguments whose value never changes what the kernel must compute here, or
#: that the kernel honours whatever their value (softcap: checked by
#: unsupported()).
_IGNORED = frozenset({"sliding_window", "s_aux", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                      "max_length_k", "position_ids", "is_causal", "scaling", "dropout",
                      "output_attentions", "attention_mask", "query", "key", "value"})
#: Arguments the kernels cannot honour when they are not None.
_UNHONOURED = {"position_bias": "a relative position bias (position_bias)",
               "head_mask": "a head mask (head_mask)"}

# id(config) -> the attn_implementation it had before the patch (for
# fallbacks); configs are not hashable, so the entry goes with the config.
_ORIGINAL: dict[int, str] = {}
#: Implementations that ignore the softcap argument (torch's SDPA has none):
#: a model patched from one of them keeps computing without it.
_IGNORE_SOFTCAP = frozenset({"sdpa"})
# id(config) of the configs whose sliding-window layers get their window from
# the kernel (window_in_kernel() found every module passing it).
_WINDOW_IN_KERNEL: dict[int, bool] = {}


def remember_original(config, implementation: str | None, model=None) -> None:
    """Records the implementation a patched model had, for call-time fallbacks
    and the softcap rule: under ``config`` and, given ``model``, under the
    config of each of its attention modules (a multimodal model's text
    modules have their own)."""
    configs = [config] + [getattr(m, "config", None) for m, _ in _attention_modules(model)] \
        if model is not None else [config]
    for c in configs:
        if c is None:
            continue
        if id(c) not in _ORIGINAL:
            weakref.finalize(c, _ORIGINAL.pop, id(c), None)
        _ORIGINAL[id(c)] = implementation or "eager"


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
    """The value on ``module`` of a constant, ``self.a.b`` or
    ``getattr(self.a, "b", default)``; raises LookupError for any other
    expression."""
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Name) and expr.id == "self":
        return module
    if isinstance(expr, ast.Attribute):
        owner = _value_of(module, expr.value)
        if not hasattr(owner, expr.attr):
            raise LookupError(expr.attr)
        return getattr(owner, expr.attr)
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "getattr"
            and not expr.keywords and len(expr.args) in (2, 3)
            and isinstance(expr.args[1], ast.Constant) and isinstance(expr.args[1].value, str)):
        owner = _value_of(module, expr.args[0])
        if len(expr.args) == 3:
            return getattr(owner, expr.args[1].value, _value_of(module, expr.args[2]))
        if not hasattr(owner, expr.args[1].value):
            raise LookupError(expr.args[1].value)
        return getattr(owner, expr.args[1].value)
    raise LookupError(ast.unparse(expr))


def _attention_modules(model: torch.nn.Module):
    """(module, {keyword: expression}) for every module of ``model`` whose
    forward calls transformers' attention function."""
    seen: dict[type, list | None] = {}
    for module in model.modules():
        cls = type(module)
        if cls not in seen:
            seen[cls] = _interface_call_keywords(cls)
        if seen[cls] is not None:
            yield module, dict(seen[cls])


def window_in_kernel(model: torch.nn.Module) -> bool:
    """Whether every attention module of ``model`` passes the sliding window
    its layer's mask is built with (``config.sliding_window`` on the layers
    that ``config.layer_types`` calls "sliding_attention", or on every layer
    where the config has no layer types, None on the others): then the
    kernel can apply the window in place of the mask. False when any value
    cannot be read or differs, or when no layer has a window."""
    any_window = False
    for module, keywords in _attention_modules(model):
        config = getattr(module, "config", None)
        size = getattr(config, "sliding_window", None)
        if "sliding_window" not in keywords:
            if size is not None:
                return False
            continue
        try:
            value = _value_of(module, keywords["sliding_window"])
        except LookupError:
            return False
        types = getattr(config, "layer_types", None)
        if types is None:
            expected = size
        else:
            index = getattr(module, "layer_idx", None)
            if not isinstance(index, int) or not 0 <= index < len(types):
                return False
            expected = size if types[index] == "sliding_attention" else None
        if value != expected or (value is not None and not (isinstance(value, int) and value > 0)):
            return False
        any_window = any_window or value is not None
    return any_window


def softcap_ignored(model: torch.nn.Module) -> str | None:
    """Why the patched ``model`` computes without the logit softcap its
    attention modules pass (its implementation before the patch ignores it),
    or None."""
    original = _ORIGINAL.get(id(getattr(model, "config", None)))
    if original not in _IGNORE_SOFTCAP:
        return None
    for module, keywords in _attention_modules(model):
        try:
            cap = _value_of(module, keywords.get("softcap", ast.Constant(None)))
        except LookupError:
            continue
        if cap is not None:
            return (f"{type(module).__name__}'s softcap={cap}: attn_implementation={original} "
                    "ignores it, and so does the patched model (load it with "
                    "attn_implementation='eager' to have logit softcapping)")
    return None


def remember_window_in_kernel(model: torch.nn.Module) -> None:
    """Records, for the mask function, the configs of ``model``'s attention
    modules when :func:`window_in_kernel` holds."""
    if not window_in_kernel(model):
        return
    for module, _ in _attention_modules(model):
        config = getattr(module, "config", None)
        if config is not None and id(config) not in _WINDOW_IN_KERNEL:
            weakref.finalize(config, _WINDOW_IN_KERNEL.pop, id(config), None)
            _WINDOW_IN_KERNEL[id(config)] = True


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
    found = False
    for module, keywords in _attention_modules(model):
        cls = type(module)
        found = True
        for arg, expr in keywords.items():
            if arg == "softcap":
                try:
                    cap = _value_of(module, expr)
                except LookupError:
                    cap = ...
                if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
                    reason = (f"{cls.__name__} passes a softcap pyllm cannot read or use "
                              f"(softcap={ast.unparse(expr)})")
                    if reason not in reasons:
                        reasons.append(reason)
                continue
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
    sq, sk = query.shape[2], key.shape[2]
    window = (-1, -1)
    if attention_mask is None and causal:
        # The mask function left the window to the kernel, or the keys are
        # fewer than the window (no effect): bottom-right, as the keys end at
        # the last query (decode, or after the slicing below).
        sliding_window = kwargs.get("sliding_window")
        if sliding_window is not None:
            window = (int(sliding_window) - 1, 0)
    causal = bool(causal) and attention_mask is None and sq > 1
    if causal and sk != sq:
        if sk < sq:
            _warn(f"a causal call with fewer keys ({sk}) than queries ({sq})")
            return _fallback(module, query, key, value, attention_mask, dropout, scaling,
                             is_causal, kwargs)
        # No mask and more keys than queries: sdpa's is_causal, top-left
        # aligned (a static cache's prefill: the keys past the queries are
        # empty slots); its queries see only the first seq_q keys.
        key, value = key[:, :, :sq], value[:, :, :sq]
    softcap = kwargs.get("softcap")
    if _ORIGINAL.get(id(getattr(module, "config", None))) in _IGNORE_SOFTCAP:
        softcap = None  # as the model computed before the patch
    out = pyllm.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          causal=causal, scale=scaling, bias=attention_mask, window_size=window,
                          softcap=float(softcap) if softcap is not None else 0.0,
                          sinks=kwargs.get("s_aux"))
    return out, None


def _is_sliding_causal(mask_function, size) -> bool:
    """Whether ``mask_function`` is transformers' sliding-window causal mask
    of window ``size`` and nothing else (read from its closure; any other
    form, or another transformers' internals, is not)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False

    def cells(fn):
        closure = getattr(fn, "__closure__", None) or ()
        return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in closure)))

    try:
        if (getattr(mask_function, "__module__", None) != masking_utils.__name__
                or mask_function.__qualname__ != "and_masks.<locals>.and_mask"):
            return False
        parts = cells(mask_function).get("mask_functions")
        if not isinstance(parts, tuple) or len(parts) != 2:
            return False
        overlay, causal = parts
        return (causal is masking_utils.causal_mask_function
                and getattr(overlay, "__module__", None) == masking_utils.__name__
                and overlay.__qualname__ == "sliding_window_overlay.<locals>.inner_mask"
                and cells(overlay).get("sliding_window") == size)
    except (AttributeError, ValueError):  # a cell not filled in, a builtin
        return False


def pyllm_mask(*args, mask_function=None, local_size=None, allow_is_causal_skip=True,
               config=None, **kwargs):
    """transformers' ``sdpa_mask`` (bool mask, or None where the causal flag
    says it), except for a sliding-window causal mask of a model whose
    attention modules pass their window (:func:`remember_window_in_kernel`):
    that one is None wherever a plain causal mask would be (no padding), and
    the kernel applies the window from the ``sliding_window`` argument."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if (local_size is not None and allow_is_causal_skip and config is not None
            and _WINDOW_IN_KERNEL.get(id(config)) and _is_sliding_causal(mask_function, local_size)):
        # Without local_size, sdpa_mask skips the mask where it would skip a
        # causal one; where it cannot, it builds the full one (window in it).
        local_size = None
    return sdpa_mask(*args, mask_function=mask_function, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, config=config, **kwargs)


def register() -> bool:
    """Registers "pyllm" with transformers' attention and mask registries;
    False when transformers is not installed."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(IMPLEMENTATION, pyllm_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, pyllm_mask)  # bool masks, None when causal
    _registered = True
    return True
