"""A small call of every kernel of every backend on one device, forward and
backward: what tools/gpu_check.py runs under ``compute-sanitizer --tool
memcheck`` (and, in its dry run, on the CPU backend, to prove the list).

    python tools/kernel_calls.py cuda      # the triton and cuda backends
    python tools/kernel_calls.py cpu       # the cpu backend

Odd sizes (tails of every tile), GQA, causal and not, varlen, decode, bias,
both low-precision dtypes. Each call's outputs and gradients must be finite;
it prints "N passed, N failed", then the seconds the calls took.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import pyllm
from pyllm import backend as backend_module


def _calls(device, dtype):
    """(name, op-name, function of a backend name returning the tensors to check)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype) \
            .requires_grad_()

    def grads(out, leaves):
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.randn(out.shape, generator=g).to(device=device, dtype=out.dtype))
        return [out] + [t.grad for t in leaves]

    rows, hidden = 37, 1000
    x, r = randn(rows, hidden), randn(rows, hidden)
    w, b = randn(hidden, scale=0.1), randn(hidden, scale=0.1)

    def norm(op, leaves):
        def run(be):
            for t in leaves:
                t.grad = None
            return grads(getattr(pyllm, op)(*leaves, backend=be), leaves)
        return run

    yield "rms_norm", "rms_norm", norm("rms_norm", [x, w])
    yield "layer_norm", "layer_norm", norm("layer_norm", [x, w, b])
    yield "add_rms_norm", "add_rms_norm", norm("add_rms_norm", [x, r, w])
    yield "add_layer_norm", "add_layer_norm", norm("add_layer_norm", [x, r, w, b])

    def attention(q, k, v, **kwargs):
        def run(be):
            for t in (q, k, v):
                t.grad = None
            return grads(pyllm.attention(q, k, v, backend=be, **kwargs), [q, k, v])
        return run

    for d in (64, 72, 128):
        q, k, v = randn(2, 67, 8, d), randn(2, 67, 2, d), randn(2, 67, 2, d)
        yield f"attention d{d} gqa causal", "attention", attention(q, k, v, causal=True)
    q, k, v = randn(2, 33, 4, 64), randn(2, 91, 4, 64), randn(2, 91, 4, 64)
    bias = randn(2, 4, 33, 91, scale=0.5).detach()
    yield "attention cross bias", "attention", attention(q, k, v, bias=bias)
    q, k, v = randn(3, 1, 8, 128), randn(3, 700, 2, 128), randn(3, 700, 2, 128)
    yield "attention decode", "attention", attention(q, k, v, causal=True)

    cu = torch.tensor([0, 5, 5, 48, 61], dtype=torch.int32, device=device)
    qv, kv, vv = randn(61, 4, 64), randn(61, 2, 64), randn(61, 2, 64)

    def varlen(be):
        for t in (qv, kv, vv):
            t.grad = None
        return grads(pyllm.attention_varlen(qv, kv, vv, cu, cu, causal=True, backend=be),
                     [qv, kv, vv])
    yield "attention varlen", "attention", varlen

    # a paged KV cache: 3 sequences in shuffled pages of 16 (chunked prefill,
    # then decode), and the append of new tokens with rotary on the way
    pages_k = randn(20, 16, 2, 64).detach()
    pages_v = randn(20, 16, 2, 64).detach()
    table = torch.randperm(20, generator=g)[:18].view(3, 6).to(device=device,
                                                             dtype=torch.int32)
    seqlens = torch.tensor([90, 7, 33], dtype=torch.int32, device=device)
    cu_q = torch.tensor([0, 20, 21, 54], dtype=torch.int32, device=device)
    qp, qd = randn(54, 4, 64).detach(), randn(3, 1, 4, 64).detach()

    def paged(be):
        with torch.no_grad():
            chunk = pyllm.attention_paged(qp, pages_k, pages_v, table, seqlens,
                                          cu_seqlens_q=cu_q, causal=True, backend=be)
            step = pyllm.attention_paged(qd, pages_k, pages_v, table, seqlens, causal=True,
                                         backend=be)
        return [chunk, step]
    yield "attention paged", "attention", paged
    cos_p, sin_p = (t.to(device) for t in pyllm.rotary_tables(48, 128))
    new_k, new_v = randn(5, 2, 64).detach(), randn(5, 2, 64).detach()
    new_q = randn(5, 4, 64).detach()
    slots = torch.tensor([3, 70, -1, 319, 100], device=device)
    positions = torch.tensor([0, 5, 9, 127, 64], device=device)

    def append(be):
        k_cache, v_cache, q_new = pages_k.clone(), pages_v.clone(), new_q.clone()
        pyllm.paged_kv_append(k_cache, v_cache, new_k, new_v, slots, q=q_new, cos=cos_p,
                              sin=sin_p, positions=positions, backend=be)
        return [k_cache, v_cache, q_new]
    yield "paged_kv_append", "paged_kv_append", append

    xl = randn(45, 200)
    wl, bl = randn(300, 200, scale=0.07), randn(300, scale=0.1)

    def linear(be):
        for t in (xl, wl, bl):
            t.grad = None
        return grads(pyllm.linear(xl, wl, bl, "gelu_tanh", backend=be), [xl, wl, bl])
    yield "linear gelu", "linear", linear
    wg, wu = randn(300, 200, scale=0.07), randn(300, 200, scale=0.07)

    def swiglu(be):
        for t in (xl, wg, wu):
            t.grad = None
        return grads(pyllm.swiglu(xl, wg, wu, backend=be), [xl, wg, wu])
    yield "swiglu", "swiglu", swiglu

    qr, kr = randn(3, 29, 8, 96), randn(3, 29, 2, 96)
    cos, sin = (t.to(device) for t in pyllm.rotary_tables(64, 128))

    def rotary(interleaved):
        def run(be):
            for t in (qr, kr):
                t.grad = None
            q, k = pyllm.rotary(qr * 1, kr * 1, cos, sin, offset=50, interleaved=interleaved,
                                backend=be)
            return grads(q + k.repeat_interleave(4, 2), [qr, kr])
        return run
    yield "rotary partial", "rotary", rotary(False)
    yield "rotary interleaved", "rotary", rotary(True)

    logits = randn(19, 3001, scale=3.0)
    labels = torch.randint(0, 3001, (19,), generator=g).to(device)
    labels[4] = -100

    def cross_entropy(be):
        logits.grad = None
        loss = pyllm.cross_entropy(logits, labels, label_smoothing=0.1, z_loss=1e-3, softcap=20.0,
                                   backend=be)
        return grads(loss, [logits])
    yield "cross_entropy", "cross_entropy", cross_entropy


