"""``pyllm.patch``: swap supported modules of an existing model for pyllm's.

A small table maps module types to a constructor of the pyllm module that
takes over the original's parameters (the same ``Parameter`` objects, so
``state_dict`` keys, optimizers and tied weights are unaffected):

- ``torch.nn.LayerNorm`` -> :class:`pyllm.nn.LayerNorm`
- ``torch.nn.RMSNorm`` -> :class:`pyllm.nn.RMSNorm`
- ``torch.nn.Linear`` -> :class:`pyllm.nn.Linear`
- Hugging Face's GPT-2 ``Conv1D`` (matched by class name and its
  ``nf``/``nx``/``weight`` attributes) -> :class:`pyllm.nn.Conv1D`
- Hugging Face RMSNorm classes (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...),
  matched by a class name ending in ``RMSNorm`` with a 1-D ``weight`` and a
  ``variance_epsilon`` or ``eps``, and kept only if a run of both on a random
  input with random weights agrees (``GemmaRMSNorm``, which scales by
  ``1 + weight``, does not) -> :class:`pyllm.nn.RMSNorm`.

Never a changed output: subclasses of the torch classes (their forward may
differ), modules with forward hooks, RMSNorm look-alikes that compute
something else, and a model's attention when it passes what the kernels
cannot honour (softcapping, sinks, a relative position bias:
:func:`pyllm.nn.hf_attention.unsupported`) are left alone, each named in the
report with the reason.

A Hugging Face ``transformers`` model (one with ``set_attn_implementation``)
also gets its attention routed to :func:`pyllm.attention` through the
library's attention-function registry (:mod:`pyllm.nn.hf_attention`).

Nothing in the model's source is rewritten. :func:`unpatch` puts the original
modules (and attention implementation) back.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pyllm.nn.linear import Conv1D, Linear
from pyllm.nn.norm import LayerNorm, RMSNorm

__all__ = ["PatchReport", "patch", "unpatch"]

_ORIGINAL = "_pyllm_original"


def _adopt(new: nn.Module, old: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        value = getattr(old, name)
        if value is None:
            new.register_parameter(name, None)
        else:
            setattr(new, name, value)
    object.__setattr__(new, _ORIGINAL, old)  # not a submodule: stays out of state_dict
    new.train(old.training)
    return new


def _from_layer_norm(m: nn.LayerNorm) -> LayerNorm:
    new = LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, device="meta")
    return _adopt(new, m, ("weight", "bias"))


def _from_rms_norm(m: nn.Module) -> RMSNorm:
    new = RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, device="meta")
    return _adopt(new, m, ("weight",))


def _from_hf_rms_norm(m: nn.Module) -> RMSNorm:
    new = RMSNorm(tuple(m.weight.shape), _hf_eps(m), True, device="meta")
    return _adopt(new, m, ("weight",))


def _from_linear(m: nn.Linear) -> Linear:
    new = Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
    return _adopt(new, m, ("weight", "bias"))


def _from_conv1d(m: nn.Module) -> Conv1D:
    new = Conv1D(m.nf, m.nx, device="meta")
    return _adopt(new, m, ("weight", "bias"))


_BY_TYPE = {nn.LayerNorm: _from_layer_norm, nn.Linear: _from_linear}
if hasattr(nn, "RMSNorm"):
    _BY_TYPE[nn.RMSNorm] = _from_rms_norm


def _converter(m: nn.Module):
    if type(m) in _BY_TYPE:  # exact types: a subclass may compute something else
        return _BY_TYPE[type(m)]
    if (type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and tuple(m.weight.shape) == (m.nx, m.nf)):
        return _from_conv1d
    if (type(m).__name__.endswith("RMSNorm") and _hf_eps(m) is not None
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and not isinstance(m, tuple(_BY_TYPE))):
        return _from_hf_rms_norm  # kept only if it computes what pyllm's does (_same_as_original)
    return None


def _hf_eps(m: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(m, name, None)
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            return float(value)
    return None


def _left_alone(m: nn.Module) -> str | None:
    """Why a module that looks like one pyllm replaces is not replaced (None:
    it is not such a module)."""
    cls = type(m)
    for base in _BY_TYPE:
        if isinstance(m, base) and cls is not base:
            own = cls.forward is not base.forward
            return (f"{cls.__name__} subclasses torch.nn.{base.__name__}"
                    + (" with its own forward" if own else " (it may compute something else)"))
    if cls.__name__.endswith("RMSNorm"):
        return f"{cls.__name__} has no 1-D weight and eps that pyllm.nn.RMSNorm could take"
    return None


def _same_as_original(new: nn.Module, old: nn.Module) -> str | None:
    """Runs the replacement and the original on a small random input (with
    random weights in a copy): None if they agree, else why not. For classes
    matched by name, whose code pyllm does not control."""
    import copy

    weight = old.weight
    gen = torch.Generator().manual_seed(0)
    n = weight.shape[0]
    probe = copy.deepcopy(old)
    device = weight.device
    if device.type == "meta":  # an empty model: the probe runs on the CPU
        device = torch.device("cpu")
        probe = probe.to_empty(device=device)
    probe = probe.float()
    with torch.no_grad():
        probe.weight.copy_(torch.randn(n, generator=gen) + 1.0)
        x = torch.randn(3, n, generator=gen).to(device)
        mine = RMSNorm((n,), new.eps, True, device=device)
        mine.weight.copy_(probe.weight)
        try:
            want, got = probe(x), mine(x)
        except Exception as e:  # noqa: BLE001 - any failure means: leave it alone
            return f"{type(old).__name__} could not be compared ({type(e).__name__}: {e})"
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        return f"{type(old).__name__} computes something else than pyllm.nn.RMSNorm"
    return None


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced: ``(qualified name, original type, pyllm type)``
    per module, and the names of the supported-looking modules it left alone
    with the reason."""

    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for _, old, new in self.replaced:
            counts[(old, new)] = counts.get((old, new), 0) + 1
        lines = [f"pyllm.patch: replaced {len(self.replaced)} modules"]
        lines += [f"  {n} x {old} -> {new}" for (old, new), n in sorted(counts.items())]
        by_reason: dict[str, list[str]] = {}
        for name, why in self.skipped:
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"  kept {shown}: {why}")
        return "\n".join(lines)


