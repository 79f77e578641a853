"""The GPU acceptance run: one command that builds pyllm on a CUDA machine and
proves it there.

    python tools/gpu_check.py --out DIR          # or: make gpu-check OUT=DIR
    python tools/gpu_check.py --out DIR --dry-run   # everything but the device

For a machine with a CUDA GPU, a preinstalled torch (2.11-2.15) and Triton,
and no network: nothing is downloaded, no virtual environment is made.
Stages, each timed and logged:

1. environment: Python, torch, CUDA, Triton, nvcc, the GPU and its compute
   capability, compute-sanitizer.
2. build: ``pip install --no-build-isolation --no-deps -e .`` against the
   machine's own python, for the visible GPU's arch only
   (``TORCH_CUDA_ARCH_LIST`` from ``torch.cuda.get_device_capability()``),
   with every core (``MAX_JOBS``); then the build record is checked.
3. tests: every ``cuda``-marked test (the Triton and CUDA C++ backends on CUDA
   tensors, forward and backward, against the float64 reference), JUnit XML;
   in several pytest-xdist processes where xdist is installed and there are
   4 cores or more (Triton compiles each kernel on first use).
4. sanitizer: ``compute-sanitizer --tool memcheck`` over tools/kernel_calls.py
   (a small call of every kernel of both GPU backends), when it is on PATH.
5. bench: ``pyllm bench --suite gpu --device cuda`` in bfloat16:
   FlashAttention's shapes, decode over 4k-32k keys, the norms at 4096x8192,
   GEMMs at 4096^3 and Llama-3-8B's projections, against SDPA's flash
   backend, cuBLAS (F.linear), F.rms_norm/F.layer_norm and torch.compile,
   with TFLOP/s, TB/s and the fraction of the device's measured peak.

Everything goes to DIR: report.json, summary.md, junit.xml, build.log,
tests.log, sanitizer.log, bench.log and bench/ (the bench's JSON and CSV);
the last lines printed are a one-screen summary ending in PASS or FAIL (exit
status 0 or 1). A bench stopped by its time limit still reports the cases it
finished (the bench appends each case's rows to bench/rows-so-far.jsonl).
``--budget`` (default 540 s) bounds the whole run: each stage's time limit is
its share of what the budget leaves. ``--stages`` runs some of the stages
(e.g. ``--stages tests,sanitizer`` to rerun them against the pyllm already
importable, without the build).

``--dry-run`` (on a machine without a GPU) does everything that needs no
device: the environment record, the real build (for ``--arch``, default
9.0), the selection of the tests (collected, not run), the sanitizer's call
list run on the CPU backend, the bench plan (``pyllm bench --list``), and
the report skeleton with each device stage marked "planned".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

#: The stages, in order; --stages runs some of them (the environment record
#: always runs).
STAGES = ("build", "tests", "sanitizer", "bench")
#: Each stage's weight in the budget: a stage's time limit is what is left of
#: the budget times its weight over the weights of itself and the selected
#: stages after it. From the first H200 run (16 cores): the build took 136 s,
#: the tests 142 s, the sanitizer's calls under 80 s, the bench 139 s; the
#: build gets the most slack, as nothing runs without it.
STAGE_WEIGHTS = {"build": 200, "tests": 160, "sanitizer": 110, "bench": 150}
#: Seconds each implementation is timed per bench case on the GPU.
BENCH_MIN_TIME = 0.1


class Report:
    """The stages' results, written as report.json and summary.md."""

    def __init__(self, out: str, dry_run: bool, budget: float, stages=STAGES):
        self.out = out
        self.dry_run = dry_run
        self.start = time.time()
        self.budget = budget
        self.stages = list(stages)
        self.data = {"dry_run": dry_run, "started": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "stages": {}}

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def share(self, stage: str) -> float:
        """Seconds for ``stage``: its weighted share of what is left, among it
        and the selected stages after it."""
        later = self.stages[self.stages.index(stage):]
        return self.left() * STAGE_WEIGHTS[stage] / sum(STAGE_WEIGHTS[s] for s in later)

    def stage(self, name: str, status: str, seconds: float, **fields):
        self.data["stages"][name] = {"status": status, "seconds": round(seconds, 1), **fields}
        print(f"[{name}] {status} ({seconds:.0f} s)"
              + (f": {fields['detail']}" if fields.get("detail") else ""), flush=True)

    def ok(self) -> bool:
        good = ("pass", "planned", "skipped")
        return bool(self.data["stages"]) and all(
            s["status"] in good for s in self.data["stages"].values())

    def write(self) -> str:
        self.data["seconds"] = round(time.time() - self.start, 1)
        self.data["result"] = "PASS" if self.ok() else "FAIL"
        with open(os.path.join(self.out, "report.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        text = self.summary()
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(text + "\n")
        return text

    def summary(self, bench_table: bool = True) -> str:
        env = self.data.get("environment", {})
        kind = "GPU acceptance run (dry run: no device used)" if self.dry_run else \
            "GPU acceptance run"
        lines = [f"# pyllm {kind}", "",
                 f"- device: {env.get('gpu', '-')} (sm_{env.get('arch', '?').replace('.', '')})",
                 f"- torch {env.get('torch', '-')}, CUDA {env.get('torch_cuda', '-')}, "
                 f"Triton {env.get('triton', '-')}, Python {env.get('python', '-')}, "
                 f"nvcc {env.get('nvcc', '-')}, {env.get('cpus', '-')} CPUs",
                 f"- compute-sanitizer: {env.get('compute_sanitizer') or 'not on PATH'}", "",
                 "| stage | status | seconds | detail |", "|---|---|---|---|"]
        for name, s in self.data["stages"].items():
            lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | "
                         f"{s.get('detail', '')} |")
        bench = self.data.get("bench_rows")
        if bench and bench_table:
            lines += ["", "| case | dtype | mode | implementation | median | rate | of peak |"
                      " vs eager |", "|---|---|---|---|---|---|---|---|"]
            for r in bench:
                lines.append(_bench_line(r))
        lines += ["", f"**{'DRY RUN ' if self.dry_run else ''}"
                      f"{'PASS' if self.ok() else 'FAIL'}** in {time.time() - self.start:.0f} s"]
        return "\n".join(lines)


def _bench_line(r: dict) -> str:
    case = f"{r['op']} {r['model']} {r['case']}"
    if r.get("status") != "ok":
        return f"| {case} | {r['dtype']} | {r['mode']} | {r['implementation']} | " \
               f"{r.get('status')}: {r.get('note', '')[:60]} | | | |"
    if "gflops" in r and ("gbps" not in r or r["gflops"] / max(r["gbps"], 1e-9) > 20):
        rate, peak = f"{r['gflops'] / 1e3:.0f} TFLOP/s", r.get("fraction_of_peak")
    else:
        rate, peak = f"{r.get('gbps', 0) / 1e3:.2f} TB/s", r.get("fraction_of_bandwidth")
    vs = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
    frac = f"{100 * peak:.0f}%" if peak is not None else ""
    return (f"| {case} | {r['dtype']} | {r['mode']} | {r['implementation']} | "
            f"{r['median_ms']:.3f} ms | {rate} | {frac} | {vs} |")


def run_logged(cmd, log_path, timeout, env=None, cwd=ROOT):
    """Runs cmd with its output in log_path; (exit code or None on timeout, output)."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        # Its own process group, so that a time limit stops its children too
        # (pytest-xdist's workers, compile jobs), which would hold the GPU.
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(timeout, 1))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = None
            output = (output or "") + f"\n[timed out after {timeout:.0f} s]\n"
        log.write(output)
    return code, output


def calls_line(text: str) -> str:
    """kernel_calls.py's "N passed, N failed" line (or its last line)."""
    return next((line for line in text.splitlines()
                 if re.match(r"\d+ passed, \d+ failed", line)), last_line(text))


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else ""


def environment(args) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "compute_sanitizer": shutil.which("compute-sanitizer") or next(
               (p for p in [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                         "compute-sanitizer")] if os.access(p, os.X_OK)), None)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                "bin", "nvcc")
    if os.path.exists(nvcc):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release ([\d.]+)", out)
        env["nvcc"] = match.group(1) if match else out.strip()[-40:]
    if not args.dry_run:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible (torch.cuda.is_available() is False); "
                               "use --dry-run on a machine without a GPU")
        major, minor = torch.cuda.get_device_capability()
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), arch=f"{major}.{minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env.update(gpu=f"none (dry run for sm_{args.arch.replace('.', '')})", arch=args.arch)
    return env


