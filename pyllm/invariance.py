"""Batch-invariant mode: the same bits for a row whatever else is in the batch.

Serving and RL stacks need a request's output not to depend on how requests
were batched. In this mode every pyllm op gives each row, token or sequence
bitwise the same result whatever:

- the batch size and the row's position in the batch;
- the other sequences' lengths (varlen);
- whether the token comes in a prefill or in a decode step (a KV-cache path
  against the full forward).

What the kernels give up for it (``pyllm bench`` shows the cost per op):

- GEMM (linear, swiglu, the LM head): one path for every number of rows. On
  the CPU the blocked kernel (the skinny and GEMV kernels of 1-16 rows reduce
  in another order); in Triton one fixed tile instead of the autotuned one.
  The CUDA GEMM sums every output the same way in either of its tiles (K in
  steps of 32, no split-K), so it is unchanged.
- Attention: no split-KV decode (its splits depend on the batch and the
  thread count); a decode query goes through the prefill kernel, and a
  sliding window's first key block is aligned to a multiple of the block
  size, so that a query's keys fall into the same blocks in every call.
- Norms, rotary, cross-entropy and the paged-cache append already compute a
  row the same way wherever it is.

It covers forward results. Gradients of weights sum over the batch and are
not per-row quantities; they keep their deterministic (run-to-run) order.

The mode is one process-wide switch, read when an op runs (like
``torch.use_deterministic_algorithms``); it is not saved into compiled
graphs, so a ``torch.compile``-d model follows the switch at run time.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

_enabled = False


def is_batch_invariant() -> bool:
    """Whether batch-invariant mode is on."""
    return _enabled


def set_batch_invariant(enabled: bool) -> None:
    """Turns batch-invariant mode on or off for every backend (the C++ CPU and
    CUDA kernels and the Triton launchers)."""
    global _enabled
    _enabled = bool(enabled)
    for name in ("pyllm._C", "pyllm._C_cuda"):
        module = sys.modules.get(name)  # loaded by pyllm's import, when built
        if module is not None:
            module.set_batch_invariant(_enabled)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Runs the block in batch-invariant mode (or out of it, ``enabled=False``),
    restoring the previous setting afterwards. Also usable as a decorator.

    Example::

        with pyllm.batch_invariant():
            logits = model(ids)   # row i's logits are the same bits for any batch
    """
    previous = _enabled
    set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(previous)