def patch(model: nn.Module, *, linear: bool = True, norms: bool = True,
          attention: bool = True, rotary: bool = True, loss: bool = True,
          fused_lm_head: bool = False) -> PatchReport:
    """Replaces, in place, every supported submodule of ``model`` with its
    pyllm counterpart sharing the same parameters.

    Args:
        model: any ``torch.nn.Module`` (a Hugging Face ``transformers`` model
            too). The root module itself is not replaced, only its descendants.
        linear: replace ``torch.nn.Linear`` (and GPT-2 ``Conv1D``) modules.
        norms: replace LayerNorm / RMSNorm modules.
        attention: for a ``transformers`` model, select the "pyllm" attention
            implementation.
        rotary: for a ``transformers`` model whose modeling module has LLaMA's
            ``apply_rotary_pos_emb``, run it on :func:`pyllm.rotary`
            (:mod:`pyllm.nn.hf_rotary`; that module's models process-wide).
        loss: for a ``transformers`` causal LM whose loss function is
            ``ForCausalLMLoss``, compute its training loss with
            :func:`pyllm.cross_entropy` (:mod:`pyllm.nn.hf_loss`).
        fused_lm_head: opt-in, for a ``transformers`` causal LM whose forward
            is LLaMA's: in training mode with labels, the LM head and the loss
            fused (:func:`pyllm.linear_cross_entropy`, no ``tokens x vocab``
            logits) and the output's ``logits`` None
            (:mod:`pyllm.nn.hf_lm_head`). The only option that changes an
            output, hence off by default.

    Returns:
        A :class:`PatchReport` (``print`` it for a summary).
    """
    report = PatchReport()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, _ORIGINAL):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            convert = _converter(child)
            if convert is None:
                why = _left_alone(child)
                if why is not None and not any(isinstance(child, t) for t in
                                               (Linear, LayerNorm, RMSNorm, Conv1D)):
                    report.skipped.append((name, why))
                continue
            is_linear = convert in (_from_linear, _from_conv1d)
            if (is_linear and not linear) or (not is_linear and not norms):
                continue
            if child._forward_hooks or child._forward_pre_hooks:
                report.skipped.append((name, "has forward hooks"))
                continue
            new = convert(child)
            if convert is _from_hf_rms_norm:
                why = _same_as_original(new, child)
                if why is not None:
                    report.skipped.append((name, why))
                    continue
            setattr(parent, child_name, new)
            report.replaced.append((name, type(child).__name__, f"pyllm.nn.{type(new).__name__}"))
    if attention and hasattr(model, "set_attn_implementation") and hasattr(model, "config"):
        _patch_attention(model, report)
    if rotary and hasattr(model, "config") and "_pyllm_rotary_modules" not in model.__dict__:
        from pyllm.nn import hf_rotary

        swapped, skipped = hf_rotary.patch(model)
        report.replaced += [(f"{name}.apply_rotary_pos_emb", "apply_rotary_pos_emb",
                             "pyllm.rotary") for name in swapped]
        report.skipped += skipped
    if loss and hasattr(model, "config") and type(model).__name__.endswith("ForCausalLM"):
        from pyllm.nn import hf_loss

        patched, why = hf_loss.patch(model)
        if patched:
            report.replaced.append(("loss_function", "ForCausalLMLoss", "pyllm.cross_entropy"))
        elif why is not None:
            report.skipped.append(("loss_function", why))
    if fused_lm_head and hasattr(model, "config") and hasattr(model, "lm_head"):
        from pyllm.nn import hf_lm_head

        patched, why = hf_lm_head.patch(model)
        if patched:
            report.replaced.append(("forward (training with labels)", "lm_head + loss",
                                    "pyllm.linear_cross_entropy"))
        elif why is not None:
            report.skipped.append(("lm_head", why))
    elif fused_lm_head:
        report.skipped.append(("lm_head", "not a transformers model with an lm_head"))
    return report


