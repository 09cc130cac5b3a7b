"""Per-layer sensitivity: what converting each conv *alone* costs, and what it saves.

For every convertible conv and every candidate ratio, one row: MACs before/after and a
``loss``, the measured damage of converting that layer and no other. Two measures:

* ``method="alone"`` (default): for each ratio, one conversion fits every layer on the
  *original* model's inputs (``init="calib"`` with ``sequential=False``, so a layer's fit
  does not depend on which others convert); then each fitted Ghost layer is put alone into
  the original model, which is evaluated on ``eval_data`` against the original's cached
  outputs. ``loss`` is the mean KL(original || converted) in nats (``measure="kl"``),
  ``-log(top-1 agreement)`` (``"agree"``) or the drop in top-1 accuracy (``"top1"``, needs
  labels). One calibration pass per ratio plus one evaluation per layer and ratio.
* ``method="proxy"``: no evaluation at all: the same single calibration pass records each
  layer's relative output error on the calibration data's held-out batches, and
  ``loss = error**2`` (the relative noise power the layer injects).
* ``method="context"``: each conv is moved alone away from a *uniformly converted* model
  (ratio ``reference``, sequential calibration): for each layer and ratio the whole model is
  converted and calibrated with that layer at that ratio, and once with the layer kept as a
  conv; ``loss`` = measured loss with the layer at the ratio minus with it kept. Later layers
  are refitted each time, so the table sees how sequential calibration absorbs a layer's
  error, which the ``alone`` measure cannot. It costs one calibrated conversion and one
  evaluation per layer and ratio (plus one per layer for "kept"): for small models.

Losses are combined additively by :func:`ghostify.allocate` (KL and ``-log`` agreement are
close to additive for small, independent perturbations; that is an approximation, and the
allocator's plan is validated by converting and evaluating it).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GhostifyError
from .outputs import atomic_write, to_json

__all__ = ["LayerSensitivity", "SensitivityTable", "sensitivity", "MEASURES"]

MEASURES = ("kl", "agree", "top1", "error")


@dataclass
class LayerSensitivity:
    """One conv converted alone at one ratio."""

    name: str
    ratio: int
    macs_before: int
    macs_after: int
    loss: float
    metrics: dict = field(default_factory=dict)  # agree_top1, kl, top1, heldout_error, ... where measured

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after


@dataclass
class SensitivityTable:
    """The rows of :func:`sensitivity` plus what they were measured with.

    ``measure`` names the loss (see the module doc); ``total_macs`` is the whole original
    model's MACs on ``input_size``; ``settings`` the conversion settings (dw_size, init, cheap...).
    """

    measure: str
    method: str
    total_macs: int
    rows: list[LayerSensitivity]
    baseline: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    input_size: tuple[int, ...] = (1, 3, 224, 224)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.name for r in self.rows))

    @property
    def ratios(self) -> list[int]:
        return sorted({r.ratio for r in self.rows})

    def options(self, name: str) -> list[LayerSensitivity]:
        """The rows of layer ``name``, by ratio."""
        return sorted((r for r in self.rows if r.name == name), key=lambda r: r.ratio)

    def table(self) -> str:
        """One line per layer and ratio, most harmful per MAC saved first within each ratio."""
        from .counting import format_size

        head = (f"sensitivity ({self.method}, loss = {_LOSS_TEXT[self.measure]}), total MACs "
                f"{format_size(self.total_macs)}")
        rows = [("layer", "ratio", "MACs", "saved", "saved %", "loss", "loss/GMAC", *self._metric_keys())]
        for r in sorted(self.rows, key=lambda r: (r.ratio, -_per_gmac(r))):
            rows.append((r.name, str(r.ratio), format_size(r.macs_before), format_size(r.macs_saved),
                         f"{100 * r.macs_saved / self.total_macs:.2f}", f"{r.loss:.4g}", f"{_per_gmac(r):.4g}",
                         *(_fmt(r.metrics.get(k)) for k in self._metric_keys())))
        widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows]
        lines.insert(1, "-" * len(lines[0]))
        return head + "\n" + "\n".join(lines)

    def _metric_keys(self) -> list[str]:
        return [k for k in ("agree_top1", "kl", "top1", "heldout_error", "calib_error")
                if any(k in r.metrics for r in self.rows)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def save(self, path: str | Path, *, force: bool = True) -> Path:
        """Write the table as JSON (atomically; ``force=False`` refuses an existing file)."""
        return atomic_write(path, to_json(self.to_dict(), indent=1), force=force)

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        d = dict(d)
        d["rows"] = [LayerSensitivity(**r) for r in d["rows"]]
        d["input_size"] = tuple(d.get("input_size", (1, 3, 224, 224)))
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GhostifyError(f"'{path}' is not a sensitivity table written by ghostify sensitivity ({exc})") from None

    def plot(self, path: str | Path, *, force: bool = True) -> Path:
        """A horizontal bar chart of the loss per layer (one bar per ratio), written as PNG (atomically)."""
        from .sweep import pyplot

        plt = pyplot()
        names, ratios = self.layers, self.ratios
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.18 * len(names) * max(1, len(ratios)) ** 0.5))
        h = 0.8 / len(ratios)
        for i, r in enumerate(ratios):
            loss = {x.name: x.loss for x in self.rows if x.ratio == r}
            ax.barh([j + i * h for j in range(len(names))], [loss.get(n, 0.0) for n in names], height=h,
                    label=f"ratio {r}")
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(names))], names, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=max(1e-6, min((x.loss for x in self.rows if x.loss > 0), default=1e-3)))
        ax.set_xlabel(f"loss when converted alone: {_LOSS_TEXT[self.measure]}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), force=force)
        finally:
            plt.close(fig)


_LOSS_TEXT = {"kl": "mean KL(original || converted), nats", "agree": "-log(top-1 agreement)",
              "top1": "top-1 accuracy drop", "error": "held-out relative output error squared (calibration data)"}


def _per_gmac(r: LayerSensitivity) -> float:
    return r.loss / (r.macs_saved / 1e9) if r.macs_saved > 0 else math.inf


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _calibrate_alone(model: nn.Module, ghost: nn.Module, names: list[str], auto: set[str], scatter: bool,
                     progress: bool, calib_data=None, calib_size: int | None = None, memory_gb: float = 1.5,
                     max_layer_error=None, sequential=None, **options) -> dict:
    """Fit each Ghost layer of ``ghost`` on the *original* model's input to that conv (``init="calib"``
    with ``sequential=False``), capturing the inputs of many layers per forward pass.

    The calibrated init's own sequential loop runs the model up to each layer in turn; fitting
    every layer alone needs only the original's activations, so a few passes capture them all
    (layers grouped to hold at most ``memory_gb`` of inputs at a time).
    """
    from tqdm import tqdm

    from .allocation import _capture_inputs
    from .calibrate import _output_scales, as_input_batches
    from .fold import foldable_layers
    from .transfer import INITS, Layer

    batches = as_input_batches(calib_data, calib_size)
    sizes = {n: x[0].numel() for n, x in _capture_inputs(model, batches[0][:1], names).items()}
    per_layer = {n: sizes[n] * sum(len(b) for b in batches) * 4 / 1e9 for n in names}
    groups, cur, used = [], [], 0.0
    for n in names:
        if cur and used + per_layer[n] > memory_gb:
            groups.append(cur)
            cur, used = [], 0.0
        cur.append(n)
        used += per_layer[n]
    groups.append(cur)
    foldable = foldable_layers(ghost) if hasattr(ghost, "graph") else set()
    scales = _output_scales(ghost, names) if options.get("weighting", "bn") == "bn" else {}
    info = {}
    bar = tqdm(total=len(names), disable=not progress, file=sys.stderr, desc="fit alone", leave=False)
    for group in groups:
        got = {n: [] for n in group}
        for b in batches:
            for n, x in _capture_inputs(model, b, group).items():
                got[n].append(x)
        for n in group:
            conv, layer = model.get_submodule(n), ghost.get_submodule(n)
            item = Layer("layer", conv, layer, fixed_order=not scatter and n not in foldable, cheap_auto=n in auto)
            holder = _Holder(layer)
            weights = {"layer": scales[n]} if n in scales else None
            rec = INITS["calib"](_Holder(conv), holder, [item], calib_data=got.pop(n), channel_weights=weights,
                                 **options)["layer"]
            if holder.layer is not layer:  # cheap="auto" picked another family
                ghost.set_submodule(n, holder.layer)
            info[n] = rec
            bar.update()
    bar.close()
    return info


class _Holder(nn.Module):
    """One layer as a model, so the calibrated init fits it on inputs captured elsewhere."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _context_rows(model, ratios, reference, inputs, refs, labels, measure, baseline, x0, macs0, progress,
                  options: dict, overrides: dict) -> list[LayerSensitivity]:
    """``method="context"``: every layer at every ratio (and kept) inside the uniform ratio-``reference`` model."""
    from tqdm import tqdm

    from .conversion import convert
    from .counting import count

    def measured(layer_overrides):
        ghost = convert(model, ratio=reference, overrides={**overrides, **layer_overrides}, **options).eval()
        metrics = _compare(_outputs(ghost, inputs), refs, labels)
        return ghost, metrics, _loss(measure, metrics, baseline)

    uniform, uniform_metrics, uniform_loss = measured({})
    names = [e.name for e in uniform.ghostify_info.plan.converted]
    macs_ref = count(uniform, x0).macs_by_module
    rows = []
    for name in tqdm(names, disable=not progress, file=sys.stderr, desc=f"context (ratio {reference})", leave=False):
        kept = measured({name: None})[2]
        for ratio in ratios:
            if ratio == reference:
                metrics, loss, after = dict(uniform_metrics), uniform_loss, macs_ref.get(name, 0)
            else:
                ghost, metrics, loss = measured({name: {"ratio": ratio}})
                if name not in {e.name for e in ghost.ghostify_info.plan.converted}:
                    continue  # the plan skips this layer at this ratio
                after = count(ghost, x0).macs_by_module.get(name, 0)
            metrics["kept_loss"] = kept
            rows.append(LayerSensitivity(name, ratio, int(macs0.macs_by_module.get(name, 0)), int(after),
                                         loss - kept, metrics))
    return rows


