"""`pyllm bench`: the --quick smoke runs end to end (kernels and --models; no
timing asserts), the --compare regression check, and the plots."""

import json
import subprocess
import sys

import pytest
import torch

from pyllm.benchmark.compare import compare
from pyllm.benchmark.plots import plot


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "pyllm", "bench", *args], capture_output=True,
                          text=True, timeout=900)


def test_bench_quick_smoke(tmp_path):
    result = run_bench("--quick", "--ops", "rms_norm", "attention", "--dtype", "float32",
                       "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "memory bandwidth" in result.stdout and "torch:compile" in result.stdout
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())
    impls = {r["implementation"] for r in rows}
    assert {"pyllm:cpu", "torch:eager", "torch:compile"} <= impls
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["dtype"] == "float32"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert all("speedup_vs_eager" in r for r in rows if r["implementation"] == "pyllm:cpu")
    assert list(tmp_path.glob("*.csv"))
    assert {p.name for p in tmp_path.glob("*.png")} == {"plot-rms_norm.png", "plot-attention.png"}
    # --compare end to end against that run (the mechanics only: a threshold no
    # timing can cross, since a loaded machine can slow a quick run tenfold;
    # the rule itself is tested on fixed rows below).
    again = run_bench("--quick", "--ops", "rms_norm", "--dtype", "float32", "--output", "",
                      "--compare", str(path), "--threshold", "1e9")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "rows compared" in again.stdout


