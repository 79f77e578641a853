"""Reading GPU machine code without a GPU: ahead-of-time Triton compilation and
``cuobjdump`` resource reports (registers, stack, shared and local memory)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

#: Shared memory one block may use, by compute capability (bytes).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def cuobjdump() -> str | None:
    """The cuobjdump that ships with triton, else one on PATH."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def list_elf(binary: str) -> list[str]:
    """The cubin names embedded in a shared library, e.g. 'x.sm_80.cubin'."""
    out = subprocess.run([cuobjdump(), "--list-elf", binary], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"ELF file\s+\d+:\s+(\S+)", out)


def resource_usage(binary: str) -> list[dict]:
    """One dict per kernel: arch (e.g. 80), function, REG, STACK, SHARED, LOCAL."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", binary], capture_output=True,
                         text=True, check=True).stdout
    rows, arch = [], None
    for line in out.splitlines():
        m = re.search(r"arch = sm_(\d+)", line) or re.search(r"\.sm_(\d+)\.cubin", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            rows.append({"arch": arch, "function": m.group(1)})
        elif rows and "REG:" in line and "function" in rows[-1] and "REG" not in rows[-1]:
            rows[-1].update({k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)})
    return rows


def compile_triton(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int,
                   num_stages: int = 3, divisible: tuple = ()):
    """Compiles a @triton.jit kernel for sm_<arch>; returns (compiled, usage dict).
    ``divisible`` names the arguments to specialize as multiples of 16 (as
    Triton's launcher does for 16-byte aligned pointers and such integers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = resource_usage(f.name)
    assert len(usage) == 1, usage
    return compiled, usage[0]
