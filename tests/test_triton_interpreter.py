"""Runs tests/interpreter/ (Triton kernels on CPU tensors) in a process started
with TRITON_INTERPRET=1, which Triton reads when it is imported, and reports
each of its tests as a test here: collected by that process, run there once
(one interpreter start), each outcome (pass, skip with its reason, or the
failure's text) shown under its own name.

The run starts in the background as soon as collection has selected these
tests (conftest.py), so the interpreter (one core, pure Python) works while
the rest of the suite runs; the first test here waits for it."""

import atexit
import functools
import importlib.util
import json
import os
import shutil
import tempfile

import pytest

from harness import run_pytest_in_interpreter, start_pytest_in_interpreter

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


_BACKGROUND: dict = {}


def start_background_run() -> None:
    """Starts the interpreter run (once), its report and output in a
    temporary folder."""
    if _BACKGROUND or not HAVE_TRITON:
        return
    folder = tempfile.mkdtemp(prefix="pyllm-interpreter-")
    output = open(os.path.join(folder, "output.txt"), "w")
    report = os.path.join(folder, "report.json")
    _BACKGROUND.update(folder=folder, output=output, report=report,
                       process=start_pytest_in_interpreter(FOLDER, report, output))


@functools.lru_cache(maxsize=None)
def _run() -> dict:
    start_background_run()
    process, folder = _BACKGROUND["process"], _BACKGROUND["folder"]
    try:
        returncode = process.wait(timeout=1800)
    finally:
        _stop_background_run()
    try:
        with open(os.path.join(folder, "output.txt")) as f:
            output = f.read()
        if not os.path.exists(_BACKGROUND["report"]):
            raise RuntimeError("the interpreter process wrote no report:\n" + output[-9000:])
        with open(_BACKGROUND["report"]) as f:
            return {**json.load(f), "returncode": returncode, "output": output[-6000:]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@atexit.register
def _stop_background_run() -> None:
    """Ends a run still going (a session stopped early) and closes its output."""
    if not _BACKGROUND:
        return
    if _BACKGROUND["process"].poll() is None:
        _BACKGROUND["process"].kill()
        _BACKGROUND["process"].wait()
    _BACKGROUND["output"].close()


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
