"""Ratio allocation under a budget: per layer, a ratio or "keep as conv", chosen from a sensitivity table.

The allocator is **greedy on loss increase per unit of cost saved**: starting from the
unconverted model, each step takes the single move (one layer to a higher ratio, from
"keep" or from a lower ratio) with the smallest ``(loss after - loss before) / (cost saved
after - cost saved before)``, until the predicted cost meets the budget. Losses and savings
are the per-layer figures of :func:`ghostify.sensitivity` and are added up (an
approximation; the plan is meant to be checked by converting and evaluating it).

Costs:

* ``target_macs=F``: MACs, counted per layer (fvcore); the model must end at ``<= F`` of the
  original's MACs.
* ``target_latency=F``: each layer's latency measured *in isolation* on its real input
  (original conv against a Ghost layer of each ratio, alternately, see :func:`layer_latency`);
  the predicted model latency is the measured whole-model latency minus the per-layer savings.
  Only moves that make a layer faster are considered.

``skip_slower`` keeps as convs the layers of a plan whose Ghost layer is not faster than the conv.
The result is a :class:`~ghostify.Plan`: print it, pass it to ``convert(plan=...)``; the
converted model saves it with its weights (``ghostify.save``), so ``ghostify.load`` replays it.
"""
from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from .._util import capture, eval_mode, format_size
from ..config import GhostConfig, build_config, default_cheap
from ..conversion.plan import Plan, make_plan
from ..conversion.rewrite import convert
from ..deploy.runtime import layer_callables, layer_context, runtime_latency
from ..errors import GhostifyError
from ..layers import GhostConv2d
from ..measure.counting import count
from ..measure.latency import measure_latency
from .sensitivity import sensitivity

__all__ = ["Allocation", "allocate", "greedy_allocation", "layer_latency", "skip_slower"]


@dataclass
class Allocation:
    """What :func:`allocate` chose: ``plan`` (to execute), the ratio per layer (None: kept), and the prediction."""

    plan: Plan
    choices: dict[str, int | None]
    budget: str  # "macs" or "latency"
    target: float
    predicted_cost_ratio: float
    predicted_loss: float
    measure: str

    def summary(self) -> str:
        kept = sum(1 for r in self.choices.values() if r is None)
        by_ratio = {}
        for r in self.choices.values():
            if r is not None:
                by_ratio[r] = by_ratio.get(r, 0) + 1
        ratios = ", ".join(f"{n} at ratio {r}" for r, n in sorted(by_ratio.items())) or "none converted"
        return (f"allocation (greedy on {self.measure} loss per {self.budget} saved): target {self.budget} "
                f"{self.target:g} of the original, predicted {self.predicted_cost_ratio:.3f}; {ratios}; "
                f"{kept} kept as conv; predicted loss {self.predicted_loss:.4g}")


def greedy_allocation(options: dict[str, list[tuple[int, float, float]]], need: float
                      ) -> tuple[dict[str, int | None], list[tuple[str, int]], float, float]:
    """Choose a ratio (or None) per layer so that the savings reach ``need``, greedily.

    ``options[name]`` lists ``(ratio, saved, loss)``; keeping the conv is ``(None, 0, 0)``.
    Each step takes the move with the least loss increase per unit saved (moves that save
    nothing are never taken); then, while the budget allows, the change whose undoing (to a
    lower ratio or to the conv) removes the most loss is undone. Returns
    ``(choices, moves, saved, loss)``.

    Example:
        >>> opts = {"a": [(2, 10.0, 1.0)], "b": [(2, 10.0, 0.1), (4, 15.0, 0.5)]}
        >>> greedy_allocation(opts, 12.0)[0]
        {'a': None, 'b': 4}
    """
    current = {name: (None, 0.0, 0.0) for name in options}
    saved = loss = 0.0
    moves: list[tuple[str, int]] = []
    while saved < need - 1e-9:
        best = None
        for name, opts in options.items():
            _, s0, l0 = current[name]
            for ratio, s, l in opts:
                if s <= s0:
                    continue
                key = ((l - l0) / (s - s0), -(s - s0), name, ratio)
                if best is None or key < best[0]:
                    best = (key, name, (ratio, s, l))
        if best is None:
            raise GhostifyError(f"the budget cannot be met: converting every candidate layer saves {saved:.4g} "
                                f"of the {need:.4g} needed; raise the target or allow higher --ratios")
        _, name, choice = best
        saved += choice[1] - current[name][1]
        loss += choice[2] - current[name][2]
        current[name] = choice
        moves.append((name, choice[0]))
    while True:  # the last moves may overshoot: undo the costliest changes the budget does not need
        best = None
        for name, opts in options.items():
            r0, s0, l0 = current[name]
            for ratio, s, l in [(None, 0.0, 0.0)] + opts:
                if s < s0 and l < l0 and saved - (s0 - s) >= need - 1e-9 and (best is None or l0 - l > best[0]):
                    best = (l0 - l, name, (ratio, s, l))
        if best is None:
            break
        _, name, choice = best
        saved -= current[name][1] - choice[1]
        loss -= current[name][2] - choice[2]
        current[name] = choice
        moves.append((name, choice[0]))
    return {n: c[0] for n, c in current.items()}, moves, saved, loss


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


