"""The architectures TORCH_CUDA_ARCH_LIST may name beyond the default 8.0;9.0
(7.5, 10.0, 12.0): every PTX instruction the CUDA kernels use (all behind
csrc/cuda/ptx.h, with sm_75 fallbacks for cp.async and mma.m16n8k16) must
assemble for each. A small probe kernel is compiled with nvcc for every arch;
the full extension for the default archs is checked in test_build.py."""

import os
import shutil
import subprocess

import pytest

from harness import REPO_ROOT


def nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("arch", [75, 80, 90, 100, 120])
def test_ptx_wrappers_assemble_for(arch, tmp_path):
    out = tmp_path / f"probe.sm_{arch}.cubin"
    result = subprocess.run(
        [nvcc(), f"-arch=sm_{arch}", "-cubin", "-std=c++20", "-O3",
         "-I", os.path.join(REPO_ROOT, "csrc"),
         os.path.join(REPO_ROOT, "tests", "cuda_arch", "ptx_probe.cu"), "-o", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 0
