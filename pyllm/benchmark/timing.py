"""Timing one callable: warm-up, many samples, median and 20/80 percentiles.

Inputs rotate through several copies so that an input that fits in the cache
is not timed from the cache; implementations compared with each other are
timed interleaved, sample by sample. On CUDA, samples are timed with events; on the
CPU with ``time.perf_counter`` around a batch of calls sized to ~200 us.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["Timing", "measure", "measure_interleaved", "input_copies"]

#: Input sets rotate until together they exceed this many bytes (beyond L3).
ROTATE_BYTES = 96 * 2**20
MAX_COPIES = 16


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th/80th percentiles over ``samples``."""

    median: float
    p20: float
    p80: float
    samples: int
    calls_per_sample: int


def input_copies(nbytes: int) -> int:
    """How many copies of an input set of ``nbytes`` to rotate through."""
    if nbytes <= 0:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q * 100) - 1]


def measure(fn: Callable, input_sets: Sequence[tuple], *, device: str = "cpu",
            min_time: float = 0.4, warmup_time: float = 0.05, max_samples: int = 200) -> Timing:
    """Times ``fn(*input_sets[i])``, rotating ``i`` over the sets."""
    return measure_interleaved({"fn": fn}, input_sets, device=device, min_time=min_time,
                               warmup_time=warmup_time, max_samples=max_samples)["fn"]


def measure_interleaved(fns: dict[str, Callable], input_sets: Sequence[tuple], *,
                        device: str = "cpu", min_time: float = 0.4, warmup_time: float = 0.05,
                        max_samples: int = 200) -> dict[str, Timing]:
    """Times several implementations of one computation, alternating between
    them sample by sample so that drift in the machine's speed (other load,
    frequency, memory state) affects them alike. Each gets about ``min_time``
    seconds of samples; returns a Timing per name."""
    count = len(input_sets)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    plans = {}
    for name, fn in fns.items():
        # Warm-up, which also estimates the time of one call.
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < warmup_time:
            fn(*input_sets[calls % count])
            calls += 1
            sync()
        per_call = max((time.perf_counter() - start) / calls, 1e-7)
        batch = max(1, int(2e-4 / per_call))
        samples = int(min(max_samples, max(10, min_time / (per_call * batch))))
        plans[name] = (fn, batch, samples)

    times = {name: [] for name in fns}
    # One cursor for all implementations: each call reads the input set after
    # the previous call's, whichever implementation made it. (A cursor per
    # implementation had each round's later implementations read the sets the
    # first had just brought into the cache: the first was timed from memory,
    # the others from the cache.)
    i = 0
    rounds = max(samples for _, _, samples in plans.values())
    for _ in range(rounds):
        for name, (fn, batch, samples) in plans.items():
            if len(times[name]) >= samples:
                continue
            if cuda:
                begin = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(batch):
                    fn(*input_sets[i % count])
                    i += 1
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3 / batch)
            else:
                t0 = time.perf_counter()
                for _ in range(batch):
                    fn(*input_sets[i % count])
                    i += 1
                times[name].append((time.perf_counter() - t0) / batch)
    result = {}
    for name, samples in times.items():
        samples.sort()
        result[name] = Timing(statistics.median(samples), _quantile(samples, 0.2),
                              _quantile(samples, 0.8), len(samples), plans[name][1])
    return result
