"""The CPU kernels' output cache.

Outputs of 1 MiB or more that pyllm's CPU kernels allocate come from a cache
of freed outputs, so that a repeated op (a layer in a loop, a decode step)
reuses memory whose pages are already mapped instead of faulting in fresh
pages at first write, which costs more than the kernel itself on large
tensors. The cache holds at most ``PYLLM_CPU_CACHE_MB`` MiB (default: an
eighth of physical memory); beyond it freed outputs go back to the system.
"""

from __future__ import annotations

from pyllm import _C

__all__ = ["empty_cache", "cached_bytes"]


def empty_cache() -> int:
    """Returns the cached CPU output memory to the system; returns the bytes freed
    (as ``torch.cuda.empty_cache`` does for CUDA)."""
    return _C.empty_cache()


def cached_bytes() -> int:
    """Bytes of freed CPU outputs held for reuse."""
    return _C.cache_bytes()
