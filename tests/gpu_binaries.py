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
    usage = usage[0]
    # A stack frame is not always spills (a division's slow-path call keeps
    # one on some Triton releases): ptxas says which.
    usage["SPILL"] = spill_bytes(compiled.asm["ptx"], arch) if usage["STACK"] else 0
    return compiled, usage


def spill_bytes(ptx: str, arch: int) -> int:
    """Bytes of spill stores plus loads that ptxas reports for this PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)  # sm_90a where Triton uses wgmma
    gpu_name = target.group(1) if target else f"sm_{arch}"
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas if os.path.exists(ptxas) else "ptxas", "-v",
                              f"--gpu-name={gpu_name}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))


# -- the specialisations a launcher really produces ------------------------------------

class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)``
    records the call instead of launching it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def capture_launches(module, names, launcher, *args, **kwargs) -> list:
    """Runs ``launcher`` (a Triton launch wrapper of ``module``) on CPU tensors
    with the kernels ``names`` of ``module`` replaced by recorders; returns
    the (kernel, args, kwargs) of every launch it made, nothing launched."""
    calls, saved = [], {n: getattr(module, n) for n in names}
    try:
        for name, kernel in saved.items():
            setattr(module, name, _Recorder(kernel, calls))
        launcher(*args, **kwargs)
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    return calls


_MISSING = object()


def launch_specialization(kernel, args, kwargs):
    """(signature, constexprs, divisible, num_warps, num_stages) of a launch,
    by Triton's own rule (its native specialisation: pointers and integers
    that are multiples of 16 get tt.divisibility 16, integers equal to 1
    become constants), as its JIT launcher computes them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexpr_values = {k: v for k, v in kwargs.items() if k not in options}
    signature, constexprs, divisible = {}, {}, []
    positional = iter(args)
    for param in kernel.params:
        name = param.name
        if name in constexpr_values:
            signature[name], constexprs[name] = "constexpr", constexpr_values[name]
            continue
        value = next(positional, _MISSING)
        if value is _MISSING:  # a parameter left at its default (a constexpr flag)
            assert param.has_default, f"{kernel.fn.__name__}: no argument for {name}"
            signature[name], constexprs[name] = "constexpr", param.default
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", key
        else:
            signature[name] = kind
            if key == "D":
                divisible.append(name)
    return signature, constexprs, tuple(divisible), options.get("num_warps", 4), \
        options.get("num_stages", 3)


#: PTX instructions that make a main loop fast on sm_80/sm_90.
PTX_PATTERNS = {
    "mma.sync": r"\bmma\.sync\.aligned\.",
    "wgmma": r"\bwgmma\.mma_async\.",
    "ld.v4 (16 B)": r"\bld\.global(?:\.[\w:]+)*\.v(?:4\.[bfsu]32|2\.[bfsu]64|8\.[bfsu]16)\b",
    "ld scalar 2 B": r"\bld\.global(?:\.[\w:]+)*\.[bu]16\b",
    "cp.async 16 B": r"\bcp\.async\.c[ga]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],"
                     r"\s*(?:16|0x10)\b",
    "TMA": r"\bcp\.async\.bulk\.tensor\.",
}


def ptx_counts(ptx: str) -> dict:
    """How many of each PTX_PATTERNS instruction the PTX holds."""
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_PATTERNS.items()}