def stage_build(args, report, env):
    log = os.path.join(args.out, "build.log")
    jobs = str(args.jobs or os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
           ROOT]
    build_env = {"TORCH_CUDA_ARCH_LIST": env["arch"], "MAX_JOBS": jobs}
    report.data["build_command"] = (f"TORCH_CUDA_ARCH_LIST={env['arch']} MAX_JOBS={jobs} "
                                    + " ".join(cmd[:1] + ["-m"] + cmd[2:]))
    start = time.time()
    code, output = run_logged(cmd, log, report.share("build"), env=build_env)
    if code != 0:
        report.stage("build", "fail" if code is not None else "timeout", time.time() - start,
                     detail=last_line(output)[:120])
        return False
    probe = ("import json, pyllm; from pyllm import _extension; "
             "print(json.dumps(_extension.build_info()))")
    code, output = run_logged([sys.executable, "-c", probe], log, 120, cwd=args.out)
    record = json.loads(last_line(output)) if code == 0 else {}
    report.data["build_record"] = record
    problems = []
    if not record:
        problems.append("pyllm does not import after the build")
    elif env.get("torch_cuda") and not record.get("with_cuda"):
        problems.append("pyllm._C_cuda was not built")
    elif env.get("torch_cuda") and record.get("cuda_archs") != [env["arch"]]:
        problems.append(f"built for {record.get('cuda_archs')}, not {env['arch']}")
    report.stage("build", "fail" if problems else "pass", time.time() - start,
                 detail="; ".join(problems) or f"{record.get('pyllm_version')} for "
                                                f"sm_{env['arch'].replace('.', '')}, "
                                                f"{jobs} jobs")
    return not problems


