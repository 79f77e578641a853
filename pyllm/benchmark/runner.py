"""``pyllm bench``: for each case, dtype and backend, check the result against
the float64 reference (a failing kernel is reported as FAIL and not timed),
then time it beside PyTorch's baselines (eager, ``torch.compile``) in the
same run, and report time, GB/s or GFLOP/s, the fraction of the machine's
measured ceilings and the speed-up over each baseline.

Outputs are allocated by every call, by pyllm and by the baselines alike (as
their functional APIs do); inputs rotate through copies larger than the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from typing import Callable

import torch

import pyllm
from pyllm import backend as backend_module
from pyllm.accuracy import judge
from pyllm.benchmark.cases import BENCHES, Case, select
from pyllm.benchmark.machine import Ceilings, measure_ceilings
from pyllm.benchmark.plots import COMPUTE_BOUND, plot
from pyllm.benchmark.timing import input_copies, measure_interleaved

__all__ = ["run", "format_table", "differentiable", "forward_backward"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyllm.__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pyllm_backends_for(op: str, device_type: str, requested: list[str] | None) -> list[str]:
    """The backends to time: those requested, else every kernel backend that
    serves this device here (the reference backend only when asked for)."""
    # an op built on another routed op is timed on that op's backends
    served = backend_module.op_table()[BENCHES[op].routed if hasattr(BENCHES[op], "routed")
                                       else op]
    usable = [b for b, devices in served.items()
              if device_type in devices.split(", ") or devices == backend_module.ANY]
    if requested:
        return requested
    return [b for b in usable if b != "reference"]


class _Progress:
    def __init__(self, total: int, stream):
        self.total, self.done, self.stream = total, 0, stream
        self.live = stream.isatty()

    def step(self, text: str):
        self.done += 1
        if self.live:
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} {text[:60]:<60}")
            self.stream.flush()

    def close(self):
        if self.live:
            self.stream.write("\r" + " " * 100 + "\r")


def _row(case: Case, dtype: str, impl: str, common: dict, **fields) -> dict:
    bench = BENCHES[case.op]
    return {"op": case.op, "model": case.model, "case": case.label, "shape": case.shape_text(),
            "dims": dict(zip(bench.dim_names, case.dims)), "dtype": dtype, "mode": case.mode,
            "implementation": impl, **common, **fields}


def _timed_fields(t, case: Case, dtype, ceilings: Ceilings) -> dict:
    bench = BENCHES[case.op]
    nbytes, flops = bench.bytes_moved(case, DTYPES[dtype]), bench.flops(case)
    if case.mode != "fwd":
        nbytes, flops = int(nbytes * bench.backward_factor), int(flops * bench.backward_factor)
    fields = {"status": "ok", "median_ms": t.median * 1e3, "p20_ms": t.p20 * 1e3,
              "p80_ms": t.p80 * 1e3, "samples": t.samples}
    if nbytes:
        fields["gbps"] = nbytes / t.median / 1e9
        fields["fraction_of_bandwidth"] = fields["gbps"] / ceilings.memory_gbps
    if flops:
        fields["gflops"] = flops / t.median / 1e9
        peak = ceilings.matmul_gflops.get(dtype)
        if peak:
            fields["fraction_of_peak"] = fields["gflops"] / peak
    return fields


def differentiable(inputs: tuple) -> tuple:
    """The inputs as leaves that require grad (floating tensors only)."""
    return tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in inputs)


def forward_backward(fn: Callable, grad: torch.Tensor) -> Callable:
    """fn's forward and the gradients of all its differentiable inputs."""
    def run(*inputs):
        out = fn(*inputs)
        return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor)
                                         and t.requires_grad], grad)
    return run


def _verdict(ours, truths, theirs, factor):
    """The rule on each result; the first failure, else the worst pass."""
    verdicts = [judge(o, t, p, factor=factor) for o, t, p in zip(ours, truths, theirs)]
    failed = [v for v in verdicts if not v.ok]
    return failed[0] if failed else max(verdicts, key=lambda v: v.error)


