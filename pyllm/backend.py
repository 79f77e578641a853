"""Backend choice, in one place: which implementation serves each op.

Backends
    ``cpu``        C++ kernels of ``pyllm._C``: ``torch.ops.pyllm.<op>`` on CPU tensors.
    ``cuda``       CUDA C++ kernels of ``pyllm._C_cuda``: ``torch.ops.pyllm.<op>`` on
                   CUDA tensors.
    ``triton``     Triton kernels of ``pyllm.kernels``: ``torch.ops.pyllm.<op>_triton``
                   on CUDA tensors (and on CPU tensors when ``TRITON_INTERPRET=1`` was
                   set before pyllm was imported).
    ``reference``  plain PyTorch (:mod:`pyllm.reference`): any device, any floating dtype.

Triton and CUDA C++ both serve CUDA tensors, and the dispatcher has one CUDA
slot per operator, so every op is declared under two names (csrc/ops.cpp) and
the choice is made here, in Python, before the op is called. Under
``torch.compile`` this code runs at trace time, so a traced graph holds exactly
one op per call, the chosen one.

Choice, first match wins:
    1. the ``backend=`` argument of the call;
    2. the innermost :func:`use_backend` context;
    3. the ``PYLLM_BACKEND`` environment variable (read when pyllm is imported);
    4. the default: the first backend in :data:`DEFAULT_ORDER` for the tensor's
       device type that is available and takes the tensor's dtype.
A backend that is named (1-3) but can't serve the call raises
:class:`BackendError` saying why and what is available; it is never replaced
silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os

import torch

from pyllm import _extension, reference
from pyllm.ops.registry import OPS

__all__ = [
    "BACKENDS",
    "DEFAULT_ORDER",
    "BackendError",
    "BackendStatus",
    "backends",
    "current_backend",
    "op_table",
    "route",
    "use_backend",
]

BACKENDS = ("cpu", "cuda", "triton", "reference")

#: Preference per device type when no backend is named.
DEFAULT_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

ANY = "any device"
_REFERENCE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendError(RuntimeError):
    """A named backend can't serve a call (not built, no device, wrong device)."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this install, and why (not)."""

    name: str
    available: bool
    detail: str
    device_types: tuple[str, ...]


def _serves(device_types: tuple[str, ...], device_type: str) -> bool:
    return ANY in device_types or device_type in device_types


def _has_kernel(qualname: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)


def triton_interpreting() -> bool:
    """Whether the Triton interpreter was switched on (TRITON_INTERPRET=1) at import."""
    return _TRITON_INTERPRET


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ENV_BACKEND = os.environ.get("PYLLM_BACKEND", "").strip() or None
_STACK: list[str] = []
# Filled by refresh(): backend -> BackendStatus; (op, backend) -> (device types
# it serves here, fn), for the usable implementations only.
_STATUS: dict[str, BackendStatus] = {}
# (op, backend) -> device types it has kernels for, usable here or not.
_KERNELS: dict[tuple[str, str], tuple[str, ...]] = {}
_IMPLS: dict[tuple[str, str], tuple[tuple[str, ...], object]] = {}
# route()'s memo: (op, device type, dtype, named backend or None) -> fn.
_ROUTES: dict[tuple, object] = {}


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _cuda_device() -> str | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def refresh() -> None:
    """Recomputes what is available (called once when pyllm is imported).

    Routing reads only the tables this fills, so that it is plain Python that
    ``torch.compile`` traces without a graph break.
    """
    from pyllm import _C

    info = _extension.build_info()
    device = _cuda_device()
    no_device = "no CUDA device (torch.cuda.is_available() is False)"
    archs = ", ".join("sm_" + a.replace(".", "").replace("+PTX", "") for a in info["cuda_archs"])
    triton_version = _triton_version()

    status = {}
    status["cpu"] = BackendStatus("cpu", True, f"C++ kernels, CPU ISA {_C.cpu_isa()}", ("cpu",))
    if not _extension.has_cuda_extension():
        cuda = BackendStatus("cuda", False, "pyllm._C_cuda was not built (CPU-only build)", ())
    elif device is None:
        cuda = BackendStatus("cuda", False, f"built for {archs}; {no_device}", ())
    else:
        cuda = BackendStatus("cuda", True, f"built for {archs}; device {device}", ("cuda",))
    status["cuda"] = cuda
    if triton_version is None:
        triton = BackendStatus("triton", False, "triton is not installed (pip install pyllm[gpu])", ())
    elif _TRITON_INTERPRET:
        types = ("cpu", "cuda") if device else ("cpu",)
        triton = BackendStatus("triton", True, f"triton {triton_version}, interpreter on (CPU tensors)",
                               types)
    elif device is None:
        triton = BackendStatus("triton", False, f"triton {triton_version}; {no_device}", ())
    else:
        triton = BackendStatus("triton", True, f"triton {triton_version}; device {device}", ("cuda",))
    status["triton"] = triton
    status["reference"] = BackendStatus("reference", True, "plain PyTorch, any device", (ANY,))

    kernels, impls = {}, {}
    for op in OPS:
        native = getattr(torch.ops.pyllm, op).default
        triton_op = getattr(torch.ops.pyllm, op + "_triton").default
        candidates = {
            "cpu": (_kernel_devices(f"pyllm::{op}", ("cpu",)), native),
            "cuda": (_kernel_devices(f"pyllm::{op}", ("cuda",)), native),
            "triton": (_kernel_devices(f"pyllm::{op}_triton", ("cuda", "cpu")), triton_op),
            "reference": ((ANY,), getattr(reference, OPS[op]["reference"])),
        }
        for name, (devices, fn) in candidates.items():
            kernels[(op, name)] = devices
            served = tuple(d for d in devices if _serves(status[name].device_types, d))
            if status[name].available and served:
                impls[(op, name)] = (served, fn)
    _STATUS.clear()
    _STATUS.update(status)
    _KERNELS.clear()
    _KERNELS.update(kernels)
    _IMPLS.clear()
    _IMPLS.update(impls)
    _ROUTES.clear()