def _budget_plan(model: nn.Module, base_plan: Plan, choices: dict[str, int | None], reasons: dict[str, str]) -> Plan:
    plan = copy.deepcopy(base_plan)
    for e in plan.entries:
        if e.name not in choices:
            continue
        ratio = choices[e.name]
        if ratio is None:
            e.action, e.spec, e.reason = "skip", None, reasons.get(e.name, "kept as conv by the budget allocation")
        else:
            e.action, e.spec, e.reason = ("convert", replace(e.spec, ratio=e.spec.ratio_for(e.out_channels, ratio)),
                                          reasons.get(e.name, ""))
    return plan


def allocate(model: nn.Module, *, config: GhostConfig | None = None, target_macs: float | None = None,
             target_latency: float | None = None, table=None, ratios: Iterable[int] = (2, 3, 4),
             dw_size: int | None = None, init: str = "calib", cheap: str | None = None, include: Iterable[str] = (),
             exclude: Iterable[str] = (), overrides: dict | None = None, calib_data=None, eval_data=None,
             method: str | None = None, measure: str | None = None, reference: int | float | None = None,
             input_size=(1, 3, 224, 224), only_faster: bool = False, threads: int | None = None, repeats: int = 10,
             leaf_modules=(), progress: bool = True, runtime: str = "torch", **init_options) -> Allocation:
    """Pick a ratio per conv (or keep it) to meet a MACs or latency budget with the least predicted loss.

    Args:
        target_macs: the converted model's MACs as a fraction of the original's (e.g. 0.8).
        target_latency: the converted model's latency as a fraction of the original's (batch
            and threads as ``input_size`` and ``threads``); per-layer latencies measured here.
        table: a :class:`~ghostify.layer_sensitivity.SensitivityTable`; measured here when None
            (``method="alone"`` when ``eval_data`` is given, else ``"proxy"``). A given table must be this
            model's (same MACs) and have rows for every conv the plan would convert; a note on stderr says
            when it lacks some of ``ratios`` or was measured with other settings.
        ratios: the candidate ratios per layer (with "keep as conv").
        only_faster: never choose a ratio whose Ghost layer is not faster than the conv
            (measured in isolation).
        config: the layer settings (:class:`~ghostify.GhostConfig`; its global ratio is replaced by the
            candidates); without it one is built from ``dw_size, init, cheap, include, exclude, overrides``.
        reference: for ``method="context"``, the uniform ratio the sensitivity starts from (default: the
            candidate whose uniform conversion's MACs are nearest the budget).
        runtime: where latencies are measured: ``torch`` (eager), ``ort`` (ONNX Runtime) or
            ``compile`` (``torch.compile``), each model and layer fused for inference there.
        Other arguments: as :func:`ghostify.sensitivity` / :func:`ghostify.convert`.

    Returns an :class:`Allocation`; ``allocation.plan`` goes to ``ghostify.convert(model, plan=...)``.

    Example:
        >>> import torch, torchvision, ghostify
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.randn(4, 3, 32, 32) for _ in range(3)]
        >>> a = ghostify.allocate(net, target_macs=0.8, calib_data=data, input_size=(1, 3, 32, 32), progress=False)
        >>> a.predicted_cost_ratio <= 0.8
        True
        >>> ghost = ghostify.convert(net, plan=a.plan, calib_data=data)
    """
    if (target_macs is None) == (target_latency is None):
        raise GhostifyError("give exactly one budget: target_macs=F or target_latency=F (a fraction of the original)")
    target = target_macs if target_macs is not None else target_latency
    if not 0 < target <= 1:
        raise GhostifyError(f"the budget is a fraction of the original in (0, 1] (got {target:g}); e.g. 0.8")
    ratios = tuple(sorted(set(ratios)))
    config = build_config(min(ratios), dw_size, init, cheap, include, exclude, overrides, config).with_global(
        ratio=min(ratios))
    base_plan = make_plan(model, config, leaf_modules=leaf_modules)
    candidates = {e.name: e.spec for e in base_plan.converted}
    if table is not None:
        _check_table(table, model, candidates, ratios, config)
    else:
        method = method or ("alone" if eval_data is not None else "proxy")
        if method == "context" and reference is None:  # the uniform ratio nearest the budget
            reference = _nearest_uniform(model, ratios, target_macs or target, input_size, config, leaf_modules)
        table = sensitivity(model, config=config, ratios=ratios, calib_data=calib_data, eval_data=eval_data,
                            method=method, measure=measure, input_size=input_size, leaf_modules=leaf_modules,
                            progress=progress, reference=reference, **init_options)
    rows = {n: [r for r in table.options(n) if r.ratio in ratios] for n in table.layers if n in candidates}

    need_latency = target_latency is not None or only_faster
    lat, total_ms = {}, None
    if need_latency:
        x = torch.randn(*input_size)
        outs = {e.name: e.out_channels for e in base_plan.converted}
        timed = {n: {r.ratio: candidates[n].ratio_for(outs[n], r.ratio) for r in opts} for n, opts in rows.items()}
        specs = {n: [(t, candidates[n].dw_size, candidates[n].cheap) for t in ts.values()] for n, ts in timed.items()}
        lat = layer_latency(model, specs, x, repeats=repeats, threads=threads, progress=progress, runtime=runtime)
        lat = {n: {"conv": v["conv"], **{r: v[t] for r, t in timed[n].items()}} for n, v in lat.items()}
        timer = measure_latency if runtime == "torch" else functools.partial(runtime_latency, runtime=runtime)
        total_ms = timer({"model": model}, x, repeats=repeats, threads=threads)["model"]["median_ms"]

    options, reasons = {}, {}
    for name, opts in rows.items():
        options[name] = [(r.ratio, float(r.macs_saved if target_macs is not None
                                         else lat[name]["conv"] - lat[name][r.ratio]), r.loss) for r in opts
                         if not (only_faster and lat[name][r.ratio] >= lat[name]["conv"])]
        if need_latency and not any(lat[name][r.ratio] < lat[name]["conv"] for r in opts):
            reasons[name] = (f"kept as conv: no Ghost ratio is faster here ({lat[name]['conv']:.3f} ms as conv, "
                             + ", ".join(f"{lat[name][r.ratio]:.3f} ms at ratio {r.ratio}" for r in opts) + ")")
    total = float(table.total_macs) if target_macs is not None else total_ms
    choices, _, saved, loss = greedy_allocation(options, (1 - target) * total)
    for name, ratio in choices.items():
        if ratio is not None:
            row = next(r for r in rows[name] if r.ratio == ratio)
            reasons[name] = (f"budget: loss {row.loss:.3g}, saves {row.macs_saved / table.total_macs:.2%} of MACs"
                             + (f", {lat[name]['conv']:.3f} -> {lat[name][ratio]:.3f} ms" if need_latency else ""))
    for name in choices.keys() - reasons.keys():
        reasons[name] = "kept as conv by the budget allocation"
    plan = _budget_plan(model, base_plan, choices, reasons)
    return Allocation(plan, choices, "macs" if target_macs is not None else "latency", target,
                      1 - saved / total if total else 1.0, loss, table.measure)


