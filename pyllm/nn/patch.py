"""``pyllm.patch``: swap supported modules of an existing model for pyllm's.

A small table maps module types to a constructor of the pyllm module that
takes over the original's parameters (the same ``Parameter`` objects, so
``state_dict`` keys, optimizers and tied weights are unaffected):

- ``torch.nn.LayerNorm`` -> :class:`pyllm.nn.LayerNorm`
- ``torch.nn.RMSNorm`` -> :class:`pyllm.nn.RMSNorm`
- ``torch.nn.Linear`` -> :class:`pyllm.nn.Linear`
- Hugging Face's GPT-2 ``Conv1D`` (matched by class name and its
  ``nf``/``nx``/``weight`` attributes) -> :class:`pyllm.nn.Conv1D`
- Hugging Face RMSNorm classes (``LlamaRMSNorm``, ``MistralRMSNorm``,
  ``Qwen2RMSNorm``, ``GemmaRMSNorm`` excluded: it scales by ``1 + weight``),
  matched by class name and their ``weight`` / ``variance_epsilon`` attributes
  -> :class:`pyllm.nn.RMSNorm`.

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
    new = RMSNorm(tuple(m.weight.shape), float(m.variance_epsilon), True, device="meta")
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
_HF_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "PhiRMSNorm")


def _converter(m: nn.Module):
    if type(m) in _BY_TYPE:  # exact types: a subclass may compute something else
        return _BY_TYPE[type(m)]
    if (type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and tuple(m.weight.shape) == (m.nx, m.nf)):
        return _from_conv1d
    if (type(m).__name__ in _HF_RMS_NORMS and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), torch.Tensor)):
        return _from_hf_rms_norm
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
        lines += [f"  kept {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def patch(model: nn.Module, *, linear: bool = True, norms: bool = True,
          attention: bool = True) -> PatchReport:
    """Replaces, in place, every supported submodule of ``model`` with its
    pyllm counterpart sharing the same parameters.

    Args:
        model: any ``torch.nn.Module`` (a Hugging Face ``transformers`` model
            too). The root module itself is not replaced, only its descendants.
        linear: replace ``torch.nn.Linear`` (and GPT-2 ``Conv1D``) modules.
        norms: replace LayerNorm / RMSNorm modules.
        attention: for a ``transformers`` model, select the "pyllm" attention
            implementation.

    Returns:
        A :class:`PatchReport` (``print`` it for a summary).
    """
    report = PatchReport()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            convert = _converter(child)
            if convert is None or hasattr(child, _ORIGINAL):
                continue
            is_linear = convert in (_from_linear, _from_conv1d)
            if (is_linear and not linear) or (not is_linear and not norms):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child._forward_hooks or child._forward_pre_hooks:
                report.skipped.append((name, "has forward hooks"))
                continue
            new = convert(child)
            setattr(parent, child_name, new)
            report.replaced.append((name, type(child).__name__, f"pyllm.nn.{type(new).__name__}"))
    if attention and hasattr(model, "set_attn_implementation") and hasattr(model, "config"):
        from pyllm.nn import hf_attention
        previous = getattr(model.config, "_attn_implementation", None)
        if previous != hf_attention.IMPLEMENTATION and hf_attention.register():
            model.set_attn_implementation(hf_attention.IMPLEMENTATION)
            object.__setattr__(model, "_pyllm_original_attention", previous)
            report.replaced.append(("attention", f"attn_implementation={previous}",
                                    "pyllm.attention"))
    return report


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
    previous = model.__dict__.pop("_pyllm_original_attention", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        restored += 1
    return restored