def _patch_attention(model: nn.Module, report: PatchReport) -> None:
    from pyllm.nn import hf_attention

    previous = getattr(model.config, "_attn_implementation", None)
    if previous == hf_attention.IMPLEMENTATION or not hf_attention.register():
        return
    reasons = hf_attention.unsupported(model)
    if reasons:
        report.skipped.append((f"attention (attn_implementation={previous})",
                               "; ".join(reasons)))
        return
    hf_attention.remember_original(model.config, previous, model)
    hf_attention.remember_window_in_kernel(model)
    model.set_attn_implementation(hf_attention.IMPLEMENTATION)
    if getattr(model.config, "_attn_implementation", None) != hf_attention.IMPLEMENTATION:
        report.skipped.append((f"attention (attn_implementation={previous})",
                               "the model did not take another attention implementation"))
        return
    object.__setattr__(model, "_pyllm_original_attention", previous)
    report.replaced.append(("attention", f"attn_implementation={previous}", "pyllm.attention"))
    ignored = hf_attention.softcap_ignored(model)
    if ignored is not None:
        report.skipped.append(("attention softcap", ignored))


def unpatch(model: nn.Module) -> int:
    """Puts back every original module that :func:`patch` replaced in
    ``model``; returns how many."""
    restored = 0
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            original = getattr(child, _ORIGINAL, None)
            if original is not None:
                setattr(parent, child_name, original)
                restored += 1
    from pyllm.nn import hf_rotary

    restored += hf_rotary.unpatch(model)
    from pyllm.nn import hf_loss

    restored += hf_loss.unpatch(model)
    from pyllm.nn import hf_lm_head

    restored += hf_lm_head.unpatch(model)
    previous = model.__dict__.pop("_pyllm_original_attention", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        restored += 1
    return restored