def test_bench_models_quick_smoke(tmp_path):
    # float32: on a CPU without bf16 instructions transformers' bfloat16 eager
    # baseline (torch's bf16 matmul, ~1 GFLOP/s there) made this run 145 s
    # instead of 16; pyllm's bf16 models are tested in tests/test_models_*.py.
    result = run_bench("--models", "--quick", "--dtype", "float32", "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("models-*.json")
    rows = json.loads(path.read_text())
    assert {(r["case"], r["impl"]) for r in rows} == {
        ("prefill B1 S128", "pyllm"), ("prefill B1 S128", "transformers:eager"),
        ("generate B1 128+16", "pyllm"), ("generate B1 128+16", "transformers:eager")}
    for r in rows:
        assert r["status"] == "ok" and r["seconds"] > 0 and r["tokens_per_s"] > 0
        if r["impl"] == "pyllm":
            assert r["speedup_vs_eager"] > 0
            if r["case"].startswith("prefill"):
                assert r["error"] <= r["error_bound"] and 0 < r["fraction_of_peak"]
    assert "generate B1 128+16" in result.stdout


def _row(impl, ms, case="c"):
    return {"op": "rms_norm", "model": "m", "case": case, "dtype": "float32", "mode": "fwd",
            "implementation": impl, "status": "ok", "median_ms": ms}


def test_compare_flags_a_slower_pyllm_row_relative_to_eager():
    old = [_row("pyllm:cpu", 1.0), _row("torch:eager", 2.0)]
    # The machine got twice as slow: both rows doubled, no regression.
    text, regressed = compare([_row("pyllm:cpu", 2.0), _row("torch:eager", 4.0)], old, 0.15)
    assert not regressed and "no pyllm row got slower" in text
    # pyllm alone got 50% slower.
    text, regressed = compare([_row("pyllm:cpu", 1.5), _row("torch:eager", 2.0)], old, 0.15)
    assert regressed and "SLOWER" in text
    # Without eager rows the raw change decides.
    text, regressed = compare([_row("pyllm:cpu", 1.1)], [_row("pyllm:cpu", 1.0)], 0.15)
    assert not regressed


def test_plots_are_pictures(tmp_path):
    rows = [dict(_row(impl, ms, case), gbps=gbps, mode="fwd")
            for impl, ms, case, gbps in [("pyllm:cpu", 1.0, "small", 10.0), ("pyllm:cpu", 2.0, "big", 20.0),
                                         ("torch:eager", 2.0, "small", 5.0), ("torch:eager", 3.0, "big", 13.0)]]
    (path,) = plot(rows, str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_case_checked_at_smaller_sizes_without_compile(monkeypatch):
    """check_dims: the float64 check runs at the smaller sizes, the timing at
    the case's own (as the GPU suite's 16k-token attention); no torch.compile
    row where compile_baseline is off."""
    import io

    from pyllm.benchmark import cases, runner

    case = cases.Case("attention", "test", "2x96", (2, 96, 96, 4, 2, 16, True), mode="fwd+bwd",
                      check_dims=(1, 33, 33, 4, 2, 16, True), compile_baseline=False)
    monkeypatch.setitem(cases.SUITES, "gpu", [case])
    truths = []
    real_truth = cases.AttentionBench.truth
    monkeypatch.setattr(cases.AttentionBench, "truth",
                        lambda self, c, inputs: truths.append(c.dims) or real_truth(self, c,
                                                                                    inputs))
    rows = runner.run(ops=["attention"], dtypes=["float32"], suite="gpu", output_dir="",
                      min_time=0.01, stream=io.StringIO())
    assert truths and set(truths) == {case.check_dims}  # the truth only at check_dims
    assert {r["implementation"] for r in rows} == {"pyllm:cpu", "torch:eager"}
    assert all(r["status"] == "ok" and r["shape"] == case.shape_text() for r in rows)
    ours = next(r for r in rows if r["implementation"] == "pyllm:cpu")
    assert "speedup_vs_eager" in ours and "speedup_vs_compile" not in ours


def test_a_failing_case_is_a_row_and_finished_cases_are_kept(monkeypatch, tmp_path):
    """One case raising (a device fault, say) gives an error row naming the
    exception, the next case still runs, and each finished case's rows are in
    rows-so-far.jsonl while the run goes on (what a time limit leaves)."""
    import io

    from pyllm.benchmark import cases, runner

    good = cases.Case("rms_norm", "test", "33x65", (33, 65))
    bad = cases.Case("rms_norm", "test", "bad", (3, 5))
    monkeypatch.setitem(cases.SUITES, "gpu", [bad, good])
    real = runner._run_case
    seen_so_far = []

    def run_case(case, *args, **kwargs):
        path = tmp_path / runner.PARTIAL_ROWS
        seen_so_far.append([json.loads(line) for line in path.read_text().splitlines()])
        if case is bad:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(runner, "_run_case", run_case)
    rows = runner.run(ops=["rms_norm"], dtypes=["float32"], suite="gpu", output_dir=str(tmp_path),
                      min_time=0.01, stream=io.StringIO())
    error = [r for r in rows if r["case"] == "bad"]
    assert len(error) == 1 and error[0]["status"] == "error"
    assert "RuntimeError: CUDA error: an illegal memory access" in error[0]["note"]
    assert {r["implementation"] for r in rows if r["case"] == "33x65"} >= {"pyllm:cpu",
                                                                            "torch:eager"}
    assert all(r["status"] == "ok" for r in rows if r["case"] == "33x65")
    # Before the second case ran, the first's row was on disk already.
    assert seen_so_far[0] == [] and [r["case"] for r in seen_so_far[1]] == ["bad"]
    assert not (tmp_path / runner.PARTIAL_ROWS).exists()  # the full results replace it
    assert len(list(tmp_path.glob("bench-*.json"))) == 1


def test_vs_llama_cpp_reads_tg64_and_times_a_decode(tmp_path):
    """bench/vs_llama_cpp.py: the tg64 rate from llama-bench's table (a stand-in
    binary here), an error naming the output when the row is missing, and
    pyllm's decode rate on a small LLaMA."""
    import importlib.util
    import os

    from harness import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "vs_llama_cpp", os.path.join(REPO_ROOT, "bench", "vs_llama_cpp.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho '| model | size | params | backend | threads | test | t/s |'\n"
                    "echo '| llama 1B BF16 | 2.05 GiB | 1.10 B | CPU | 2 | tg64 | 18.57 ± 0.00 |'\n")
    fake.chmod(0o755)
    assert script.llama_cpp_decode_rate(str(fake), "m.gguf", 2) == 18.57
    fake.write_text("#!/bin/sh\necho 'error: failed to load model'\n")
    with pytest.raises(RuntimeError, match="(?s)no tg64 row.*failed to load model"):
        script.llama_cpp_decode_rate(str(fake), "m.gguf", 2)

    from pyllm.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(300, 64, 96, 2, 4, 2)).eval()
    model.pack_for_inference()
    assert script.pyllm_decode_rate(model, steps=4, prompt=5) > 0
