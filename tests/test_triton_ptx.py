"""The Triton kernels as the launchers really launch them, compiled ahead of
time for sm_80 and sm_90, and what their PTX holds: the static speed
evidence until a GPU run.

Triton's JIT specialises each launch: pointers and integers that are
multiples of 16 get a divisibility hint, integers equal to 1 become
constants. tests/test_triton_compile.py compiles every shipped configuration
with hand-written hints; here the launchers (kernels/attention.py,
kernels/linear.py, kernels/norm.py) are run on CPU tensors, with the kernels
replaced by recorders, and each launch is
compiled with the specialisation Triton's own rule gives its arguments. The
shapes: the GPU suite's (``pyllm bench --suite gpu``), decode rows (M = 1,
which Triton turns into a constant), and head_dims 40 and 72; bfloat16.

For every attention and GEMM kernel the PTX must have tensor-core
instructions (mma.sync; wgmma where Triton uses it on sm_90), 16-byte global
loads, asynchronous tile copies (cp.async, or TMA) and no 2-byte scalar
loads; the norms (no matrix product) must load 16 bytes at a time. With
PYLLM_TRITON_PTX=<file> each compiled launch appends a row of these counts.
"""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

if importlib.util.find_spec("triton") is not None:
    import torch

    from gpu_binaries import (capture_launches, compile_triton, launch_specialization,
                              ptx_counts)
    from pyllm.benchmark.cases import CASES, GPU_CASES
    from pyllm.kernels import attention as attention_kernels
    from pyllm.kernels import linear as linear_kernels
    from pyllm.kernels import norm as norm_kernels

ARCHS = (80, 90)
ATTENTION = ["attention_forward_kernel", "attention_combine_kernel",
             "attention_backward_kv_kernel", "attention_backward_q_kernel"]
GEMM = ["matmul_kernel", "matmul_two_kernel", "matmul_accumulate_kernel"]
NORM = ["norm_forward_kernel", "norm_backward_kernel", "column_sum_kernel"]
#: Head dims that are not multiples of 16 (padded in the kernels, with the
#: launcher's D_MULTIPLE hint), on a prefill and a decode shape.
ODD_HEAD_DIMS = (40, 72)


def _attention_shapes():
    shapes = {c.dims for c in GPU_CASES if c.op == "attention"}
    for d in ODD_HEAD_DIMS:
        shapes |= {(2, 1024, 1024, 8, 8, d, True), (4, 1, 4096, 8, 2, d, True)}
    return sorted(shapes)


def _attention_launches(dims, dtype):
    b, sq, sk, h, hkv, d, causal = dims
    q = torch.empty(b, sq, h, d, dtype=dtype)
    k = torch.empty(b, sk, hkv, d, dtype=dtype)
    calls = capture_launches(attention_kernels, ATTENTION, attention_kernels.attention, q, k, k,
                             None, None, None, None, None, d ** -0.5, causal)
    if sq > 1:
        lse = torch.empty(b, h, sq)
        calls += capture_launches(attention_kernels, ATTENTION,
                                  attention_kernels.attention_backward, q, q, k, k, q, lse, None,
                                  None, None, None, None, d ** -0.5, causal)
    return calls


def _gemm_launches(dims, op, dtype):
    m, k, n, act = dims
    x = torch.empty(m, k, dtype=dtype)
    w = torch.empty(n, k, dtype=dtype)
    calls = []
    if op == "swiglu":
        calls += capture_launches(linear_kernels, GEMM, linear_kernels.swiglu, x, w, w, None, None)
        calls += capture_launches(linear_kernels, GEMM, linear_kernels.swiglu_backward,
                                  torch.empty(m, n, dtype=dtype), x, w, w, None, None,
                                  [True, True, True, False, False])
    else:
        b = torch.empty(n, dtype=dtype)
        calls += capture_launches(linear_kernels, GEMM, linear_kernels.linear, x, w, b, act)
        calls += capture_launches(linear_kernels, GEMM, linear_kernels.linear_backward,
                                  torch.empty(m, n, dtype=dtype), x, w, b, act,
                                  [True, True, False])
    # An autotuned kernel launches one of its configurations: the first one
    # here (tests/test_triton_compile.py compiles every one).
    expanded = []
    for kernel, args, kwargs in calls:
        configs = getattr(kernel, "configs", None)
        if configs is None:  # the accumulating kernel: one fixed configuration
            configs = [linear_kernels.ACCUMULATE_CONFIG]
        for config in configs[:1]:
            expanded.append((linear_kernels._matmul_kernel, args,
                             {**kwargs, **config.kwargs, "num_warps": config.num_warps,
                              "num_stages": config.num_stages}))
    return expanded


