"""The machine's ceilings, measured once per ``pyllm bench`` run: memory
bandwidth (a large copy, bytes read + written) and matrix throughput (a large
``torch.matmul``), so that each result can be given as a fraction of them.
A ceiling is what the machine reaches at its best, so each is taken from the
faster samples (the 20th percentile of the times), not the median."""

from __future__ import annotations

import dataclasses

import torch

from pyllm.benchmark.timing import measure

__all__ = ["Ceilings", "measure_ceilings"]


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured ceilings: GB/s of a copy, GFLOP/s of matmul per dtype."""

    device: str
    memory_gbps: float
    matmul_gflops: dict


def measure_ceilings(device: str = "cpu", quick: bool = False) -> Ceilings:
    """Copies a 256 MiB buffer (64 MiB when quick) and multiplies 2048x2048
    matrices (1024 when quick) in float32 and bfloat16."""
    nbytes = (64 if quick else 256) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), [()], device=device, min_time=0.2 if quick else 0.5)
    gflops = {}
    n = 1024 if quick else 2048
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        t = measure(lambda: torch.matmul(a, b, out=out), [()], device=device,
                    min_time=0.3 if quick else 1.0, max_samples=50)
        gflops[str(dtype).removeprefix("torch.")] = 2 * n**3 / t.p20 / 1e9
    return Ceilings(device, 2 * nbytes / copy.p20 / 1e9, gflops)