def _kernel_devices(qualname: str, device_types: tuple[str, ...]) -> tuple[str, ...]:
    """The device types among ``device_types`` that ``qualname`` has a kernel for."""
    return tuple(d for d in device_types if _has_kernel(qualname, "CPU" if d == "cpu" else "CUDA"))


def backends() -> dict[str, BackendStatus]:
    """The backends of this install: for each, whether it can run and why (not)."""
    return dict(_STATUS)


def op_table() -> dict[str, dict[str, str]]:
    """For each op and backend: the device types it serves here; kernels that
    exist but can't run here in parentheses; '' when the backend has no kernel."""
    table = {}
    for op in OPS:
        row = {}
        for name in BACKENDS:
            if (op, name) in _IMPLS:
                row[name] = ", ".join(_IMPLS[(op, name)][0])
            elif _KERNELS.get((op, name)):
                row[name] = f"({', '.join(_KERNELS[(op, name)])})"
            else:
                row[name] = ""
        table[op] = row
    return table


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Routes every pyllm op called inside the block to backend ``name``.

    Process-wide (not per thread); contexts nest, the innermost wins; a
    ``backend=`` argument still wins over it.

    Example::

        with pyllm.use_backend("reference"):
            y = pyllm.rms_norm(x, w)
    """
    _STACK.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _STACK.pop()


def current_backend() -> str | None:
    """The backend named by use_backend() or PYLLM_BACKEND, or None for the default."""
    if _STACK:
        return _STACK[-1]
    return _ENV_BACKEND


def _available_for(op: str, device_type: str, dtype: torch.dtype) -> list[str]:
    return [b for b in BACKENDS if (op, b) in _IMPLS and _serves(_IMPLS[(op, b)][0], device_type)
            and dtype in _dtypes(op, b)]


def _dtypes(op: str, backend: str) -> frozenset:
    return _REFERENCE_DTYPES if backend == "reference" else OPS[op]["dtypes"]


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def route(op: str, tensor: torch.Tensor, backend: str | None = None):
    """The implementation of ``op`` that serves a call whose main input is ``tensor``.

    Returns a callable with the op's signature (an OpOverload, or a
    :mod:`pyllm.reference` function). Successful choices are memoised per
    (op, device type, dtype, named backend).
    """
    name = backend if backend is not None else (_STACK[-1] if _STACK else _ENV_BACKEND)
    key = (op, tensor.device.type, tensor.dtype, name)
    fn = _ROUTES.get(key)
    if type(tensor).__name__ == "DTensor":  # the ops' sharding rules, installed once
        from pyllm.distributed import register

        register()
    if fn is None:
        where = "backend=" if backend is not None else ("use_backend" if _STACK else "PYLLM_BACKEND")
        fn = _ROUTES[key] = _resolve(op, tensor, name, where)
    return fn


def _resolve(op: str, tensor: torch.Tensor, backend: str | None, where: str):
    device_type, dtype = tensor.device.type, tensor.dtype
    if backend is None:
        for name in DEFAULT_ORDER.get(device_type, ("reference",)):
            impl = _IMPLS.get((op, name))
            if impl is not None and _serves(impl[0], device_type) and dtype in _dtypes(op, name):
                return impl[1]
        raise BackendError(f"pyllm.{op}: no backend serves {device_type} tensors of {dtype}")
    _check_name(backend, f"pyllm.{op} ({where})")
    impl = _IMPLS.get((op, backend))
    if impl is None:
        status = _STATUS[backend]
        reason = status.detail if not status.available else f"it has no kernel for {op}"
        raise BackendError(
            f"pyllm.{op}: backend {backend!r} ({where}) is not available: {reason}. "
            f"Available here for {device_type} {dtype} inputs: "
            f"{', '.join(_available_for(op, device_type, dtype)) or 'none'}")
    if not _serves(impl[0], device_type):
        raise BackendError(
            f"pyllm.{op}: backend {backend!r} ({where}) serves {' and '.join(impl[0])} tensors, "
            f"but the input is on {tensor.device}. Available for {device_type} {dtype} inputs: "
            f"{', '.join(_available_for(op, device_type, dtype)) or 'none'}")
    if dtype not in _dtypes(op, backend):
        raise TypeError(
            f"pyllm.{op}: backend {backend!r} takes {_dtype_names(_dtypes(op, backend))} inputs, "
            f"got {dtype}. Available for {device_type} {dtype} inputs: "
            f"{', '.join(_available_for(op, device_type, dtype)) or 'none'}")
    return impl[1]
