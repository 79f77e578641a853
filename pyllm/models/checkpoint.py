"""Hugging Face weights into pyllm models: from a ``transformers`` model object
or a local checkpoint directory (``config.json`` plus ``*.safetensors``,
sharded or not, or ``pytorch_model.bin``), with errors that name the missing
or mismatched tensor.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["read_hf", "load_hf_state", "model_from_hf"]


def read_hf(source) -> tuple[object, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of a ``transformers`` model object or of a
    checkpoint directory. A directory's config is its ``config.json`` as an
    object with attributes; its tensors come from every ``*.safetensors``
    file, else ``pytorch_model*.bin`` (loaded with ``weights_only=True``)."""
    if isinstance(source, nn.Module):
        if not hasattr(source, "config"):
            raise TypeError(f"pyllm from_hf: {type(source).__name__} has no .config; pass a "
                            "transformers model or a checkpoint directory")
        return source.config, source.state_dict()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError("pyllm from_hf: expected a transformers model or a checkpoint directory, "
                        f"got {type(source).__name__}")
    folder = os.fspath(source)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"pyllm from_hf: {folder} has no config.json")
    with open(config_path) as f:
        config = types.SimpleNamespace(**json.load(f))
    names = sorted(os.listdir(folder))
    tensors = [n for n in names if n.endswith(".safetensors")]
    state: dict[str, torch.Tensor] = {}
    if tensors:
        from safetensors.torch import load_file
        for name in tensors:
            state.update(load_file(os.path.join(folder, name)))
    else:
        bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
        if not bins:
            raise FileNotFoundError(f"pyllm from_hf: {folder} has no *.safetensors and no "
                                    "pytorch_model.bin")
        for name in bins:
            state.update(torch.load(os.path.join(folder, name), map_location="cpu",
                                    weights_only=True))
    return config, state


def checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor."""
    for t in state.values():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def load_hf_state(model: nn.Module, state: dict[str, torch.Tensor], owner: str, *,
                  prefixes: Iterable[str] = (), transposed: Callable[[str], bool] = lambda k: False
                  ) -> None:
    """Copies ``state`` into ``model``'s parameters and buffers.

    Each of the model's keys is looked up as it is, and with each of
    ``prefixes`` removed from or added to its front (a ``GPT2Model``
    checkpoint has ``h.0...`` where ``GPT2LMHeadModel`` has
    ``transformer.h.0...``). Keys for which ``transposed(key)`` holds are
    stored ``(in, out)`` in the checkpoint (GPT-2's ``Conv1D``). A tied
    tensor (one shared by several keys, e.g. an LM head tied to the
    embeddings) needs only one of its keys. Raises ``KeyError`` naming the
    first missing tensor, ``ValueError`` naming a shape mismatch.
    """
    ours = model.state_dict()
    prefixes = tuple(prefixes)

    def lookup(key):
        candidates = [key] + [key[len(p) + 1:] if key.startswith(p + ".") else f"{p}.{key}"
                              for p in prefixes]
        return next((c for c in candidates if c in state), None)

    shared: dict[tuple, list[str]] = {}
    for key, tensor in ours.items():
        shared.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(key)
    ties = {key: keys for keys in shared.values() if len(keys) > 1 for key in keys}

    def missing(key):
        return all(lookup(k) is None for k in ties.get(key, [key]))

    loaded = {}
    for key, tensor in ours.items():
        found = lookup(key)
        if found is None:
            if not missing(key):
                continue  # a tied twin is in the checkpoint
            count = sum(1 for k in ours if missing(k))
            raise KeyError(f"{owner}: the checkpoint has no {key} ({count} missing)")
        value = state[found]
        if transposed(key) and value.dim() == 2:
            value = value.t()
        if value.shape != tensor.shape:
            raise ValueError(f"{owner}: {found} has shape {tuple(value.shape)}, expected "
                             f"{tuple(tensor.shape)}")
        loaded[key] = value
    model.load_state_dict(loaded, strict=False)


def model_from_hf(source, build: Callable, owner: str, dtype: torch.dtype | None = None,
                  **load_options) -> nn.Module:
    """The whole ``from_hf``: reads ``source`` (:func:`read_hf`), builds the
    model with ``build(config, state, device=, dtype=)`` on the checkpoint's
    device, in its dtype unless ``dtype`` is given, loads the weights
    (:func:`load_hf_state` with ``load_options``) and returns it in eval mode."""
    config, state = read_hf(source)
    model = build(config, state, device=next(iter(state.values())).device,
                  dtype=dtype or checkpoint_dtype(state))
    load_hf_state(model, state, owner, **load_options)
    return model.eval()
