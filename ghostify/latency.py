"""Measured latency, honestly: warm-up, fixed threads, inference mode, models measured alternately."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["measure_latency"]


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_latency(models: dict[str, nn.Module], inputs: torch.Tensor, *, warmup: int = 3, repeats: int = 10,
                    threads: int | None = None) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each model's forward on ``inputs``, measured in alternation.

    Every repeat runs each model once, in turn, so that drift on a shared machine hits all
    models alike. Runs under ``torch.inference_mode`` with ``threads`` intra-op threads
    (default: leave as is) and synchronises CUDA when the input is on a GPU.

    Example:
        >>> r = measure_latency({"conv": nn.Conv2d(3, 8, 3)}, torch.randn(1, 3, 32, 32), repeats=3)
        >>> sorted(r["conv"])
        ['max_ms', 'median_ms', 'min_ms', 'p10_ms', 'p90_ms', 'repeats']
    """
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with _threads(threads), torch.inference_mode():
            for _ in range(warmup):
                for m in models.values():
                    m(inputs)
            sync()
            for _ in range(repeats):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m(inputs)
                    sync()
                    times[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        for k, m in models.items():
            m.train(modes[k])
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        out[k] = {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(ts),
                  "max_ms": max(ts), "repeats": len(ts)}
    return out