def _check_table(table, model: nn.Module, candidates: dict, ratios, config: GhostConfig) -> None:
    """Refuse a given sensitivity table that was measured on another model or on other convs; say on stderr what
    it cannot predict (ratios it lacks, other conversion settings)."""
    total = int(count(model, torch.zeros(*table.input_size)).macs)
    fix = "measure this conversion's table: `ghostify sensitivity MODEL --ratio R,.. -o FILE` or ghostify.sensitivity"
    if total != table.total_macs:
        raise GhostifyError(f"the sensitivity table was measured on a model of {format_size(table.total_macs)} MACs "
                            f"at input {tuple(table.input_size)}; this model has {format_size(total)} there: {fix}")
    measured = set(table.layers)
    missing = [n for n in candidates if n not in measured]
    if missing:
        raise GhostifyError(f"the sensitivity table has no rows for {len(missing)} of the {len(candidates)} convs "
                            f"this conversion would convert ({', '.join(missing[:4])}{', ...' * (len(missing) > 4)}): "
                            f"{fix} with the same include/exclude settings, or exclude these convs")
    have = set(table.ratios)
    if not have & set(ratios):
        raise GhostifyError(f"the sensitivity table was measured at ratio(s) {sorted(have)}, none of the candidate "
                            f"ratios {list(ratios)}: choose among its ratios (convert --ratios "
                            f"{','.join(map(str, sorted(have)))}) or {fix}")
    notes = []
    if set(ratios) - have:
        notes.append(f"it has no rows at ratio(s) {sorted(set(ratios) - have)}, so the allocation chooses among "
                     f"{sorted(have & set(ratios))} only")
    spec = config.global_spec
    cheap, dw_size = default_cheap(spec.init, spec.cheap, spec.dw_size)
    now = {"init": spec.init, "cheap": cheap, "dw_size": dw_size}
    other = {k: v for k, v in now.items() if k in table.settings and table.settings[k] != v}
    if other:
        notes.append("it was measured with " + ", ".join(f"{k}={table.settings[k]}" for k in other)
                     + ", this conversion uses " + ", ".join(f"{k}={v}" for k, v in other.items())
                     + ": its losses are those of the other settings")
    for note in notes:
        print(f"note: the sensitivity table: {note}", file=sys.stderr)


