"""The shared harness of every kernel test.

The rule (pyllm.accuracy, after flash-attn's tests): compute the truth in
float64 from the same inputs, and PyTorch's own answer in the precision under
test; a kernel passes if ``max|ours - truth| <= factor * max|pytorch - truth| +
floor``, factor 2 for outputs and 3 for gradients. A NaN never passes.

Outputs are poisoned: inside :func:`poisoned_outputs` every fresh torch
allocation (``torch.empty``, ``at::empty``) is filled with NaN, so an element
a kernel forgot to write fails the NaN check. Inputs are fresh seeded random
values, never zeros.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import zlib

import torch
import torch.utils.deterministic

from pyllm.accuracy import judge

ODD_SIZES = (1, 7, 127, 1000)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def generator(*key) -> torch.Generator:
    """A generator seeded from ``key`` (e.g. the test's parameters), so every
    case draws its own inputs and a failure reproduces."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32("/".join(str(k) for k in key).encode()))
    return g


def randn(shape, dtype=torch.float32, *, gen: torch.Generator, device="cpu", scale=1.0,
          offset=0.0) -> torch.Tensor:
    """Normal random values in ``dtype`` (drawn in float64, then rounded)."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    return t.to(dtype=dtype, device=device)


def as64(*ts) -> list:
    """The tensors in float64 (None stays None): the reference's inputs."""
    return [t.double() if t is not None else None for t in ts]


def grads_of(fn, tensors, grads) -> list:
    """The gradients of ``sum_i <out_i, grads_i>`` with respect to each of
    ``tensors`` (None stays None), ``out = fn(*tensors)`` one tensor or a
    tuple, ``grads`` one tensor or a sequence like it (cast to each output's
    dtype)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    outs = fn(*leaves)
    if isinstance(outs, torch.Tensor):
        outs, grads = (outs,), (grads,)
    torch.autograd.backward(list(outs), [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [t.grad if t is not None else None for t in leaves]


def check_compiles_fullgraph(module: torch.nn.Module, x: torch.Tensor, ops: dict) -> None:
    """``torch.compile(module, fullgraph=True)`` traces one graph in which (with
    its subgraphs) each ``torch.ops.pyllm.<op>`` of ``ops`` appears the given
    number of times, and
    gives the eager module's output and input gradient (with a recording
    backend, then with inductor)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = x.detach().clone().requires_grad_()
    out = torch.compile(module, fullgraph=True, backend=record)(x)
    out.sum().backward()
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    # the graph and its subgraphs (an autograd.Function's forward and backward)
    targets = [n.target for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes if n.op == "call_function"]
    for op, count in ops.items():
        found = targets.count(getattr(torch.ops.pyllm, op).default)
        assert found == count, f"pyllm::{op} appears {found} times in the graph, not {count}"
    x2 = x.detach().clone().requires_grad_()
    ref = module(x2)
    torch.testing.assert_close(out, ref)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x.detach()), ref.detach())


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of a
    buffer twice as long in the last dimension)."""
    buffer = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype,
                        device=t.device)
    view = buffer[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored with the last two dimensions swapped in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@contextlib.contextmanager
def poisoned_outputs():
    """Every fresh allocation inside the block is filled with NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def check_rule(ours: torch.Tensor, truth: torch.Tensor, pytorch: torch.Tensor, *,
               factor: float = 2.0, what: str = "output", noise: float = 0.0) -> None:
    """Asserts the rule (pyllm.accuracy) for one tensor: factor 2 for outputs,
    3 for gradients; ``noise`` raises the floor by a rounding the algorithm
    must make and PyTorch's composition does not (flash_backward_noise)."""
    verdict = judge(ours, truth, pytorch, factor=factor, what=what)
    assert verdict.ok or (not torch.isnan(ours).any() and verdict.error <= verdict.bound + noise), (
        f"{verdict.reason} (algorithm's rounding noise {noise:.3g})")


def flash_backward_noise(q, k, v, grad, scale=None) -> list:
    """(dq, dk, dv) noise of FlashAttention's backward that PyTorch's
    composition does not have: dS = P (dP - D) with dP = dO . v and D =
    rowsum(dO * O) two float32 sums of size |dO| |v|, summed in different
    orders on a GPU (tensor-core products against a reduction), so where a
    query sees one key (dq = dk = 0 exactly in PyTorch) dq and dk are off by
    about eps32 |dO| |v| |k| scale and eps32 |dO| |v| |q| scale. Twice that."""
    eps = torch.finfo(torch.float32).eps
    norm = lambda t: float(t.double().norm(dim=-1).max()) if t.numel() else 0.0  # noqa: E731
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ds = 2 * eps * norm(grad) * norm(v) * scale
    return [ds * norm(k), ds * norm(q), 0.0]


