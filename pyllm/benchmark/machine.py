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


def _matmul_gflops(dtype: torch.dtype, device: str, n_max: int, call_budget: float,
                   min_time: float) -> float:
    """GFLOP/s of ``torch.matmul`` on n x n matrices of ``dtype``: n is the
    largest power of two up to ``n_max`` whose call is predicted to take at
    most ``call_budget`` seconds (from a call at n = 256), so that a dtype the
    machine computes slowly (bfloat16 on a CPU without bf16 instructions: ~1
    GFLOP/s, 20 s per 2048^3 call) is measured in seconds, not minutes."""
    def operands(n):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return a, b, torch.empty(n, n, device=device, dtype=dtype)

    n = 256
    a, b, out = operands(n)
    probe = measure(lambda: torch.matmul(a, b, out=out), [()], device=device, min_time=0.0,
                    warmup_time=0.0, max_samples=3)
    while n * 2 <= n_max and probe.p20 * (n * 2 / 256) ** 3 <= call_budget:
        n *= 2
    if n != 256:
        a, b, out = operands(n)
    t = measure(lambda: torch.matmul(a, b, out=out), [()], device=device, min_time=min_time,
                max_samples=50)
    return 2 * n**3 / t.p20 / 1e9


def measure_ceilings(device: str = "cpu", quick: bool = False) -> Ceilings:
    """Copies a 256 MiB buffer (64 MiB when quick) and multiplies matrices of
    up to 2048x2048 (1024 when quick; smaller where one call would take over
    0.2 s) in float32 and bfloat16.

    The bfloat16 ceiling is the larger of the two rates: a bfloat16 product
    can always be computed in float32 (widening is exact), so where the
    machine's bfloat16 matmul is slower than its float32 one (a CPU without
    bf16 instructions), float32's rate is what the machine reaches at its
    best for bfloat16 inputs."""
    nbytes = (64 if quick else 256) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), [()], device=device, min_time=0.2 if quick else 0.5)
    n_max = 1024 if quick else 2048
    min_time = 0.3 if quick else 1.0
    gflops = {}
    for dtype in (torch.float32, torch.bfloat16):
        gflops[str(dtype).removeprefix("torch.")] = _matmul_gflops(dtype, device, n_max, 0.2,
                                                                   min_time)
    gflops["bfloat16"] = max(gflops["bfloat16"], gflops["float32"])
    return Ceilings(device, 2 * nbytes / copy.p20 / 1e9, gflops)