def _nearest_uniform(model, ratios, target, input_size, config: GhostConfig, leaf_modules) -> int | float:
    """The ratio whose uniform conversion's MACs fraction is closest to ``target`` (no weights are fitted)."""
    x = torch.zeros(*input_size)
    total = count(model, x).macs
    spec = config.global_spec
    cheap, dw_size = default_cheap(spec.init, spec.cheap, spec.dw_size)
    cheap = "dw" if cheap == "auto" else cheap
    fractions = {r: count(convert(model, config=config.with_global(ratio=r, dw_size=dw_size, cheap=cheap, init="none"),
                                  leaf_modules=leaf_modules), x).macs / total
                 for r in ratios}
    return min(ratios, key=lambda r: abs(fractions[r] - target))


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
        ghost_ms, conv_ms = _whole_model_ms(model, out, inputs, repeats, threads, runtime)
        if ghost_ms < conv_ms:
            break
        keep, dropped = keep[:len(keep) // 2], keep[len(keep) // 2:]
        for e in out.entries:
            if e.name in dropped:
                e.action, e.spec = "skip", None
                e.reason = (f"kept as conv: faster alone, but the whole model with it was not faster than the "
                            f"original ({ghost_ms:.2f} ms against {conv_ms:.2f} ms{where})")
    return out


def _whole_model_ms(model: nn.Module, plan: Plan, inputs: torch.Tensor, repeats: int, threads: int | None,
                    runtime: str) -> tuple[float, float]:
    """``(converted ms, original ms)``: ``model`` converted by ``plan`` (weights random: timing only) and the
    original, fused and alternating in ``runtime``."""
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

