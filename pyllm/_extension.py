"""Loads pyllm's compiled extensions after checking them against the running torch.

An extension built against another torch release, CUDA major version or C++
ABI fails at import with an ``undefined symbol`` traceback, or worse, loads and
misbehaves. The build records what it was built against
(``pyllm/_build_info.py``, written by setup.py); this module compares that
record with the running torch before loading anything and raises
:class:`BuildMismatchError`, naming both sides and the fix.
"""

from __future__ import annotations

import importlib
import re

import torch

__all__ = ["BuildMismatchError", "build_info", "load", "has_cuda_extension"]

_REBUILD = ("Reinstall the pyllm wheel built for this torch, or rebuild from source against it: "
            "pip install --no-cache-dir --force-reinstall pyllm-<version>.tar.gz (the build "
            "uses the installed torch), or in a source tree "
            "pip install --no-build-isolation --force-reinstall .")


class BuildMismatchError(ImportError):
    """pyllm's compiled extensions do not match the running torch."""


def build_info() -> dict:
    """What the extensions were built against (torch, CUDA, archs, ABI)."""
    try:
        from pyllm._build_info import BUILD
    except ImportError as e:
        raise ImportError(
            "pyllm's compiled extensions are not built (pyllm/_build_info.py is missing). "
            "Build them against the installed torch: pip install --no-build-isolation -e .") from e
    return dict(BUILD)


def _release(version: str) -> tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check(info: dict, torch_version: str, torch_cuda: str | None, cxx11_abi: bool) -> None:
    """Raises BuildMismatchError when ``info`` can't run under the given torch."""
    problems = []
    if _release(info["torch_version"]) != _release(torch_version):
        problems.append(f"built against torch {info['torch_version']}, running torch {torch_version}")
    if info["with_cuda"]:
        built_cuda = info["torch_cuda_version"]
        if torch_cuda is None:
            problems.append(f"built with CUDA {built_cuda} kernels, running a CPU-only torch "
                            f"({torch_version})")
        elif built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            problems.append(f"built against CUDA {built_cuda}, running torch with CUDA {torch_cuda}")
    if bool(info["cxx11_abi"]) != bool(cxx11_abi):
        problems.append(f"built with _GLIBCXX_USE_CXX11_ABI={int(info['cxx11_abi'])}, "
                        f"running torch uses {int(cxx11_abi)}")
    if problems:
        raise BuildMismatchError("pyllm's compiled extensions do not match the running torch: "
                                 + "; ".join(problems) + ". " + _REBUILD)


_loaded_cuda = False


def load() -> None:
    """Checks the build record, then imports pyllm._C (and pyllm._C_cuda if built)."""
    global _loaded_cuda
    info = build_info()
    check(info, torch.__version__, torch.version.cuda, torch.compiled_with_cxx11_abi())
    importlib.import_module("pyllm._C")
    if info["with_cuda"]:
        importlib.import_module("pyllm._C_cuda")
        _loaded_cuda = True


def has_cuda_extension() -> bool:
    """Whether pyllm._C_cuda (the CUDA C++ kernels) is loaded."""
    return _loaded_cuda
