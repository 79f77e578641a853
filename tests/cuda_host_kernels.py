"""The CUDA kernel sources (csrc/cuda/*_kernel.cu) built for the host against
the CUDA execution model in tests/cuda_host/, and called through ctypes on
CPU tensors. Test-only.

The library is compiled once per content of its sources (cached under
build/cuda_host/). Every pointer handed to a kernel points into a guarded
buffer: NaN guard regions before and after the tensor catch out-of-bounds
writes (guards changed) and reads (NaN reaching an output).
"""

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "tests", "cuda_host")
# Every kernel source (csrc/cuda/*.cu; the operator files, *.cpp, include torch).
KERNEL_SOURCES = sorted(os.path.relpath(p, ROOT) for p in
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
DRIVER = "tests/cuda_host/driver.cpp"
FLAGS = ["-std=c++20", "-O2", "-g0", "-fPIC", "-pthread", "-DPYLLM_CUDA_HOST_MODEL_BUILD",
         "-I", MODEL_DIR, "-I", os.path.join(ROOT, "csrc"), "-Wall", "-Wno-unknown-pragmas"]
# PYLLM_SANITIZE=1 (make sanitize, tools/sanitize.py): the host model built
# with AddressSanitizer and UndefinedBehaviorSanitizer.
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer", "-g1", "-O1"]
if os.environ.get("PYLLM_SANITIZE") == "1":
    FLAGS = FLAGS + SANITIZER_FLAGS
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
GUARD = 64  # elements each side

_library = None


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _inputs():
    files = sorted(set(KERNEL_SOURCES + [DRIVER] +
                       [os.path.relpath(os.path.join(d, f), ROOT)
                        for base in ("csrc/cuda", "csrc/common", "tests/cuda_host")
                        for d, _, fs in os.walk(os.path.join(ROOT, base)) for f in fs
                        if f.endswith((".h", ".cuh"))]))
    return files


def build() -> str:
    """Compiles the host-model library if its sources changed; returns its path."""
    digest = hashlib.sha256()
    for rel in _inputs():
        digest.update(rel.encode())
        with open(os.path.join(ROOT, rel), "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(FLAGS).encode())
    out_dir = os.path.join(ROOT, "build", "cuda_host", digest.hexdigest()[:16])
    lib = os.path.join(out_dir, "libpyllm_cuda_host.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    cxx = compiler()

    def compile_one(rel):
        obj = os.path.join(out_dir, os.path.basename(rel) + ".o")
        lang = ["-x", "c++"] if rel.endswith(".cu") else []
        subprocess.run([cxx, *FLAGS, "-c", *lang, os.path.join(ROOT, rel), "-o", obj],
                       check=True, capture_output=True, text=True)
        return obj

    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, KERNEL_SOURCES + [DRIVER]))
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"host-model build failed:\n{e.stderr[-6000:]}") from None
    tmp = lib + ".tmp"
    link = SANITIZER_FLAGS if os.environ.get("PYLLM_SANITIZE") == "1" else []
    subprocess.run([cxx, "-shared", "-pthread", *link, *objects, "-o", tmp], check=True)
    os.replace(tmp, lib)
    return lib


def library() -> ctypes.CDLL:
    global _library
    if _library is None:
        _library = ctypes.CDLL(build())
        _library.host_norm_backward_chunks.restype = ctypes.c_int64
        _library.host_attention_forward_workspace.restype = ctypes.c_int64
    return _library


class Guarded:
    """A tensor's copy inside a buffer with NaN (integers: -1) guard regions on each side.
    `.ptr` is what a kernel gets; `.tensor` views the interior; `.check()`
    fails if a guard changed. `offset` shifts the interior by elements (to
    test unaligned pointers)."""

    def __init__(self, like: torch.Tensor, fill=None, offset: int = 0):
        n = like.numel()
        poison = float("nan") if like.dtype.is_floating_point else -1
        self.buffer = torch.full((n + 2 * GUARD + offset,), poison, dtype=like.dtype)
        self.start = GUARD + offset
        self.tensor = self.buffer[self.start:self.start + n].view(like.shape)
        if fill is not None:
            self.tensor.copy_(fill)
        self.guards = (self.buffer[:self.start].clone(), self.buffer[self.start + n:].clone())

    @property
    def ptr(self):
        return ctypes.c_void_p(self.tensor.data_ptr())

    def check(self, name: str):
        n = self.tensor.numel()
        before, after = self.buffer[:self.start], self.buffer[self.start + n:]
        same = (torch.equal(before.view(torch.uint8), self.guards[0].view(torch.uint8)) and
                torch.equal(after.view(torch.uint8), self.guards[1].view(torch.uint8)))
        assert same, f"{name}: a kernel wrote outside the tensor"


def guarded_input(t: torch.Tensor | None, offset: int = 0):
    return None if t is None else Guarded(t, fill=t, offset=offset)


def ptr(g):
    return ctypes.c_void_p(0) if g is None else g.ptr


def check_launch(code: int, what: str):
    assert code == 0, f"{what}: launch failed with cudaError {code}"
