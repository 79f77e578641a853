"""The pyllm command."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch


def run(*args):
    return subprocess.run([sys.executable, "-m", "pyllm", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_prints_versions_isa_and_backends():
    result = run("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for words in ("pyllm 0.1.0", "torch 2.", "CPU ISA:", "CUDA archs compiled in:", "backends:",
                  "rms_norm", "reference"):
        assert words in out


def test_info_json():
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["backends"]["cpu"]["available"] is True
    assert facts["ops"]["rms_norm"]["reference"] == "any device"
    assert facts["cpu_isa"] in ("generic", "avx2", "avx512", "avx512_bf16")


def test_unknown_command_fails():
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_info_lists_triton_for_every_op():
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    expected = "cuda" if torch.cuda.is_available() else "(cuda)"
    for op, row in facts["ops"].items():
        assert row["triton"] == expected, (op, row)
