"""The GPU acceptance command's logic, on this machine: its dry run selects
the cuda tests, proves the sanitizer's call list on the CPU backend, plans
the GPU bench at FlashAttention's shapes and writes the report; a real run
without a GPU stops at once with a clear reason. (The dry run with its build,
against torch 2.11 and Triton 3.6, runs in tools/torch_matrix.py.)"""

import json
import os
import subprocess
import sys

import pytest
import torch

from harness import REPO_ROOT

GPU_CHECK = os.path.join(REPO_ROOT, "tools", "gpu_check.py")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run([sys.executable, GPU_CHECK, "--dry-run", "--skip-build", "--out",
                             str(out)], capture_output=True, text=True, timeout=900)
    with open(out / "report.json") as f:
        return result, json.load(f), out


def test_dry_run_passes_and_prints_a_summary(dry_run):
    result, report, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["result"] == "PASS" and report["dry_run"]
    assert result.stdout.strip().splitlines()[-1].startswith("report:")
    assert "**DRY RUN PASS**" in (out / "summary.md").read_text()
    stages = report["stages"]
    assert [stages[s]["status"] for s in ("tests", "sanitizer", "bench")] == ["planned"] * 3
    for log in ("tests.log", "sanitizer.log", "bench.log"):
        assert (out / log).stat().st_size > 0, log


def test_dry_run_selects_the_cuda_tests(dry_run):
    _, report, _ = dry_run
    selected = report["tests_selected"]
    assert any("test_cuda.py::" in t for t in selected)
    assert all("test_norms.py::" not in t for t in selected)  # CPU tests are not selected


def test_dry_run_proves_the_sanitizer_calls_on_the_cpu(dry_run):
    _, report, out = dry_run
    text = (out / "sanitizer.log").read_text()
    assert "0 failed" in text and " passed" in text
    for name in ("rms_norm", "add_layer_norm", "attention varlen", "attention decode",
                 "linear gelu", "swiglu"):
        assert name in text, name


def test_dry_run_plans_the_reference_shapes(dry_run):
    _, report, _ = dry_run
    plan = report["bench_plan"]
    attention = [c for c in plan if c["op"] == "attention" and c["dims"]["seq_q"] > 1]
    assert {c["dims"]["head_dim"] for c in attention} == {64, 128}
    assert {c["dims"]["seq_q"] for c in attention} >= {512, 8192}
    for c in attention:  # hidden 2048, 16k tokens, a smaller float64 check
        d = c["dims"]
        assert d["heads"] * d["head_dim"] == 2048 and d["batch"] * d["seq_q"] == 16384
        assert c["check_dims"][1] <= 1024
    assert {(c["mode"], c["dims"]["causal"]) for c in attention} == {
        ("fwd", False), ("fwd", True), ("fwd+bwd", False), ("fwd+bwd", True)}
    decode = sorted(c["dims"]["seq_k"] for c in plan if c["op"] == "attention"
                    and c["dims"]["seq_q"] == 1)
    assert decode[0] == 4096 and decode[-1] == 32768
    norms = {c["op"] for c in plan if c["dims"].get("hidden") == 8192}
    assert norms == {"rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"}
    assert any(c["op"] == "linear" and c["dims"]["rows"] == c["dims"]["in_features"]
               == c["dims"]["out_features"] == 4096 for c in plan)
    assert {c["dtype"] for c in plan} == {"bfloat16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_a_real_run_without_a_gpu_fails_clearly(tmp_path):
    result = subprocess.run([sys.executable, GPU_CHECK, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "no CUDA device is visible" in result.stdout
    assert "FAIL" in (tmp_path / "summary.md").read_text()


def test_a_bench_stopped_part_way_reports_what_it_finished(tmp_path):
    """The bench's full results when written, else the finished cases' rows."""
    sys.path.insert(0, os.path.dirname(GPU_CHECK))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from pyllm.benchmark.runner import PARTIAL_ROWS

    assert gpu_check.bench_rows(str(tmp_path / "none")) == ([], False)
    rows = [{"op": "rms_norm", "status": "ok"}, {"op": "attention", "status": "error"}]
    (tmp_path / PARTIAL_ROWS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_check.bench_rows(str(tmp_path)) == (rows, True)
    (tmp_path / "bench-x.json").write_text(json.dumps(rows[:1]))
    assert gpu_check.bench_rows(str(tmp_path)) == (rows[:1], False)


def test_a_stage_past_its_time_limit_is_stopped_with_its_children(tmp_path):
    """run_logged's time limit ends the whole process group: a child the
    command started (as pytest-xdist starts workers) does not outlive it."""
    sys.path.insert(0, os.path.dirname(GPU_CHECK))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
              "time.sleep(60)")
    import time
    start = time.time()
    code, output = gpu_check.run_logged([sys.executable, "-c", script], tmp_path / "log", 3)
    assert time.time() - start < 30  # not held until the child's own end (60 s)
    assert code is None and "started" in output and "[timed out after 3 s]" in output
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment to reap it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the child outlived the time limit")


def test_stages_runs_only_the_named_stages(tmp_path):
    """--stages reruns some stages (here the bench plan alone); the others are
    reported as skipped, and an unknown stage name is a clear error."""
    result = subprocess.run([sys.executable, GPU_CHECK, "--dry-run", "--stages", "bench",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {
        "environment": "pass", "build": "skipped", "tests": "skipped", "sanitizer": "skipped",
        "bench": "planned"}
    bad = subprocess.run([sys.executable, GPU_CHECK, "--dry-run", "--stages", "tests,lint",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--stages: expected names from build, tests" in bad.stderr


def test_each_stage_gets_its_weighted_share_of_what_is_left(tmp_path):
    sys.path.insert(0, os.path.dirname(GPU_CHECK))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    w = gpu_check.STAGE_WEIGHTS
    full = gpu_check.Report(str(tmp_path), False, 540.0)
    assert abs(full.share("build") - 540 * w["build"] / sum(w.values())) < 1
    assert abs(full.share("bench") - 540) < 1  # the last stage: everything left
    rerun = gpu_check.Report(str(tmp_path), False, 270.0, ["tests", "sanitizer"])
    assert abs(rerun.share("tests") - 270 * w["tests"] / (w["tests"] + w["sanitizer"])) < 1
