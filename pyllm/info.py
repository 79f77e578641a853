"""What this install of pyllm has: versions, build record, CPU ISA, backends per op.

``pyllm info`` prints :func:`report`; :func:`collect` returns the same facts as
a dict (``pyllm info --json``).
"""

from __future__ import annotations

import platform

import torch

from pyllm import _C, _extension, backend

__all__ = ["collect", "report"]


def collect() -> dict:
    """The facts ``pyllm info`` prints, as plain data."""
    import pyllm

    build = _extension.build_info()
    return {
        "pyllm": pyllm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": backend._triton_version(),
        "build": build,
        "cpu_isa": _C.cpu_isa(),
        "cpu_isa_detected": _C.cpu_isa_detected(),
        "cpu_amx": _C.cpu_amx(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {name: {"available": s.available, "detail": s.detail}
                     for name, s in backend.backends().items()},
        "ops": backend.op_table(),
        "default_order": {k: list(v) for k, v in backend.DEFAULT_ORDER.items()},
        "selected_backend": backend.current_backend(),
    }


def report() -> str:
    """A human-readable rendering of :func:`collect`."""
    facts = collect()
    build = facts["build"]
    archs = ", ".join(build["cuda_archs"]) or "none (CPU-only build)"
    lines = [
        f"pyllm {facts['pyllm']}  (python {facts['python']})",
        f"torch {facts['torch']}  CUDA {facts['torch_cuda'] or 'none (CPU build)'}  "
        f"triton {facts['triton'] or 'not installed'}",
        f"build: {build.get('pyllm_version', facts['pyllm'])} against torch "
        f"{build['torch_version']}, CUDA {build['torch_cuda_version']}, "
        f"nvcc {build['nvcc_version']}, C++11 ABI {int(build['cxx11_abi'])}, python "
        f"{build['python_version']}",
        f"CUDA archs compiled in: {archs}",
        f"CPU ISA: {facts['cpu_isa']} (detected {facts['cpu_isa_detected']}; "
        f"PYLLM_CPU_ISA lowers it)  bf16 GEMM on AMX tiles: "
        f"{'yes' if facts['cpu_amx'] else 'no'} (PYLLM_CPU_AMX=0 turns it off)  "
        f"threads: {facts['threads']}",
        f"CUDA device: {facts['cuda_device'] or 'none'}",
        f"selected backend: {facts['selected_backend'] or 'default (fastest available)'}",
        "",
        "backends:",
    ]
    for name, status in facts["backends"].items():
        mark = "yes" if status["available"] else "no "
        lines.append(f"  {name:<10} {mark}  {status['detail']}")
    lines += ["", "devices each backend serves, per op "
              "(in parentheses: kernels available on that device, none here):"]
    names = list(backend.BACKENDS)
    width = max(len("op"), *(len(op) for op in facts["ops"])) + 2
    lines.append("  " + f"{'op':<{width}}" + "".join(f"{n:<16}" for n in names))
    for op, row in facts["ops"].items():
        lines.append("  " + f"{op:<{width}}" + "".join(f"{(row[n] or '-'):<16}" for n in names))
    lines.append("")
    lines.append("default order: " + "; ".join(
        f"{dev}: {' > '.join(order)}" for dev, order in facts["default_order"].items()))
    return "\n".join(lines)
