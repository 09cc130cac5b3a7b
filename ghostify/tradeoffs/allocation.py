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
  Only moves that make a layer faster are considered. The layers' savings alone need not add up
  in the whole model (sub-millisecond 1x1 convs, fusions the runtime no longer makes), so the
  whole converted model is then timed against the original, and the layers are asked for more
  while it misses the budget, for less while it beats it by far (``whole_model``).

``skip_slower`` (in :mod:`.timing`) keeps as convs the layers of a plan whose Ghost layer is not faster
than the conv.
The result is a :class:`~ghostify.Plan`: print it, pass it to ``convert(plan=...)``; the
converted model saves it with its weights (``ghostify.save``), so ``ghostify.load`` replays it.
"""
from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from torch import nn

from .._util import format_size
from ..config import GhostConfig, build_config, default_cheap
from ..conversion.plan import Plan, make_plan
from ..conversion.rewrite import convert
from ..deploy.runtime import runtime_latency
from ..errors import GhostifyError
from ..measure.counting import count
from ..measure.latency import measure_latency
from .sensitivity import sensitivity
from .timing import layer_latency, whole_model_ms

__all__ = ["Allocation", "allocate", "greedy_allocation"]


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
    measured_cost_ratio: float | None = None  # a latency budget: the whole converted model against the original
    tried: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured) of each plan timed

    def summary(self) -> str:
        kept = sum(1 for r in self.choices.values() if r is None)
        by_ratio = {}
        for r in self.choices.values():
            if r is not None:
                by_ratio[r] = by_ratio.get(r, 0) + 1
        ratios = ", ".join(f"{n} at ratio {r}" for r, n in sorted(by_ratio.items())) or "none converted"
        return (f"allocation (greedy on {self.measure} loss per {self.budget} saved): target {self.budget} "
                f"{self.target:g} of the original, predicted {self.predicted_cost_ratio:.3f}; {ratios}; "
                f"{kept} kept as conv; predicted loss {self.predicted_loss:.4g}"
                + (f"; the whole model measured {self.measured_cost_ratio:.3f} (predicted/measured of the "
                   f"{len(self.tried)} plan(s) timed: " + ", ".join(f"{p:.3f}/{m:.3f}" for p, m in self.tried) + ")"
                   if self.measured_cost_ratio else ""))


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
             leaf_modules=(), progress: bool = True, runtime: str = "torch", whole_model: bool = True,
             **init_options) -> Allocation:
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
        whole_model: with ``target_latency``, time the whole converted model against the original
            (alternating, in ``runtime``) and ask the layers for more while it misses the budget (up
            to every conv at its fastest ratio), for less while it beats it by more than 0.03, and,
            once one plan missed and another met, for a saving between the two, aiming at 0.015
            under the budget. Of up to 6 plans (none timed twice), the one of least predicted loss
            that met the budget is kept (``Allocation.tried`` lists each plan's predicted and
            measured ratio); none raises :class:`~ghostify.GhostifyError`. False: trust the layers
            timed alone.
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

    lat, total_ms, x = {}, None, None
    if target_latency is not None or only_faster:  # a MACs budget draws no timing input (nor random numbers)
        x = torch.randn(*input_size)
        lat, total_ms = _layer_times(model, base_plan, rows, x, repeats, threads, progress, runtime)
    options, slower = _options(rows, lat, target_macs is not None, only_faster)
    total = float(table.total_macs) if target_macs is not None else total_ms

    def planned(need: float):
        choices, _, saved, loss = greedy_allocation(options, need)
        reasons = {**slower, **_reasons(choices, rows, lat, table.total_macs)}
        return choices, saved, loss, _budget_plan(model, base_plan, choices, reasons)

    measured, tried = None, []
    if target_latency is not None and whole_model:
        most = sum(max((o[1] for o in opts), default=0.0) for opts in options.values())  # every conv at its fastest
        (choices, saved, loss, plan), measured, tried = _meet_in_whole_model(
            planned, total, most, target, lambda p: whole_model_ms(model, p, x, repeats, threads, runtime), runtime)
    else:
        choices, saved, loss, plan = planned((1 - target) * total)
    return Allocation(plan, choices, "macs" if target_macs is not None else "latency", target,
                      1 - saved / total if total else 1.0, loss, table.measure, measured, tried)


def _layer_times(model, base_plan: Plan, rows: dict, x, repeats, threads, progress, runtime):
    """``({conv: {"conv": ms, ratio: ms, ...}}, whole model ms)``: each candidate conv timed alone against its
    Ghost layer at each ratio it would get (rounded as the plan rounds it), and the original model."""
    specs = {e.name: e.spec for e in base_plan.converted}
    timed = {n: {r.ratio: specs[n].ratio_for(base_plan[n].out_channels, r.ratio) for r in opts}
             for n, opts in rows.items()}
    cands = {n: [(t, specs[n].dw_size, specs[n].cheap) for t in ts.values()] for n, ts in timed.items()}
    lat = layer_latency(model, cands, x, repeats=repeats, threads=threads, progress=progress, runtime=runtime)
    lat = {n: {"conv": v["conv"], **{r: v[t] for r, t in timed[n].items()}} for n, v in lat.items()}
    timer = measure_latency if runtime == "torch" else functools.partial(runtime_latency, runtime=runtime)
    return lat, timer({"model": model}, x, repeats=repeats, threads=threads)["model"]["median_ms"]


def _options(rows: dict, lat: dict, by_macs: bool, only_faster: bool):
    """The greedy's ``(ratio, saved, loss)`` per conv (MACs or ms saved), and why the convs that no ratio makes
    faster are kept."""
    options, slower = {}, {}
    for name, opts in rows.items():
        t = lat.get(name)
        options[name] = [(r.ratio, float(r.macs_saved if by_macs else t["conv"] - t[r.ratio]), r.loss) for r in opts
                         if not (only_faster and t[r.ratio] >= t["conv"])]
        if t and not any(t[r.ratio] < t["conv"] for r in opts):
            slower[name] = (f"kept as conv: no Ghost ratio is faster here ({t['conv']:.3f} ms as conv, "
                            + ", ".join(f"{t[r.ratio]:.3f} ms at ratio {r.ratio}" for r in opts) + ")")
    return options, slower


def _reasons(choices: dict, rows: dict, lat: dict, total_macs: int) -> dict[str, str]:
    reasons = {}
    for name, ratio in choices.items():
        if ratio is not None:
            row = next(r for r in rows[name] if r.ratio == ratio)
            reasons[name] = (f"budget: loss {row.loss:.3g}, saves {row.macs_saved / total_macs:.2%} of MACs"
                             + (f", {lat[name]['conv']:.3f} -> {lat[name][ratio]:.3f} ms" if lat else ""))
    return reasons


def _meet_in_whole_model(planned, total: float, most: float, target: float, time_plan, runtime: str,
                         tries: int = 6, slack: float = 0.03):
    """``(planned(need), measured, [(predicted, measured) per plan timed])``: the allocation for ``need`` ms saved
    (the layers timed alone), then the whole converted model timed against the original, and the next ``need``
    chosen by :func:`_next_need` from the plans timed so far, until one lands in ``[target - slack, target]``,
    none is left to try, or ``tries`` plans were timed; the plan of least predicted loss among those that met
    the budget is returned."""
    need, kept, missed, tried, seen, miss = (1 - target) * total, [], [], [], set(), ""
    for attempt in range(tries):
        try:
            result = planned(need)
        except GhostifyError:
            if attempt == 0:
                raise
            break  # the layers cannot save more
        choices, saved, loss, plan = result
        if not plan.converted:  # nothing to save: the original itself
            return result, None, []
        if tuple(choices.items()) in seen:
            break  # the plan asked for is one already timed
        seen.add(tuple(choices.items()))
        ghost_ms, conv_ms = time_plan(plan)
        measured = ghost_ms / conv_ms
        tried.append((1 - saved / total, measured))
        if measured <= target:
            kept.append((loss, attempt, result, measured))
            if measured >= target - slack:
                break
        else:
            missed.append((saved, measured))
            n = len(plan.converted)
            miss = (f"{n} conv{'s' * (n != 1)} converted (predicted {1 - saved / total:.3f} from the layers "
                    f"timed alone) ran {ghost_ms:.2f} ms against the original's {conv_ms:.2f} ms in {runtime}, "
                    f"{measured:.3f} of it")
        need = _next_need([(k[2][1], k[3]) for k in kept], missed, target - slack / 2, most)
        if need is None:
            break
    if kept:
        return *min(kept)[2:], tried
    raise GhostifyError(f"the latency budget {target:g} is not met by the whole model: {miss}; the layers' savings "
                        "alone do not add up to the whole model's here. Raise the target, allow higher ratios, or "
                        "take the per-layer prediction as it is: allocate(..., whole_model=False)")


def _next_need(met: list, missed: list, aim: float, most: float) -> float | None:
    """What to ask the layers to save next (ms, as timed alone), from the plans timed so far (``(saved,
    measured)`` each, ``met`` the budget or ``missed`` it), aiming the whole model at ``aim`` of the original.

    Between the largest saving that missed and the smallest that met, where the line through the two crosses
    ``aim`` (kept a tenth of the gap away from either end); with misses only, the largest saving scaled by what
    the whole model saved against what ``aim`` needs, up to ``most`` (every layer at its fastest); with plans
    that beat the budget by far only, the smallest saving scaled down the same way. None when nothing new is
    left to ask.

    Example:
        >>> _next_need(met=[], missed=[(1.0, 0.9)], aim=0.8, most=5.0)  # saved half what was needed: ask twice
        2.0
        >>> round(_next_need(met=[(2.0, 0.6)], missed=[(1.0, 0.9)], aim=0.8, most=5.0), 3)
        1.333
    """
    slow, fast = max(missed, default=None), min(met, default=None)
    if slow and fast:
        (s0, m0), (s1, m1) = slow, fast
        if s1 <= s0:  # a larger saving missed where a smaller one met: the timings disagree, stop
            return None
        t = (m0 - aim) / (m0 - m1) if m0 > m1 else 0.5
        return s0 + min(max(t, 0.1), 0.9) * (s1 - s0)
    saved, measured = slow or fast
    if measured >= 1:  # no faster at all: ask for the most at once
        return most if saved < most - 1e-9 else None
    want = min(saved * (1 - aim) / (1 - measured), most)
    return None if slow and want <= saved + 1e-9 else want


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