def serves(op: str, backend: str, device: str) -> bool:
    """Whether ``backend`` has a kernel for ``op`` that runs on ``device`` here
    (pyllm.backend.op_table() names such devices, without parentheses)."""
    entry = backend_module.op_table()[op].get(backend, "")
    return not entry.startswith("(") and device in [d.strip() for d in entry.split(",")]


def backends_for(device: str) -> list[str]:
    """The kernel backends with a kernel for this device type in this install."""
    names = ("triton", "cuda") if device == "cuda" else ("cpu",)
    return [n for n in names if any(serves(op, n, device) for op in backend_module.OPS)]


def main(argv=None) -> int:
    device = (argv or sys.argv[1:] or ["cuda"])[0]
    passed = failed = 0
    start = time.time()
    backends = backends_for(device)
    if not backends:
        print(f"no kernel backend for device {device} in this install")
        print("0 passed, 1 failed")
        return 1
    for dtype in (torch.float16, torch.bfloat16):
        for name, op, run in _calls(device, dtype):
            for be in backends:
                if not serves(op, be, device):
                    continue
                label = f"{be:<7} {str(dtype)[6:]:<9} {name}"
                try:
                    tensors = run(be)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    bad = [i for i, t in enumerate(tensors) if not torch.isfinite(t).all()]
                    if bad:
                        raise AssertionError(f"non-finite values in results {bad}")
                    passed += 1
                    print(f"ok      {label}", flush=True)
                except Exception as e:  # noqa: BLE001 - reported, then the next call
                    failed += 1
                    print(f"FAILED  {label}: {type(e).__name__}: {e}", flush=True)
    print(f"{passed} passed, {failed} failed")
    print(f"calls done in {time.time() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    if torch.cuda.is_initialized():
        # Every kernel has run and been synchronised above, so compute-sanitizer
        # has seen each access; the interpreter's teardown (module and context
        # unloading under the sanitizer) adds nothing to check and outlasted
        # the stage's time limit on an H200, so it is skipped.
        torch.cuda.synchronize()
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)