def cuda_test_files() -> list[str]:
    """The test files that hold cuda-marked tests (only these are imported:
    the others may need packages a GPU machine lacks)."""
    folder = os.path.join(ROOT, "tests")
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith("test_") and name.endswith(".py"):
            with open(path) as f:
                if re.search(r"pytest\.mark\.cuda\b", f.read()):
                    found.append(path)
    return found


def stage_tests(args, report):
    log = os.path.join(args.out, "tests.log")
    junit = os.path.join(args.out, "junit.xml")
    base = [sys.executable, "-m", "pytest", *cuda_test_files(), "-m", "cuda",
            "-p", "no:cacheprovider"]
    start = time.time()
    if args.dry_run:
        code, output = run_logged(base + ["--collect-only", "-q"], log, 300)
        selected = [line for line in output.splitlines() if "::" in line]
        report.data["tests_selected"] = selected
        ok = code == 0 and len(selected) > 0
        report.stage("tests", "planned" if ok else "fail", time.time() - start,
                     detail=f"{len(selected)} cuda tests selected ({last_line(output)})")
        return ok
    workers = test_workers()
    # loadgroup: the tests marked xdist_group("gpu_memory") share one worker.
    parallel = ["-n", str(workers), "--dist", "loadgroup"] if workers else []
    report.data["test_workers"] = workers
    code, output = run_logged(base + parallel + ["-q", "-rfEs", f"--junitxml={junit}"], log,
                              report.share("tests"))
    summary = last_line(output)
    passed = re.search(r"(\d+) passed", summary)
    ok = code == 0 and passed is not None and int(passed.group(1)) > 0
    report.stage("tests", "pass" if ok else ("timeout" if code is None else "fail"),
                 time.time() - start, detail=summary[:120])
    return ok


def stage_sanitizer(args, report, env):
    log = os.path.join(args.out, "sanitizer.log")
    calls = [sys.executable, os.path.join(TOOLS, "kernel_calls.py")]
    sanitizer = env.get("compute_sanitizer")
    start = time.time()
    if args.dry_run:
        # The call list itself, proven on the CPU backend.
        code, output = run_logged(calls + ["cpu"], log, 300, cwd=args.out)
        report.stage("sanitizer", "planned" if code == 0 else "fail", time.time() - start,
                     detail=f"calls on cpu: {calls_line(output)}; on the GPU under "
                            f"{'compute-sanitizer' if sanitizer else 'compute-sanitizer (not on PATH here)'}")
        return code == 0
    if not sanitizer:
        report.stage("sanitizer", "skipped", 0.0, detail="compute-sanitizer is not on PATH")
        return True
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--target-processes",
           "all", *calls, "cuda"]
    code, output = run_logged(cmd, log, report.share("sanitizer"), cwd=args.out)
    errors = re.search(r"ERROR SUMMARY: (\d+) error", output)
    detail = f"{errors.group(0)}; calls: {calls_line(output)}" if errors else \
        f"calls: {calls_line(output)}; {last_line(output)}"
    ok = code == 0 and (errors is None or errors.group(1) == "0")
    report.stage("sanitizer", "pass" if ok else ("timeout" if code is None else "fail"),
                 time.time() - start, detail=detail[:160])
    return ok