def _run_case(case: Case, dtype_name: str, device: str, device_type: str, backends, common: dict,
              ceilings: Ceilings, min_time: float) -> list[dict]:
    """Checks, then times, pyllm's backends and PyTorch's baselines on one case."""
    bench, dtype = BENCHES[case.op], DTYPES[dtype_name]
    training = case.mode != "fwd"
    gen = torch.Generator().manual_seed(0)
    first = bench.inputs(case, dtype, device, gen)
    per_set = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    sets = [first] + [bench.inputs(case, dtype, device, gen)
                      for _ in range(input_copies(per_set) - 1)]
    eager = bench.eager(case)
    # The correctness check runs on the case itself, or on its smaller
    # check_dims where the timed sizes' float64 truth would not fit.
    check_case = dataclasses.replace(case, dims=case.check_dims) if case.check_dims else case
    check = first if check_case is case else bench.inputs(check_case, dtype, device, gen)
    if training:
        sets = [differentiable(inputs) for inputs in sets]
        first = sets[0]
        check = first if check_case is case else differentiable(check)
        grad = torch.randn(eager(*first).shape, generator=gen).to(device=device, dtype=dtype)
        check_grad = grad if check_case is case else torch.randn(
            eager(*check).shape, generator=gen).to(device=device, dtype=dtype)
        exact_inputs = differentiable(tuple(
            t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in check))
        truths = forward_backward(lambda *t: bench.truth(check_case, t),
                                  check_grad.double())(*exact_inputs)
        wrap = (lambda fn: forward_backward(fn, grad))
        check_wrap = (lambda fn: forward_backward(fn, check_grad))
        factor = 3.0
    else:
        truths = (bench.truth(check_case, check),)
        wrap = check_wrap = (lambda fn: fn)
        factor = 2.0
    as_tuple = (lambda out: out if training else (out,))
    eager_fn = wrap(eager)
    pytorch_answer = as_tuple(check_wrap(bench.eager(check_case))(*check))
    rows, timed = [], {}
    for name in pyllm_backends_for(case.op, device_type, backends):
        impl = f"pyllm:{name}"
        fn = wrap(bench.pyllm(case, name))
        try:
            verdict = _verdict(as_tuple(check_wrap(bench.pyllm(check_case, name))(*check)),
                               truths, pytorch_answer, factor)
        except (pyllm.BackendError, TypeError, ValueError, RuntimeError) as e:
            rows.append(_row(case, dtype_name, impl, common, status="error", note=str(e)))
            continue
        if not verdict.ok:
            rows.append(_row(case, dtype_name, impl, common, status="FAIL", note=verdict.reason))
            continue
        timed[impl] = (fn, {"error": verdict.error, "error_bound": verdict.bound})
        if not training:  # the same op in batch-invariant mode: its cost (a column)
            with pyllm.batch_invariant():
                verdict = _verdict(as_tuple(bench.pyllm(check_case, name)(*check)), truths,
                                   pytorch_answer, factor)
            if verdict.ok:
                timed[impl + INVARIANT] = (_in_invariant_mode(fn), {})
    timed["torch:eager"] = (eager_fn, {})
    if case.compile_baseline:
        torch._dynamo.reset()
        compiled = wrap(torch.compile(eager, dynamic=False, fullgraph=True))
        compiled(*first)  # compile outside the timing
        timed["torch:compile"] = (compiled, {})
    timings = measure_interleaved({k: fn for k, (fn, _) in timed.items()}, sets, device=device,
                                  min_time=min_time)
    for impl, (_, extra) in timed.items():
        if impl.endswith(INVARIANT):
            continue
        fields = _timed_fields(timings[impl], case, dtype_name, ceilings)
        if impl + INVARIANT in timings:
            invariant_ms = timings[impl + INVARIANT].median * 1e3
            fields.update(invariant_ms=invariant_ms,
                          invariant_cost=invariant_ms / fields["median_ms"])
        rows.append(_row(case, dtype_name, impl, common, **extra, **fields))
    return rows


