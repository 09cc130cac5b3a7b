"""The trade-off plots (matplotlib on the Agg backend, imported only when a plot is drawn)."""
from __future__ import annotations

import math
from pathlib import Path

from ..outputs import atomic_write

__all__ = ["pyplot", "plot_sweep", "pareto_front"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # late: a heavy optional dependency, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finite(v):
    """``v`` when it is a finite number (not a bool), else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def pareto_front(rows: list[dict], cost: str, metric: str) -> list[dict]:
    """The rows no other row beats on both ``cost`` (lower is better) and ``metric`` (higher is better).

    Example:
        >>> rows = [{"c": 1, "m": 0.9}, {"c": 2, "m": 0.8}, {"c": 0.5, "m": 0.5}]
        >>> [r["c"] for r in pareto_front(rows, "c", "m")]
        [0.5, 1]
    """
    ok = [r for r in rows if finite(r.get(cost)) is not None and finite(r.get(metric)) is not None]
    front, best = [], -math.inf
    for r in sorted(ok, key=lambda r: (r[cost], -r[metric])):
        if r[metric] > best:
            front.append(r)
            best = r[metric]
    return front


def plot_sweep(rows: list[dict], path: str | Path, metric: str, title: str = "") -> Path:
    """``metric`` against MACs ratio (and latency ratio when measured), Pareto fronts as lines."""
    plt = pyplot()
    ok = [r for r in rows if r.get("status") == "ok"]
    costs = [("macs_ratio", "MACs (converted / original)")]
    if any(finite(r.get("latency_ratio")) is not None for r in ok):
        costs.append(("latency_ratio", "latency (converted / original)"))
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4.2), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for r in ok:
        g = "original" if r["point"] == "original" else (
            ("budget " if r.get("target_macs") is not None or r.get("target_latency") is not None else "uniform ")
            + f"{r.get('init', 'copy')}/{r.get('cheap', 'dw')}" + (" scatter" if r.get("scatter") else ""))
        groups.setdefault(g, []).append(r)
    for ax, (cost, label) in zip(axes[0], costs):
        for g, rs in sorted(groups.items()):
            pts = [(r[cost], r[metric]) for r in rs if finite(r.get(cost)) is not None and finite(r.get(metric)) is not None]
            if pts:
                ax.scatter(*zip(*pts), label=g, s=30, marker="*" if g == "original" else "o", zorder=3)
        front = pareto_front(ok, cost, metric)
        if front:
            ax.step([r[cost] for r in front], [r[metric] for r in front], where="post", color="k", lw=1,
                    alpha=0.6, label="Pareto front", zorder=2)
        ax.set_xlabel(label)
        ax.set_ylabel({"top1": "top-1 accuracy", "agree_top1": "top-1 agreement with the original"}.get(metric, metric))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=True)
    plt.close(fig)
    return Path(path)