@torch.no_grad()
def _outputs(model: nn.Module, batches) -> list[torch.Tensor]:
    return [model(x) for x in batches]


def _compare(outs: list[torch.Tensor], refs: list[torch.Tensor], labels) -> dict:
    """Top-1 agreement and mean KL(ref || out) of logits; top-1 accuracy when labels are known."""
    n = sum(len(o) for o in outs)
    agree = sum((o.argmax(1) == r.argmax(1)).sum().item() for o, r in zip(outs, refs))
    kl = sum(F.kl_div(F.log_softmax(o, 1), F.log_softmax(r, 1), log_target=True, reduction="sum").item()
             for o, r in zip(outs, refs))
    res = {"agree_top1": agree / n, "kl": kl / n}
    if labels is not None:
        res["top1"] = sum((o.argmax(1) == y).sum().item() for o, y in zip(outs, labels)) / n
    return res


def _loss(measure: str, metrics: dict, baseline: dict) -> float:
    if measure == "kl":
        return max(metrics["kl"], 0.0)
    if measure == "agree":
        return -math.log(max(metrics["agree_top1"], 1e-6))
    if measure == "top1":
        return baseline["top1"] - metrics["top1"]
    return metrics.get("heldout_error", metrics.get("calib_error", 0.0)) ** 2


