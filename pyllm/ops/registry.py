"""The one table of pyllm's routed ops, filled by the op modules themselves.

Each op module (``pyllm/ops/<op>.py``) calls :func:`declare` once per routed
op: that registers the op's fake kernels (shapes for ``torch.compile`` and
FakeTensor) for both of its names (``pyllm::<op>`` and ``pyllm::<op>_triton``,
see csrc/ops.cpp) and adds the op to the table that routing
(:mod:`pyllm.backend`) and ``pyllm info`` read: the dtypes its kernels take and
the function of :mod:`pyllm.reference` with the op's signature.
"""

from __future__ import annotations

import torch

__all__ = ["KERNEL_DTYPES", "OPS", "declare"]

KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

#: op -> {"dtypes": the dtypes the kernels take, "reference": the name of the
#: pyllm.reference function with the op's signature}.
OPS: dict[str, dict] = {}


def declare(op: str, *, fake, reference: str | None = None, dtypes=KERNEL_DTYPES,
            helpers: dict | None = None) -> None:
    """Declares the routed op ``op``.

    Args:
        op: the schema's name in csrc/ops.cpp.
        fake: its fake kernel (same signature; checks arguments, returns empty
            tensors of the outputs' shapes, or None for an op that only mutates).
        reference: the :mod:`pyllm.reference` function with the op's signature
            (default: ``op``).
        dtypes: the dtypes its kernels take.
        helpers: fake kernels of the op's helper ops, not routed themselves
            (its backward ops): ``{name: fake}``.
    """
    for name, fn in {op: fake, **(helpers or {})}.items():
        for suffix in ("", "_triton"):
            # _stacklevel: recorded as registered by the op module that called
            # here (csrc/ops.cpp names it with set_python_module).
            torch.library.register_fake(f"pyllm::{name}{suffix}", fn, _stacklevel=2)
    OPS[op] = {"dtypes": frozenset(dtypes), "reference": reference or op}