def stage_bench(args, report):
    log = os.path.join(args.out, "bench.log")
    base = [sys.executable, "-m", "pyllm.cli", "bench", "--suite", "gpu", "--dtype", "bfloat16"]
    start = time.time()
    if args.dry_run:
        code, output = run_logged(base + ["--list"], log, 300, cwd=args.out)
        try:
            planned = json.loads(output[output.index("["):])
        except ValueError:
            planned = []
        report.data["bench_plan"] = planned
        ok = code == 0 and len(planned) > 0
        report.stage("bench", "planned" if ok else "fail", time.time() - start,
                     detail=f"{len(planned)} cases planned (pyllm bench --suite gpu)")
        return ok
    folder = os.path.join(args.out, "bench")
    code, output = run_logged(base + ["--device", "cuda", "--output", folder, "--min-time",
                                      str(BENCH_MIN_TIME), "--no-plots"], log, report.share("bench") - 10,
                              cwd=args.out)
    rows, partial = bench_rows(folder)
    report.data["bench_rows"] = rows
    failed = [r for r in rows if r.get("status") != "ok"]
    status = "pass" if code == 0 and rows else ("timeout" if code is None else "fail")
    detail = f"{len(rows)} rows, {len(failed)} not ok" if rows else last_line(output)
    if rows and partial:
        detail += f" (the cases finished before it stopped, of {planned_cases()} planned)"
    report.stage("bench", status, time.time() - start, detail=detail)
    return status == "pass"


def bench_rows(folder: str) -> tuple[list[dict], bool]:
    """The bench's rows from its output folder: the full results, or, when the
    bench stopped before writing them, the rows of the cases it finished
    (partial = True)."""
    if not os.path.isdir(folder):
        return [], False
    for path in sorted(os.listdir(folder)):
        if path.endswith(".json"):
            with open(os.path.join(folder, path)) as f:
                return json.load(f), False
    so_far = os.path.join(folder, "rows-so-far.jsonl")  # pyllm.benchmark.runner.PARTIAL_ROWS
    if not os.path.exists(so_far):
        return [], False
    with open(so_far) as f:
        return [json.loads(line) for line in f if line.strip()], True


def planned_cases() -> str:
    try:
        from pyllm.benchmark.cases import select
        return str(len(select(None, False, "gpu")))
    except Exception:  # noqa: BLE001 - only a count for the report
        return "?"


def test_workers() -> int:
    """pytest-xdist workers for the GPU tests (0: none): Triton compiles each
    kernel specialisation on first use, single-threaded, so several processes
    sharing the one GPU finish the suite sooner. Half the cores, at most 8."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    cores = os.cpu_count() or 1
    return min(8, cores // 2) if cores >= 4 else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the report, logs and results")
    parser.add_argument("--dry-run", action="store_true",
                        help="everything that needs no device (for a machine without a GPU)")
    parser.add_argument("--arch", default="9.0",
                        help="the arch a dry run builds for (default 9.0); a real run reads "
                             "the visible GPU's")
    parser.add_argument("--jobs", type=int, help="compile jobs (default: every core)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for the whole run (default 540)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"the stages to run, comma-separated (default {','.join(STAGES)}); "
                             "without build, the pyllm already importable is used")
    parser.add_argument("--skip-build", action="store_true",
                        help="use the pyllm already built in this tree")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages: expected names from {', '.join(STAGES)}, got {args.stages!r}")
    if args.skip_build:
        stages = [s for s in stages if s != "build"]
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    report = Report(args.out, args.dry_run, args.budget, stages)
    try:
        env = environment(args)
    except Exception as e:  # noqa: BLE001 - the report says why
        report.stage("environment", "fail", 0.0, detail=str(e))
        print(report.write())
        return 1
    report.data["environment"] = env
    report.stage("environment", "pass", time.time() - report.start,
                 detail=f"{env['gpu']}, torch {env['torch']}, Triton {env.get('triton')}")
    if "build" in stages:
        built = stage_build(args, report, env)
    else:
        built = True
        report.stage("build", "skipped", 0.0, detail="not in --stages (or --skip-build)")
    if built:
        for name, run in (("tests", lambda: stage_tests(args, report)),
                          ("sanitizer", lambda: stage_sanitizer(args, report, env)),
                          ("bench", lambda: stage_bench(args, report))):
            if name in stages:
                run()
            else:
                report.stage(name, "skipped", 0.0, detail="not in --stages")
    report.write()
    print("\n" + report.summary(bench_table=False))  # one screen; summary.md has the bench
    print(f"\nreport: {os.path.join(args.out, 'report.json')}, "
          f"{os.path.join(args.out, 'summary.md')}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