#: The file in the output folder that holds the rows of the cases finished so
#: far, one JSON object per line (removed once the full results are written).
PARTIAL_ROWS = "rows-so-far.jsonl"

#: The suffix of a pyllm implementation timed in batch-invariant mode.
INVARIANT = " invariant"


def _in_invariant_mode(fn: Callable) -> Callable:
    """fn run in batch-invariant mode (the switch flipped around each call,
    without the context manager's own cost, which would show on 5 us ops)."""
    def run(*inputs):
        pyllm.set_batch_invariant(True)
        try:
            return fn(*inputs)
        finally:
            pyllm.set_batch_invariant(False)
    return run


def plan(ops=None, dtypes=("float32", "bfloat16"), quick=False, suite="default") -> list[dict]:
    """The (case, dtype) pairs a run would time, without running anything."""
    return [{"op": c.op, "model": c.model, "case": c.label, "mode": c.mode, "dtype": d,
             "dims": dict(zip(BENCHES[c.op].dim_names, c.dims)),
             "check_dims": list(c.check_dims) if c.check_dims else None,
             "baselines": ["torch:eager"] + (["torch:compile"] if c.compile_baseline else [])}
            for c in select(ops, quick, suite) for d in dtypes]


def run(ops=None, dtypes=("float32", "bfloat16"), device="cpu", backends=None, quick=False,
        output_dir="bench-results", stream=sys.stdout, suite="default",
        min_time=None, plots=True) -> list[dict]:
    """Runs the benchmark and returns one row per (case, dtype, implementation);
    prints the table and writes JSON, CSV and PNG plots into output_dir.
    ``suite``: "default" (the model shapes) or "gpu" (the GPU acceptance
    shapes); ``min_time``: seconds each implementation is timed per case;
    ``plots``: False writes the JSON and CSV only."""
    # torch.compile imports torch.utils.cpp_extension, which warns on machines
    # without a GPU; the warning is not about pyllm and would clutter the table.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    device_type = torch.device(device).type
    threads = torch.get_num_threads()
    cases = select(ops, quick, suite)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"pyllm bench on {device} ({device_name(device)}), {threads} threads, "
          f"torch {torch.__version__}, pyllm {pyllm.__version__}", file=stream)
    print("measuring the machine's ceilings (a large copy, a large matmul) ...", file=stream)
    ceilings = measure_ceilings(device, quick)
    print(f"  memory bandwidth {ceilings.memory_gbps:.1f} GB/s; matmul " + ", ".join(
        f"{k} {v:.0f} GFLOP/s" for k, v in ceilings.matmul_gflops.items()), file=stream)
    common = {"device": device, "device_name": device_name(device), "threads": threads,
              "torch": torch.__version__, "pyllm": pyllm.__version__, "git_commit": git_commit(),
              "timestamp": stamp, "outputs": "allocated per call",
              "memory_gbps_ceiling": ceilings.memory_gbps}
    if min_time is None:
        min_time = 0.15 if quick else 0.4

    plan = [(c, d) for c in cases for d in dtypes]
    progress = _Progress(len(plan), sys.stderr)
    rows = []
    # Each case's rows are appended here as it finishes, so that a run stopped
    # part-way (a time limit, a crash) still leaves what it measured.
    so_far = None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        so_far = os.path.join(output_dir, PARTIAL_ROWS)
        open(so_far, "w").close()
    for case, dtype_name in plan:
        progress.step(f"{case.name} {dtype_name}")
        try:
            case_rows = _run_case(case, dtype_name, device, device_type, backends, common,
                                  ceilings, min_time)
        except Exception as e:  # noqa: BLE001 - one case's failure is a row, not the end
            case_rows = [_row(case, dtype_name, "-", common, status="error",
                              note=f"{type(e).__name__}: {e}"[:500])]
        baseline = {r["implementation"]: r["median_ms"] for r in case_rows if r["status"] == "ok"}
        for r in case_rows:
            if r["status"] == "ok" and r["implementation"].startswith("pyllm:"):
                r["speedup_vs_eager"] = baseline["torch:eager"] / r["median_ms"]
                if "torch:compile" in baseline:
                    r["speedup_vs_compile"] = baseline["torch:compile"] / r["median_ms"]
        rows.extend(case_rows)
        if so_far:
            with open(so_far, "a") as f:
                for r in case_rows:
                    f.write(json.dumps(r, default=str) + "\n")
    progress.close()
    print(format_table(rows), file=stream)
    if output_dir:
        paths = write_results(rows, output_dir, stamp) + (plot(rows, output_dir) if plots else [])
        os.remove(so_far)
        print("results: " + ", ".join(paths), file=stream)
    return rows


