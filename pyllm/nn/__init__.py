"""Drop-in PyTorch modules on pyllm's kernels, and :func:`patch` to swap them
into an existing model.

- :class:`LayerNorm`, :class:`RMSNorm`: as ``torch.nn.LayerNorm`` /
  ``torch.nn.RMSNorm`` (same arguments, attributes, ``state_dict`` keys), plus
  ``forward(x, residual)`` -> ``(norm(x + residual), x + residual)`` fused.
- :class:`Linear`: ``torch.nn.Linear`` with a fused ``activation``;
  :class:`Conv1D`: Hugging Face's GPT-2 ``Conv1D`` (weight stored (in, out)).
- :class:`SwiGLU`: the LLaMA MLP block.
- :class:`Attention` (self/cross, causal, GQA, rotary, :class:`KVCache` or
  :class:`PagedKVCache`),
  :class:`RotaryEmbedding`; :class:`MultiheadAttention` with
  ``torch.nn.MultiheadAttention``'s interface (need_weights=False).
- :func:`patch` / :func:`unpatch`: swap supported modules in place and back.
- :func:`pack_for_inference`: pack every ``Linear``/``Conv1D``/``SwiGLU``/
  ``Attention`` weight for CPU inference (each module's ``pack()``).
"""

from pyllm.nn.attention import Attention, KVCache, MultiheadAttention, RotaryEmbedding
from pyllm.nn.linear import Conv1D, Linear, SwiGLU
from pyllm.nn.norm import LayerNorm, RMSNorm
from pyllm.nn.packing import PackReport, pack_for_inference
from pyllm.nn.paged_kv_cache import PagedKVCache
from pyllm.nn.patch import PatchReport, patch, unpatch

__all__ = ["Attention", "Conv1D", "KVCache", "LayerNorm", "Linear", "MultiheadAttention",
           "PackReport", "PagedKVCache", "PatchReport",
           "RMSNorm", "RotaryEmbedding", "SwiGLU", "pack_for_inference", "patch", "unpatch"]
