"""Runs tests/interpreter/ (Triton kernels on CPU tensors) in a process started
with TRITON_INTERPRET=1, which Triton reads when it is imported."""

import importlib.util
import re

import pytest

from harness import run_pytest_in_interpreter


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter():
    result = run_pytest_in_interpreter("tests/interpreter")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    print(summary)
