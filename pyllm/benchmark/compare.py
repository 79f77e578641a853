"""``pyllm bench --compare OLD.json``: the change of every row against an
earlier run, and whether any of pyllm's rows got slower than a threshold.

A machine's speed drifts between runs (other load, memory state), so a pyllm
row is judged by its time relative to PyTorch eager's in the same run: the
regression check compares (pyllm / eager) now with (pyllm / eager) then, and
falls back to the raw change where a run has no eager row."""

from __future__ import annotations

import json

__all__ = ["compare", "load"]

_KEY = ("op", "model", "case", "dtype", "mode", "implementation")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def compare(rows: list[dict], old_rows: list[dict], threshold: float) -> tuple[str, bool]:
    """Returns the comparison table and whether a pyllm row regressed: its
    median time grew by more than ``threshold`` (0.15 = 15%)."""
    old = {tuple(r.get(k, "fwd" if k == "mode" else None) for k in _KEY): r for r in old_rows}
    lines = [f"{'op':<14} {'model':<10} {'case':<13} {'dtype':<9} {'mode':<8} "
             f"{'implementation':<14} {'old':>10} {'new':>10} {'change':>8} {'vs eager':>9}"]
    new_index = {tuple(r.get(k) for k in _KEY): r for r in rows}

    def eager_of(index, r):
        key = tuple(r.get(k, "fwd" if k == "mode" else None) for k in _KEY[:-1]) + ("torch:eager",)
        found = index.get(key)
        return found["median_ms"] if found is not None and found.get("status") == "ok" else None

    regressed = False
    matched = 0
    for r in rows:
        before = old.get(tuple(r.get(k) for k in _KEY))
        if before is None or r["status"] != "ok" or before.get("status") != "ok":
            continue
        matched += 1
        change = r["median_ms"] / before["median_ms"] - 1.0
        eager_new, eager_old = eager_of(new_index, r), eager_of(old, before)
        relative = None
        if eager_new and eager_old:
            relative = (r["median_ms"] / eager_new) / (before["median_ms"] / eager_old) - 1.0
        judged = relative if relative is not None else change
        slower = r["implementation"].startswith("pyllm:") and judged > threshold
        regressed |= slower
        rel = f"{100 * relative:>+8.1f}%" if relative is not None and r["implementation"] != "torch:eager" else f"{'':>9}"
        lines.append(f"{r['op']:<14} {r['model']:<10} {r['case']:<13} {r['dtype']:<9} "
                     f"{r['mode']:<8} {r['implementation']:<14} {before['median_ms']:>8.3f}ms "
                     f"{r['median_ms']:>8.3f}ms {100 * change:>+7.1f}% {rel}"
                     + ("  SLOWER" if slower else ""))
    lines.append(f"{matched} rows compared; threshold {100 * threshold:.0f}%: "
                 + ("a pyllm row got slower" if regressed else "no pyllm row got slower"))
    return "\n".join(lines), regressed
