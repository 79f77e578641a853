"""pyllm: fused Transformer kernels registered as PyTorch operators.

Attention, LayerNorm/RMSNorm and GEMM kernels in C++ for the CPU, CUDA C++ and
Triton, exposed as ``torch.ops.pyllm.*`` and as the documented functions here,
with a pure-PyTorch reference (:mod:`pyllm.reference`) for each.

Example::

    import torch, pyllm
    x = torch.randn(8, 4096, dtype=torch.bfloat16)
    w = torch.ones(4096, dtype=torch.bfloat16)
    y = pyllm.rms_norm(x, w, eps=1e-6)            # fastest backend for x's device
    y = pyllm.rms_norm(x, w, backend="reference")  # or name one
    pyllm.backends()                                # what this install has

Backend choice: :mod:`pyllm.backend`.
"""

from __future__ import annotations

import importlib.util as _importlib_util

from pyllm import _extension

_extension.load()

from pyllm import backend  # noqa: E402
from pyllm.backend import BackendError, backends, current_backend, use_backend  # noqa: E402
from pyllm.memory import cached_bytes, empty_cache  # noqa: E402
from pyllm.invariance import batch_invariant, is_batch_invariant, set_batch_invariant  # noqa: E402
import pyllm.ops  # noqa: E402,F401  (registers the fake kernels and autograd)
from pyllm.ops.attention import attention, attention_paged, attention_varlen  # noqa: E402
from pyllm.ops.layer_norm import add_layer_norm, layer_norm  # noqa: E402
from pyllm.ops.linear import linear, swiglu  # noqa: E402
from pyllm.ops.packed_linear import linear_packed, pack_weight, swiglu_packed  # noqa: E402
from pyllm.ops.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from pyllm.ops.rotary import rotary, rotary_tables  # noqa: E402
from pyllm.ops.paged_kv import paged_kv_append, paged_slots  # noqa: E402
from pyllm.ops.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402
from pyllm import nn  # noqa: E402
from pyllm.nn import patch, unpatch  # noqa: E402

__version__ = "0.1.0"

# The Triton kernels register themselves wherever Triton is installed (so that
# `pyllm info` shows them); they run with a CUDA device, or on CPU tensors in
# the Triton interpreter (TRITON_INTERPRET=1 before import).
if _importlib_util.find_spec("triton") is not None:
    import pyllm.kernels  # noqa: E402,F401

backend.refresh()

__all__ = [
    "BackendError",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "attention_varlen",
    "attention_paged",
    "batch_invariant",
    "cross_entropy",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "linear_packed",
    "pack_weight",
    "nn",
    "paged_kv_append",
    "paged_slots",
    "patch",
    "backend",
    "backends",
    "cached_bytes",
    "current_backend",
    "empty_cache",
    "is_batch_invariant",
    "rms_norm",
    "swiglu_packed",
    "rotary",
    "rotary_tables",
    "set_batch_invariant",
    "swiglu",
    "unpatch",
    "use_backend",
    "__version__",
]