def _rate(r: dict) -> tuple[str, str]:
    """(rate, fraction of its ceiling) for the table: GFLOP/s of compute-bound
    cases, GB/s of the others."""
    compute = "gflops" in r and "gbps" in r and r["gflops"] / r["gbps"] > COMPUTE_BOUND
    if compute or ("gflops" in r and "gbps" not in r):
        frac = f"{100 * r['fraction_of_peak']:3.0f}%" if "fraction_of_peak" in r else ""
        return f"{r['gflops']:6.0f} GF/s", frac
    if "gbps" in r:
        return f"{r['gbps']:6.1f} GB/s", f"{100 * r['fraction_of_bandwidth']:3.0f}%"
    return "", ""


def format_table(rows: list[dict]) -> str:
    """The terminal table: one line per implementation, grouped by case. The
    rate is GFLOP/s for compute-bound cases (with the fraction of the measured
    matmul peak) and GB/s for the others (fraction of the measured copy
    bandwidth). "invariant": the time of the same op in batch-invariant mode
    over its time outside it (forward cases; 1.00x: the mode costs nothing)."""
    header = (f"{'op':<14} {'model':<10} {'case':<13} {'dtype':<9} {'mode':<8} {'implementation':<14} "
              f"{'median':>10} {'p20-p80':>17} {'rate':>12} {'ceil':>5} {'vs eager':>9} "
              f"{'vs compile':>10} {'invariant':>9}")
    lines = [header, "-" * len(header)]
    last = None
    for r in rows:
        key = (r["op"], r["model"], r["case"], r["dtype"], r["mode"])
        if last is not None and key != last:
            lines.append("")
        last = key
        start = f"{r['op']:<14} {r['model']:<10} {r['case']:<13} {r['dtype']:<9} " \
                f"{r['mode']:<8} {r['implementation']:<14} "
        if r["status"] != "ok":
            lines.append(start + f"{r['status']}: {r.get('note', '')}")
            continue
        spread = f"{_us(r['p20_ms'])}-{_us(r['p80_ms'])}"
        rate, frac = _rate(r)
        vs_e = f"{r['speedup_vs_eager']:8.2f}x" if "speedup_vs_eager" in r else f"{'':>9}"
        vs_c = f"{r['speedup_vs_compile']:9.2f}x" if "speedup_vs_compile" in r else f"{'':>10}"
        inv = f"{r['invariant_cost']:8.2f}x" if "invariant_cost" in r else ""
        lines.append((start + f"{_us(r['median_ms']):>10} {spread:>17} {rate:>12} {frac:>5} "
                              f"{vs_e} {vs_c} {inv}").rstrip())
    return "\n".join(lines)


def _us(ms: float) -> str:
    return f"{ms * 1e3:.1f}us" if ms < 1 else f"{ms:.3f}ms"


def write_results(rows: list[dict], output_dir: str, stamp: str) -> list[str]:
    """Writes the rows as JSON and CSV; returns the two paths."""
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, "bench-" + stamp.replace(":", "").replace("+0000", "Z"))
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    fields = sorted({k for r in rows for k in r})
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    return [base + ".json", base + ".csv"]
