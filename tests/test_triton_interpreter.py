"""Runs tests/interpreter/ (Triton kernels on CPU tensors) in a process started
with TRITON_INTERPRET=1, which Triton reads when it is imported, and reports
each of its tests as a test here: collected by that process, run there once
(one interpreter start), each outcome (pass, skip with its reason, or the
failure's text) shown under its own name."""

import functools
import importlib.util
import json
import os
import tempfile

import pytest

from harness import run_pytest_in_interpreter

FOLDER = "tests/interpreter"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter(collect_only: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        result = run_pytest_in_interpreter(FOLDER, report, collect_only=collect_only)
        if not os.path.exists(report):
            raise RuntimeError("the interpreter process wrote no report:\n" +
                               result.stdout[-6000:] + result.stderr[-3000:])
        with open(report) as f:
            return {**json.load(f), "returncode": result.returncode,
                    "output": result.stdout[-3000:] + result.stderr[-3000:]}


def _collected() -> list:
    if not HAVE_TRITON:
        return []
    collected = _interpreter(collect_only=True)["collected"]
    if not collected:
        raise RuntimeError(f"no test collected under {FOLDER} with TRITON_INTERPRET=1")
    return collected


@functools.lru_cache(maxsize=None)
def _run() -> dict:
    return _interpreter(collect_only=False)


CASES = _collected()


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_interpreter_collected_tests():
    """The collection that parametrizes the tests below found tests."""
    assert CASES, f"no test collected under {FOLDER}"


@pytest.mark.parametrize("case", CASES)
def test_interpreted(case):
    results = _run()["results"]
    entry = results.get(case)
    assert entry is not None, f"{case} was collected but did not run:\n{_run()['output']}"
    if entry["outcome"] == "skipped":
        pytest.skip(entry["text"])
    assert entry["outcome"] == "passed", entry["text"][-8000:]
