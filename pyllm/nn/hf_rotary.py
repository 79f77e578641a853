"""Hugging Face ``transformers`` rotary embeddings on :func:`pyllm.rotary`.

transformers' attention modules call a module-level ``apply_rotary_pos_emb(q,
k, cos, sin, unsqueeze_dim=1)`` of their modeling module. :func:`patch` swaps
that global for :func:`pyllm_apply_rotary_pos_emb` in the modeling modules of a
model, only where the module's ``apply_rotary_pos_emb`` and ``rotate_half`` are
LLaMA's, statement for statement (Qwen2/3, Mistral, Gemma, ... copy them): the
function is then known to compute ``q * cos + rotate_half(q) * sin`` with
GPT-NeoX pairs, and the cos/sin it receives are the model's own (any rope
scaling is already in them). A probe on random inputs must agree with the
original before the swap.

At call time the kernel runs when cos/sin are ``(batch or 1, seq, head_dim)``
with duplicated halves' layout (what the rotary embedding modules return),
q/k floating point of a kernel dtype; anything else goes to the original
function. The swap is per modeling module (every model of that class in the
process sees it); :func:`unpatch` puts the original back when the last patched
model that needed it is unpatched.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap

import torch

import pyllm

__all__ = ["patch", "unpatch"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# modeling module name -> [original function, number of patched models using it]
_SWAPPED: dict[str, list] = {}


def _body(fn) -> str | None:
    """The function's AST without docstring and decorators (None if unreadable)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(tree, ast.FunctionDef):
        return None
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    tree.body, tree.decorator_list = body, []
    return ast.dump(tree)


def _canonical():
    try:
        from transformers.models.llama import modeling_llama
    except ImportError:
        return None
    fn = modeling_llama.apply_rotary_pos_emb
    fn = getattr(fn, "_pyllm_original", fn)  # LLaMA's own, swapped or not
    return _body(fn), _body(modeling_llama.rotate_half)


def _is_llamas(module) -> bool:
    canonical = _canonical()
    fn, half = getattr(module, "apply_rotary_pos_emb", None), getattr(module, "rotate_half", None)
    if canonical is None or fn is None or half is None or getattr(fn, "_pyllm_original", None):
        return False
    return (_body(fn), _body(half)) == canonical


def _make(original):
    def pyllm_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        """transformers' apply_rotary_pos_emb on pyllm's fused kernel (new
        tensors, as the original returns); other calls go to the original."""
        if args or kwargs or not _fits(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        b, s, d = cos.shape
        half = d // 2
        batch = q.shape[0]
        cos_t = cos[..., :half].reshape(b * s, half).float()
        sin_t = sin[..., :half].reshape(b * s, half).float()
        rows = torch.arange(b * s, device=q.device).view(b, s)
        positions = rows.expand(batch, s) if b == 1 else rows
        if unsqueeze_dim == 1:  # q (batch, heads, seq, head_dim)
            rq, rk = pyllm.rotary(q.transpose(1, 2), k.transpose(1, 2), cos_t, sin_t,
                                  positions.contiguous(), inplace=False)
            return rq.transpose(1, 2), rk.transpose(1, 2)
        return pyllm.rotary(q, k, cos_t, sin_t, positions.contiguous(), inplace=False)

    pyllm_apply_rotary_pos_emb._pyllm_original = original
    return pyllm_apply_rotary_pos_emb


def _fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    if q.dtype not in _KERNEL_DTYPES or k.dtype != q.dtype or not cos.is_floating_point():
        return False
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        return False
    seq_dim = {1: 2, 2: 1}.get(unsqueeze_dim)
    if seq_dim is None:
        return False
    b, s, d = cos.shape
    if d != q.shape[-1] or d != k.shape[-1] or d % 2 or s != q.shape[seq_dim] or \
            s != k.shape[seq_dim] or b not in (1, q.shape[0]) or k.shape[0] != q.shape[0]:
        return False
    return q.shape[-1] == 1 or q.stride(-1) == 1


def _agrees(original, replacement) -> bool:
    """Both give the same answer (float32, within rounding) on random inputs."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16, generator=gen), torch.randn(2, 2, 7, 16, generator=gen)
    angles = torch.rand(2, 7, 8, generator=gen) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want, got = original(q, k, cos, sin), replacement(q, k, cos, sin)
    return all(torch.allclose(w, g, rtol=1e-5, atol=1e-6) for w, g in zip(want, got))


def patch(model: torch.nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    """Swaps ``apply_rotary_pos_emb`` in the modeling modules of ``model``'s
    submodules; returns (the modules swapped, [(module, why left alone)])."""
    names = {type(m).__module__ for m in model.modules()}
    swapped, skipped = [], []
    for name in sorted(names):
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if module is None or fn is None:
            continue
        if name in _SWAPPED and fn is not _SWAPPED[name][0]:
            _SWAPPED[name][1] += 1
            swapped.append(name)
            continue
        if not _is_llamas(module):
            skipped.append((f"{name}.apply_rotary_pos_emb",
                            "not LLaMA's apply_rotary_pos_emb/rotate_half (rotary left as is)"))
            continue
        replacement = _make(fn)
        if not _agrees(fn, replacement):
            skipped.append((f"{name}.apply_rotary_pos_emb",
                            "a random probe disagreed with the original (rotary left as is)"))
            continue
        module.apply_rotary_pos_emb = replacement
        _SWAPPED[name] = [fn, 1]
        swapped.append(name)
    if swapped:
        object.__setattr__(model, "_pyllm_rotary_modules", swapped)
    return swapped, skipped


def unpatch(model: torch.nn.Module) -> int:
    """Releases ``model``'s use of the swapped functions, putting each original
    back once no other patched model uses it; returns how many the model
    released (one per modeling module, as its patch report counted)."""
    released = 0
    for name in model.__dict__.pop("_pyllm_rotary_modules", []):
        entry = _SWAPPED.get(name)
        if entry is None:
            continue
        released += 1
        entry[1] -= 1
        if entry[1] == 0:
            module = sys.modules.get(name)
            if module is not None:
                module.apply_rotary_pos_emb = entry[0]
            del _SWAPPED[name]
    return released