def lse_rounding_noise(lse, grad, exact_dq, dv_of) -> list:
    """(dq, dk, dv) noise of a backward that recomputes P = exp(s - lse) from
    the forward's float32 lse (every CPU and FlashAttention-style backward),
    which PyTorch's composition does not have: it keeps P, normalised by a
    division. Storing lse rounds it by up to half an ulp of |lse| (2.4e-7 for
    |lse| in [4, 8)), the same relative error e_q in every P of query q's row.
    dS = P (dP - D) scales with P (D comes from the output, not P), so dQ_q
    moves by at most e_q |dQ_q|; dV_k = sum_q P_qk dO_q by at most sum_q e_q
    P_qk |dO_q|, which is the exact dV for the incoming gradient e_q |dO_q|
    (dV is linear in it): ``dv_of(g)`` computes that in float64. dK's share
    is not bounded here (0).

    lse: the true (float64) lse, (batch, heads, seq_q); grad: (batch, seq_q,
    heads, d); exact_dq: the true dQ, grad's shape."""
    l32 = lse.float().abs()
    half_ulp = (torch.nextafter(l32, torch.tensor(float("inf"))) - l32).double() / 2
    half_ulp = torch.where(torch.isfinite(lse), half_ulp, torch.zeros_like(half_ulp))
    e = half_ulp.transpose(1, 2)[..., None]  # grad's layout
    dq = float((e * exact_dq.abs()).max()) if exact_dq.numel() else 0.0
    dv = dv_of(e * grad.double().abs())
    return [dq, 0.0, float(dv.abs().max()) if dv.numel() else 0.0]


#: Set when the tests run against an installed pyllm (tests/test_wheels.py):
#: the package folder it must come from; subprocesses then start outside the
#: source tree, so that they import the same installed package.
INSTALLED_PACKAGE_DIR = os.environ.get("PYLLM_EXPECT_PACKAGE_DIR")


def run_python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (for settings read at import time:
    TRITON_INTERPRET, PYLLM_BACKEND, PYLLM_CPU_ISA); ``tests/`` is importable."""
    full_env = {**os.environ, **(env or {})}
    code = f"import sys\nsys.path.insert(0, {TESTS_DIR!r})\n" + code
    cwd = os.path.dirname(INSTALLED_PACKAGE_DIR) if INSTALLED_PACKAGE_DIR else REPO_ROOT
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


ISAS = ("generic", "avx2", "avx512", "avx512_bf16")


def run_under_isa(isa: str, body: str) -> None:
    """Runs ``body`` (Python; the tests folder importable) in a fresh process
    with ``PYLLM_CPU_ISA=isa``, and asserts that it passed and that the kernels
    ran exactly that ISA. Where this CPU lacks ``isa`` the test is skipped,
    saying so (a lower ISA running instead would test something else)."""
    import pytest

    from pyllm import _C

    detected = _C.cpu_isa_detected()
    if ISAS.index(detected) < ISAS.index(isa):
        pytest.skip(f"this CPU's best instruction set is {detected}, below {isa}")
    code = "from pyllm import _C\nprint(_C.cpu_isa())\n" + textwrap.dedent(body)
    result = run_python(code, env={"PYLLM_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = result.stdout.split()[0]
    assert chosen == isa, f"PYLLM_CPU_ISA={isa} ran {chosen}"


def run_pytest_in_interpreter(path: str, report: str, *, collect_only: bool = False,
                              timeout: float = 1800) -> subprocess.CompletedProcess:
    """Runs (or only collects) the tests under ``path`` in a fresh process
    with the Triton interpreter on (TRITON_INTERPRET=1 must be set before
    triton is imported), where Triton kernels run on CPU tensors; each test's
    outcome goes to the JSON file ``report`` (tests/interpreter_report.py)."""
    command, env = _interpreter_command(path, report, collect_only)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def start_pytest_in_interpreter(path: str, report: str, output) -> subprocess.Popen:
    """:func:`run_pytest_in_interpreter` started in the background: the
    process's stdout and stderr go to the open file ``output``."""
    command, env = _interpreter_command(path, report, False)
    return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def _interpreter_command(path: str, report: str, collect_only: bool):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYLLM_INTERPRETER_REPORT": report,
           "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    # PYLLM_INTERPRETER_DESELECT: a -k expression of tests to leave out (the
    # torch matrix leaves out the slow property and NaN/Inf tests, which the
    # main run has).
    deselect = os.environ.get("PYLLM_INTERPRETER_DESELECT")
    select = ["-k", f"not ({deselect})"] if deselect else []
    # The caller's working folder, not the source tree's root: under an
    # installed wheel (PYLLM_EXPECT_PACKAGE_DIR) the source tree must not be
    # what `python -m` puts first on sys.path.
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
            "interpreter_report", *(["--collect-only"] if collect_only else []), *select,
            os.path.join(REPO_ROOT, path)], env
