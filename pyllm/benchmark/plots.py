"""PNG plots of a ``pyllm bench`` run: per op, throughput against problem
size, one line per implementation, one panel per dtype, mode and unit
(GFLOP/s for compute-bound cases, GB/s for memory-bound ones)."""

from __future__ import annotations

import os

__all__ = ["plot"]

#: FLOP per byte above which a case is plotted as GFLOP/s rather than GB/s.
COMPUTE_BOUND = 8.0


def _rate(row: dict) -> tuple[float, str]:
    if "gflops" in row and ("gbps" not in row or row["gflops"] / row["gbps"] > COMPUTE_BOUND):
        return row["gflops"], "GFLOP/s"
    return row.get("gbps", 0.0), "GB/s"


def _work(row: dict) -> float:
    """A size to order the cases by: the rate times the time."""
    rate, _ = _rate(row)
    return rate * row["median_ms"]


def plot(rows: list[dict], output_dir: str) -> list[str]:
    """Writes plot-<op>.png per op into output_dir; returns the paths ([] when
    matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(output_dir, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    paths = []
    for op in dict.fromkeys(r["op"] for r in ok):
        panels = list(dict.fromkeys((r["dtype"], r["mode"], _rate(r)[1]) for r in ok if r["op"] == op))
        cols = min(2, len(panels))
        grid_rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(grid_rows, cols, figsize=(7 * cols, 4.5 * grid_rows),
                                 squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (dtype, mode, unit) in zip(axes.flat, panels):
            sel = [r for r in ok if r["op"] == op and r["dtype"] == dtype and r["mode"] == mode
                   and _rate(r)[1] == unit]
            cases = sorted(dict.fromkeys((r["model"], r["case"]) for r in sel),
                           key=lambda c: max(_work(r) for r in sel if (r["model"], r["case"]) == c))
            for impl in dict.fromkeys(r["implementation"] for r in sel):
                values = []
                for c in cases:
                    match = [r for r in sel if (r["model"], r["case"]) == c and r["implementation"] == impl]
                    values.append(_rate(match[0])[0] if match else float("nan"))
                ax.plot(range(len(cases)), values, marker="o", label=impl)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{m}\n{c}" for m, c in cases], rotation=45, ha="right", fontsize=7)
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op} {dtype} {mode}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(output_dir, f"plot-{op}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
