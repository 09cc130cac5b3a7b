"""What a conversion costs in time: each conv alone against its Ghost candidates, and a plan's whole model.

The latency side of the allocation (:func:`ghostify.allocate` with ``target_latency``) and
:func:`skip_slower`. Every layer or model built here is built to be timed: its weights are small
random values, and ``cheap="auto"`` (picked per layer by calibration) is timed as the 1x1 ``mix``.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import replace

import torch
from torch import nn

from .._util import capture, eval_mode
from ..conversion.plan import Plan
from ..conversion.rewrite import convert
from ..deploy.runtime import layer_callables, layer_context, runtime_latency
from ..layers import GhostConv2d
from ..measure.latency import measure_latency

__all__ = ["layer_latency", "skip_slower", "whole_model_ms"]


def _timed_form(cheap: str, dw_size: int) -> tuple[str, int]:
    """The cheap op a layer is timed with: ``cheap="auto"`` (calibration picks per layer) is timed as the
    1x1 ``mix``, the usual pick where ``dw`` fits poorly."""
    return ("mix", 1) if cheap == "auto" else (cheap, dw_size)


def _timing_ghost(conv: nn.Conv2d, ratio: int, dw_size: int, cheap: str) -> nn.Module:
    cheap, dw_size = _timed_form(cheap, dw_size)
    return _timing_weights(GhostConv2d.from_conv(conv, ratio, dw_size, cheap, cheap_bias=True))


@torch.no_grad()
def _timing_weights(module: nn.Module) -> nn.Module:
    """Fill ``module``'s parameters with small random values (uninitialised memory could hold denormals,
    which skew timings); for layers built only to be timed."""
    for p in module.parameters():
        p.normal_(0, 0.01)
    return module


def layer_latency(model: nn.Module, specs: dict[str, list[tuple[int, int, str]]], inputs: torch.Tensor, *,
                  warmup: int = 3, repeats: int = 10, threads: int | None = None,
                  progress: bool = True, runtime: str = "torch") -> dict[str, dict]:
    """Each named conv's latency in isolation against Ghost layers of the given ``(ratio, dw_size, cheap)``.

    The conv's real input (captured from one forward of ``model`` on ``inputs``) is fed to
    the conv and to each Ghost candidate, alternately (:func:`ghostify.measure_latency`).
    Returns ``{name: {"conv": ms, ratio: ms, ...}}`` (medians; Ghost layers in the
    identity channel layout, i.e. a plain ``cat``). ``runtime="ort"`` or ``"compile"`` times
    each candidate with the BN and activation after the conv, fused, in that runtime
    (:func:`ghostify.deploy.runtime.layer_callables`).
    """
    from tqdm import tqdm

    with eval_mode(model):
        xs = capture(model, {n: model.get_submodule(n) for n in specs}, inputs)
    out = {}
    for name, cands in tqdm(specs.items(), disable=not progress, file=sys.stderr, desc="layer latency", leave=False):
        conv = model.get_submodule(name)
        mods = {"conv": conv, **{r: _timing_ghost(conv, r, d, c) for r, d, c in cands}}
        if runtime != "torch":
            mods = layer_callables(mods, layer_context(model, name), xs[name], runtime, threads=threads)
        res = measure_latency(mods, xs[name], warmup=warmup, repeats=repeats, threads=threads)
        out[name] = {k: v["median_ms"] for k, v in res.items()}
    return out




def skip_slower(model: nn.Module, plan: Plan, inputs: torch.Tensor, *, repeats: int = 10,
                threads: int | None = None, progress: bool = True, runtime: str = "torch",
                whole_model: bool = True) -> Plan:
    """A copy of ``plan`` in which every layer whose Ghost layer is not faster than its conv is kept as a conv.

    Each layer is timed in isolation on its real input (:func:`layer_latency`), conv and Ghost
    layer alternately, in ``runtime`` (``torch``, ``ort``, ``compile``); the skipped entries
    say both times. A layer faster alone can still cost time in the whole model (a fusion the
    runtime no longer makes), so with ``whole_model`` the converted model is then timed against
    the original in ``runtime`` (fused, alternating): while it is not faster, the half of the
    remaining layers that gained least alone are kept as convs too, down to none (the original).

    Example:
        >>> import torchvision, ghostify
        >>> net = torchvision.models.resnet18().eval()
        >>> plan = skip_slower(net, ghostify.make_plan(net), torch.randn(1, 3, 64, 64), repeats=2, progress=False)
        >>> all(e.action in ("convert", "skip") for e in plan.entries)
        True
    """
    specs = {e.name: [(e.spec.ratio, e.spec.dw_size, e.spec.cheap)] for e in plan.converted}
    lat = layer_latency(model, specs, inputs, repeats=repeats, threads=threads, progress=progress, runtime=runtime)
    where = "" if runtime == "torch" else " in " + runtime
    out = copy.deepcopy(plan)
    gain = {}
    for e in out.converted:
        t = lat[e.name]
        ghost_ms = t[e.spec.ratio]
        if not ghost_ms < t["conv"]:
            e.action, e.reason = "skip", (f"kept as conv: Ghost not faster here ({ghost_ms:.3f} ms against "
                                          f"{t['conv']:.3f} ms as conv{where})")
            e.spec = None
        else:
            gain[e.name] = 1 - ghost_ms / t["conv"]
    keep = sorted(gain, key=gain.get, reverse=True)  # the layers that gained most alone first
    while whole_model and keep:
        ghost_ms, conv_ms = whole_model_ms(model, out, inputs, repeats, threads, runtime)
        if ghost_ms < conv_ms:
            break
        keep, dropped = keep[:len(keep) // 2], keep[len(keep) // 2:]
        for e in out.entries:
            if e.name in dropped:
                e.action, e.spec = "skip", None
                e.reason = (f"kept as conv: faster alone, but the whole model with it was not faster than the "
                            f"original ({ghost_ms:.2f} ms against {conv_ms:.2f} ms{where})")
    return out


def whole_model_ms(model: nn.Module, plan: Plan, inputs: torch.Tensor, repeats: int, threads: int | None,
                    runtime: str) -> tuple[float, float]:
    """``(converted ms, original ms)``: ``model`` converted by ``plan`` (weights random: timing only) and the
    original, fused and alternating in ``runtime`` (``torch``, ``ort``, ``compile``), ``repeats`` runs each.

    Example:
        >>> import torch, torchvision, ghostify
        >>> net = torchvision.models.resnet18().eval()
        >>> ghost_ms, conv_ms = whole_model_ms(net, ghostify.make_plan(net), torch.randn(1, 3, 64, 64), 2, 1, "torch")
        >>> ghost_ms > 0 and conv_ms > 0
        True
    """
    timing = copy.deepcopy(plan)
    for e in timing.converted:  # as layer_latency times each layer
        cheap, dw_size = _timed_form(e.spec.cheap, e.spec.dw_size)
        e.spec = replace(e.spec, cheap=cheap, dw_size=dw_size)
    ghost = convert(model, plan=timing, initialize=False).eval()
    for m in ghost.modules():
        if isinstance(m, GhostConv2d):
            _timing_weights(m)
    r = runtime_latency({"ghost": ghost, "conv": model}, inputs, runtime=runtime, repeats=repeats, threads=threads)
    return r["ghost"]["median_ms"], r["conv"]["median_ms"]