def sensitivity(model: nn.Module, *, ratios: Iterable[int] = (2,), dw_size: int = 3, init: str = "calib",
                cheap: str = "dw", calib_data=None, eval_data=None, method: str = "alone", measure: str | None = None,
                input_size=(1, 3, 224, 224), include: Iterable[str] = (), exclude: Iterable[str] = (),
                overrides: dict | None = None, scatter: bool = False, leaf_modules=(), progress: bool = True,
                reference: int | float | None = None, **init_options) -> SensitivityTable:
    """Measure, for each convertible conv of ``model`` and each ratio, the cost of converting it alone.

    Args:
        ratios: candidate ratios (each layer is measured at each).
        dw_size, init, cheap, include, exclude, overrides, scatter, leaf_modules: as :func:`ghostify.convert`.
        calib_data: calibration data for ``init="calib"``.
        eval_data: batches of ``x`` or ``(x, y)`` on which ``method="alone"`` evaluates; use data
            the final check will not use (e.g. other crops of the calibration photos).
        method: ``"alone"`` (evaluate each layer converted alone), ``"proxy"`` (calibration's
            held-out relative error, no evaluation; needs ``init="calib"``) or ``"context"`` (each
            layer moved alone away from the uniform ratio-``reference`` model; see the module doc).
        reference: the uniform ratio ``method="context"`` starts from (default: the smallest ratio).
        measure: the loss: ``"kl"`` (default for ``alone``), ``"agree"``, ``"top1"`` or ``"error"``
            (the only one for ``proxy``).

    Example:
        >>> import torch, torchvision, ghostify
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.randn(4, 3, 32, 32) for _ in range(3)]
        >>> t = ghostify.sensitivity(net, calib_data=data, eval_data=data[:1], input_size=(1, 3, 32, 32),
        ...                          progress=False)
        >>> len(t.layers), t.measure
        (19, 'kl')
    """
    from tqdm import tqdm

    from .calibrate import as_input_batches
    from .conversion import build_config, convert
    from .counting import count
    from .plan import make_plan

    if method not in ("alone", "proxy", "context"):
        raise GhostifyError(f"unknown sensitivity method {method!r}; use 'alone', 'proxy' or 'context'")
    measure = measure or ("error" if method == "proxy" else "kl")
    if measure not in MEASURES:
        raise GhostifyError(f"unknown sensitivity measure {measure!r}; choose one of {', '.join(MEASURES)}")
    if method == "proxy" and (measure != "error" or init != "calib"):
        raise GhostifyError("method='proxy' measures calibration's held-out error: use init='calib', measure='error'")
    if method != "proxy" and eval_data is None:
        raise GhostifyError(f"method={method!r} evaluates each converted layer: pass eval_data (or use "
                            f"method='proxy')")
    if method == "context" and measure == "error":
        raise GhostifyError("method='context' measures the model's output: use measure='kl', 'agree' or 'top1'")
    if init == "calib":
        if calib_data is None:
            raise GhostifyError("init='calib' needs calib_data (or --calib-data)")
        init_options = {"calib_data": calib_data, **init_options}

    training = model.training
    model.eval()
    x0 = torch.zeros(*input_size)
    macs0 = count(model, x0)
    baseline, refs, inputs, labels = {}, None, None, None
    if method != "proxy":
        pairs = [b if isinstance(b, (tuple, list)) else (b, None) for b in eval_data]
        inputs = as_input_batches([x for x, _ in pairs])
        labels = [y for _, y in pairs] if all(y is not None for _, y in pairs) else None
        if measure == "top1" and labels is None:
            raise GhostifyError("measure='top1' needs labelled eval data; use measure='kl' or 'agree'")
        refs = _outputs(model, inputs)
        baseline = _compare(refs, refs, labels)

    rows: list[LayerSensitivity] = []
    reference = (reference or min(ratios)) if method == "context" else None
    try:
        if method == "context":
            rows = _context_rows(model, tuple(ratios), reference, inputs, refs, labels, measure, baseline, x0, macs0,
                                 progress, dict(dw_size=dw_size, init=init, cheap=cheap, include=include,
                                                exclude=exclude, scatter=scatter, leaf_modules=leaf_modules,
                                                **init_options), dict(overrides or {}))
        else:
            work = copy.deepcopy(model)
            for ratio in ratios:
                cfg = build_config(ratio, dw_size, init, cheap, include, exclude, overrides)
                plan = make_plan(model, cfg, leaf_modules=leaf_modules)
                if not plan.converted:
                    continue
                if progress:
                    print(f"sensitivity: ratio {ratio}: fitting {len(plan.converted)} layers", file=sys.stderr)
                ghost = convert(model, plan=plan, fold=False, scatter=scatter, leaf_modules=leaf_modules,
                                initialize=init != "calib", **({} if init == "calib" else init_options))
                info = ghost.ghostify_info
                if init == "calib":
                    auto = {e.name for e in plan.converted if e.spec.cheap == "auto"}
                    info.layer_info.update(_calibrate_alone(model, ghost, [e.name for e in plan.converted], auto,
                                                            scatter, progress, **init_options))
                macs1 = count(ghost, x0)
                names = [e.name for e in info.plan.converted]
                for name in tqdm(names, disable=not progress or method != "alone", file=sys.stderr,
                                 desc=f"ratio {ratio}", leave=False):
                    # too few calibration batches to hold one out: the error on the fitted batches stands in
                    metrics = {k: v for k, v in info.layer_info.get(name, {}).items()
                               if k == "heldout_error" or (k == "calib_error" and method == "proxy")}
                    if method == "alone":
                        original = work.get_submodule(name)
                        work.set_submodule(name, ghost.get_submodule(name))
                        try:
                            metrics.update(_compare(_outputs(work, inputs), refs, labels))
                        finally:
                            work.set_submodule(name, original)
                    rows.append(LayerSensitivity(name, ratio, int(macs0.macs_by_module.get(name, 0)),
                                                 int(macs1.macs_by_module.get(name, 0)),
                                                 _loss(measure, metrics, baseline), metrics))
    finally:
        model.train(training)
    if not rows:
        raise GhostifyError("no conv converts with these settings; see `ghostify inspect`")
    if method == "proxy" and any("heldout_error" not in r.metrics for r in rows):
        print("note: the calibration data is a single batch, so no batch was held out: the proxy ranks the convs by "
              "their error on the fitted batch (optimistic); give more calibration examples than one batch",
              file=sys.stderr)
    settings = {"dw_size": dw_size, "init": init, "cheap": cheap, "scatter": scatter, "ratios": list(ratios)}
    if method == "context":
        settings["reference"] = reference
    return SensitivityTable(measure, method, int(macs0.macs), rows, baseline, settings, tuple(input_size))