def _norm_launches(dims, op, dtype):
    rows, hidden = dims
    x = torch.empty(rows, hidden, dtype=dtype)
    w = torch.empty(hidden, dtype=dtype)
    rms = "rms" in op
    residual = x if op.startswith("add_") else None
    calls = capture_launches(norm_kernels, NORM, norm_kernels.norm_forward, x, residual, w,
                             None if rms else w, 1e-6, rms)
    stats = torch.empty(rows)
    calls += capture_launches(norm_kernels, NORM, norm_kernels.norm_backward, x, x,
                              None if rms else stats, stats, w, None, True, True, not rms, rms)
    return calls


def _launches():
    """Every distinct specialised launch at the benchmark shapes:
    {key: (kernel, signature, constexprs, divisible, warps, stages, shape)}."""
    found = {}
    # bfloat16, as the GPU suite runs (float16 compiles to the same
    # instructions; tests/test_triton_compile.py compiles both).
    for dtype in (torch.bfloat16,):
        groups = [(dims, _attention_launches(dims, dtype)) for dims in _attention_shapes()]
        groups += [(c.dims, _gemm_launches(c.dims, c.op, dtype)) for c in GPU_CASES + [
            c for c in CASES if c.op == "linear" and c.dims[0] == 1] if c.op in ("linear", "swiglu")]
        groups += [(c.dims, _norm_launches(c.dims, c.op, dtype)) for c in GPU_CASES + [
            c for c in CASES if c.dims[0] == 1] if "norm" in c.op]
        for dims, calls in groups:
            for kernel, args, kwargs in calls:
                spec = launch_specialization(kernel, args, kwargs)
                signature, constexprs, divisible, warps, stages = spec
                key = (kernel.__name__, tuple(signature.items()),
                       tuple(sorted((k, str(v)) for k, v in constexprs.items())), divisible,
                       warps, stages)
                found.setdefault(key, (kernel, *spec, dims))
    return found


LAUNCHES = _launches() if importlib.util.find_spec("triton") is not None else {}


def _label(key):
    name, signature, constexprs, _, warps, stages = key
    shown = {k: v for k, v in constexprs if k.startswith(("BLOCK", "D_MULT", "SPLIT", "EPI"))}
    dtype = next((t[1:] for _, t in signature if t in ("*fp16", "*bf16")), "")
    return f"{name}-{dtype}-" + "-".join(f"{k}{v}" for k, v in shown.items()) + \
        f"-w{warps}s{stages}"


def _report(kernel, arch, counts, usage, constexprs, dims):
    path = os.environ.get("PYLLM_TRITON_PTX")
    if path:
        with open(path, "a") as f:
            shown = " ".join(f"{k}={v}" for k, v in constexprs.items()
                             if k.startswith(("BLOCK", "D_MULT", "SPLIT", "EPI")))
            f.write(f"{kernel.__name__}\tsm_{arch}\t{dims}\t{shown}\tREG={usage['REG']}\t"
                    + "\t".join(f"{k}={v}" for k, v in counts.items()) + "\n")


def test_the_launches_cover_every_kernel():
    names = {key[0] for key in LAUNCHES}
    assert names >= {"attention_forward_kernel", "attention_combine_kernel",
                     "attention_backward_kv_kernel", "attention_backward_q_kernel",
                     "_matmul_kernel", "norm_forward_kernel", "norm_backward_kernel"}, names
    # the launcher's D_MULTIPLE hint is what the odd head dims get
    multiples = {dict(key[2]).get("D_MULTIPLE") for key in LAUNCHES
                 if key[0] == "attention_forward_kernel"}
    assert {"8", "16"} <= multiples, multiples


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", list(LAUNCHES), ids=_label)
def test_launched_specialisation_has_fast_instructions(key, arch):
    kernel, signature, constexprs, divisible, warps, stages, dims = LAUNCHES[key]
    compiled, usage = compile_triton(kernel, signature, constexprs, arch, warps, stages,
                                     divisible)
    counts = ptx_counts(compiled.asm["ptx"])
    _report(kernel, arch, counts, usage, constexprs, dims)
    assert usage["LOCAL"] == 0 and usage["SPILL"] == 0, f"register spills: {usage}"
    name = kernel.__name__
    if name in ("attention_combine_kernel", "column_sum_kernel"):
        return  # fp32 reductions of partial results: no tiles of the inputs
    if name.startswith("norm_"):
        assert counts["ld.v4 (16 B)"] > 0, counts
        assert counts["ld scalar 2 B"] == 0, counts
        return
    assert counts["mma.sync"] + counts["wgmma"] > 0, counts
    assert counts["ld.v4 (16 B)"] + counts["cp.async 16 B"] + counts["TMA"] > 0, counts
    assert counts["ld scalar 2 B"] == 0, counts
    if constexprs.get("K") == 1:
        return  # dW of a one-row GEMM, K = 1 (a constant): one step, nothing to pipeline
    assert counts["cp.async 16 B"] + counts["TMA"] > 0, counts
