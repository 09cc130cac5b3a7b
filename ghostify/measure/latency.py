"""Measured latency, honestly: warm-up, fixed threads, inference mode, models measured alternately."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .._util import eval_mode
from ..conversion.rewrite import conversion_info
from ..layers import GhostConv2d

__all__ = ["measure_latency", "measure_layers", "per_layer_times", "torch_threads"]


@contextmanager
def torch_threads(n: int | None):
    """Within the block, torch runs ``n`` intra-op threads (None: as it is); restored afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_latency(models: dict[str, nn.Module | Callable], inputs: torch.Tensor, *, warmup: int = 3,
                    repeats: int = 10, threads: int | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each model's forward on ``inputs``, measured in alternation.

    Every repeat runs each model once, in turn, so that drift on a shared machine hits all
    models alike. Runs under ``torch.inference_mode`` with ``threads`` intra-op threads
    (default: leave as is) and synchronises CUDA when the input is on a GPU. A model may be
    any callable taking ``inputs`` (e.g. a runtime session, see :func:`ghostify.runtime_latency`).
    ``clock=time.thread_time`` times the CPU the calling thread spends instead of wall time: with
    ``threads=1`` all the work runs there, and the figure is robust to other load on the machine.

    Example:
        >>> r = measure_latency({"conv": nn.Conv2d(3, 8, 3)}, torch.randn(1, 3, 32, 32), repeats=3)
        >>> sorted(r["conv"])
        ['max_ms', 'median_ms', 'min_ms', 'p10_ms', 'p90_ms', 'repeats']
    """
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    modules = [m for m in models.values() if isinstance(m, nn.Module)]
    with eval_mode(*modules), torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(inputs)
        sync()
        for _ in range(repeats):
            for k, m in models.items():
                t0 = clock()
                m(inputs)
                sync()
                times[k].append((clock() - t0) * 1e3)
    return {k: _summary(ts) for k, ts in times.items()}


def _summary(ts: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(ts),
            "max_ms": max(ts), "repeats": len(ts)}


def measure_layers(model: nn.Module, inputs: torch.Tensor, names=None, *, warmup: int = 3, repeats: int = 10,
                   threads: int | None = None) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of the named submodules' forwards inside whole-model runs, timed by hooks.

    ``names`` defaults to every ``nn.Conv2d`` and Ghost layer. The timings include the
    hooks' own overhead (a few microseconds), so compare layers measured the same way.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> sorted(measure_layers(net, torch.randn(1, 3, 16, 16), repeats=2))
        ['0']
    """
    mods = dict(model.named_modules())
    if names is None:
        names = [n for n, m in mods.items() if isinstance(m, (nn.Conv2d, GhostConv2d))
                 and not any(n.startswith(g + ".") for g, gm in mods.items() if isinstance(gm, GhostConv2d) and g)]
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    start: dict[str, float] = {}
    recording = [False]

    def pre(name):
        def hook(mod, args):
            sync()
            start[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(mod, args, out):
            sync()
            if recording[0]:
                times[name].append((time.perf_counter() - start[name]) * 1e3)
        return hook

    handles = [h for n in names for h in (mods[n].register_forward_pre_hook(pre(n)),
                                          mods[n].register_forward_hook(post(n)))]
    try:
        with eval_mode(model), torch_threads(threads), torch.inference_mode():
            for i in range(warmup + repeats):
                recording[0] = i >= warmup
                model(inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: _summary(ts) for n, ts in times.items() if ts}


def per_layer_times(original: nn.Module, ghost: nn.Module, size, *, repeats: int = 10, threads=None) -> dict:
    """Each converted conv's median time inside the original and inside the converted model (hooks)."""
    names = [e.name for e in conversion_info(ghost).plan.converted]
    x = torch.randn(*size)
    before = measure_layers(original, x, names, repeats=repeats, threads=threads)
    after = measure_layers(ghost, x, names, repeats=repeats, threads=threads)
    return {n: {"before_ms": before[n]["median_ms"], "after_ms": after[n]["median_ms"]} for n in names
            if n in before and n in after}
