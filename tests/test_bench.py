"""`pyllm bench --quick` runs end to end (a smoke run: no timing asserts)."""

import json
import subprocess
import sys


def test_bench_quick_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pyllm", "bench", "--quick", "--ops", "rms_norm", "--dtype",
         "float32", "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "memory bandwidth" in result.stdout and "torch:compile" in result.stdout
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())
    impls = {r["implementation"] for r in rows}
    assert {"pyllm:cpu", "torch:eager", "torch:compile"} <= impls
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["dtype"] == "float32"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert all("speedup_vs_eager" in r for r in rows if r["implementation"] == "pyllm:cpu")
    assert list(tmp_path.glob("*.csv"))
