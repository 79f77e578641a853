"""The accuracy rule every kernel is held to, shared by the tests and ``pyllm bench``.

After flash-attn's tests: compute the truth in float64 from the same inputs and
PyTorch's own answer in the precision under test; a result passes if

    max|ours - truth| <= factor * max|pytorch - truth| + floor

with factor 2 for outputs and 3 for gradients, and ``floor`` the rounding of
the output dtype near the output's magnitude: ``2 * max|(r + 0.3 - 0.3) - r|``
for ``r`` the truth rounded to that dtype (flash-attn 3's floor), and at least
one unit in the last place at ``max|truth|`` (the first term is a statistic
that can be 0 for a handful of values that all happen to round exactly). A NaN
never passes.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Verdict", "max_error", "rounding_floor", "judge"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`judge`: the errors and the bound they were held to."""

    ok: bool
    error: float
    pytorch_error: float
    floor: float
    bound: float
    reason: str


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """max |value - truth| in float64; a NaN counts as an infinite error."""
    diff = (value.detach().to(torch.float64) - truth.detach().to(torch.float64)).abs()
    if diff.numel() == 0:
        return 0.0
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max())


def rounding_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """The rounding of ``dtype`` near the magnitude of ``truth`` (see the module docstring)."""
    if truth.numel() == 0:
        return 0.0
    r = truth.detach().to(dtype)
    flash = 2.0 * float((((r + 0.3) - 0.3) - r).abs().max().to(torch.float64))
    ulp = torch.finfo(dtype).eps * float(truth.detach().abs().max().to(torch.float64))
    return max(flash, ulp)


def judge(ours: torch.Tensor, truth: torch.Tensor, pytorch: torch.Tensor, *,
          factor: float = 2.0, what: str = "output") -> Verdict:
    """Applies the rule to one tensor. ``ours`` and ``pytorch`` are in the
    precision under test, ``truth`` in float64, all of one shape."""
    if ours.shape != truth.shape:
        return Verdict(False, float("inf"), 0.0, 0.0, 0.0,
                       f"{what}: shape {tuple(ours.shape)}, expected {tuple(truth.shape)}")
    if torch.isnan(ours).any():
        return Verdict(False, float("inf"), 0.0, 0.0, 0.0,
                       f"{what}: NaN in the result (an unwritten or bad element)")
    err = max_error(ours, truth)
    err_pytorch = max_error(pytorch, truth)
    floor = rounding_floor(truth, ours.dtype)
    bound = factor * err_pytorch + floor
    ok = err <= bound
    reason = (f"{what}: max error {err:.3g} {'<=' if ok else '>'} {factor} x PyTorch's "
              f"{err_pytorch:.3g} + floor {floor:.3g} (= {bound:.3g}), dtype {ours.dtype}")
    return Verdict(ok, err, err_pytorch, floor, bound, reason)
