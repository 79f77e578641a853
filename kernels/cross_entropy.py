"""Cross-entropy in Triton (pyllm::cross_entropy): one program per row of
logits, two passes over the vocabulary. The first keeps a running max and sum
of exponentials (online softmax) and the sum of z for label smoothing; the
second writes the gradient p (1 + 2 z_loss lse) - eps / V - (1 - eps) onehot
(times the softcap's derivative). All in float32; a NaN or +inf logit, or a
target outside the vocabulary, gives a NaN row (nothing is read outside it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyllm.kernels.launch import on_device, register

#: Vocabulary elements per step of a program.
BLOCK = 2048


@triton.jit
def _tanh_and_derivative(y):
    """(tanh y, 1 - tanh^2 y) to a few ulp: the odd series below |y| = 0.3
    (where 1 - e^-2|y| would cancel), else from e = e^-2|y|: (1 - e) / (1 + e)
    and 4e / (1 + e)^2 (1 - t^2 would cancel near |t| = 1)."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    y2 = y * y
    series = a * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * (0.021869488536155203 + y2 * -0.008863235529902197)))))
    small = a < 0.3
    t = tl.where(small, series, (1.0 - e) / (1.0 + e))
    d = tl.where(small, 1.0 - series * series, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return tl.where(y < 0, -t, t), d


@triton.jit
def _softcapped(x, softcap, CAPPED: tl.constexpr):
    if CAPPED:
        t, _ = _tanh_and_derivative(x / softcap)
        x = softcap * t
    return x


@triton.jit
def cross_entropy_kernel(LOGITS, TARGET, LOSS, LSE, GRAD, stride, vocab, ignore_index,
                         smoothing, z_loss, softcap, WANT_GRAD: tl.constexpr,
                         CAPPED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)
    x_row = LOGITS + row * stride
    g_row = GRAD + row * vocab
    offs = tl.arange(0, BLOCK)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if WANT_GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(GRAD.dtype.element_ty),
                         mask=cols < vocab)
        return
    m = -float("inf")
    s = 0.0
    sum_z = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        ok = cols < vocab
        z = _softcapped(tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32), softcap, CAPPED)
        sum_z += tl.sum(tl.where(ok, z, 0.0))
        z = tl.where(ok, z, -float("inf"))
        new_m = tl.maximum(m, tl.max(z))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m))
        m = new_m
    valid = (target >= 0) & (target < vocab)
    bad = (not valid) | (sum_z != sum_z) | (m == float("inf")) | (m == -float("inf"))
    safe_target = tl.where(valid, target, 0)
    zt = _softcapped(tl.load(x_row + safe_target).to(tl.float32), softcap, CAPPED)
    lse = m + tl.log(s)
    smooth_term = tl.where(smoothing > 0, smoothing * (lse - sum_z / vocab), 0.0)
    loss = (1.0 - smoothing) * (lse - zt) + smooth_term + z_loss * lse * lse
    nan = float("nan")
    tl.store(LOSS + row, tl.where(bad, nan, loss))
    tl.store(LSE + row, tl.where(bad, nan, lse))
    if WANT_GRAD:
        zscale = 2.0 * z_loss * lse  # the z-loss's share, added apart
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            ok = cols < vocab
            x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            if CAPPED:
                t, dz = _tanh_and_derivative(x / softcap)
                z = softcap * t
            else:
                z = x
            p = tl.exp(z - lse)
            g = p - smoothing / vocab
            g = tl.where(cols == target, g - (1.0 - smoothing), g) + zscale * p
            if CAPPED:
                g = g * dz
            g = tl.where(bad, nan, g)
            tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=ok)


def launch_config(vocab: int) -> dict:
    """(BLOCK, warps) for a vocabulary of ``vocab``."""
    block = min(BLOCK, triton.next_power_of_2(max(vocab, 1)))
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                  label_smoothing: float, z_loss: float, softcap: float, want_grad: bool):
    """pyllm::cross_entropy_triton (the Python face checked the arguments)."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty(logits.shape if want_grad else (0,), dtype=logits.dtype,
                       device=logits.device)
    if rows == 0:
        return loss, lse, grad
    stride = logits.stride(0) if rows > 1 else vocab
    with on_device(logits):
        cross_entropy_kernel[(rows,)](
            logits, target, loss, lse, grad if want_grad else loss, stride, vocab, ignore_index,
            float(label_smoothing), float(z_loss), float(softcap) if softcap else 1.0,
            WANT_GRAD=want_grad, CAPPED=bool(softcap), **launch_config(vocab))
    return loss, lse, grad


register("cross_entropy_triton", cross_entropy)
