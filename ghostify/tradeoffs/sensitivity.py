"""Per-layer sensitivity: what converting each conv *alone* costs, and what it saves.

For every convertible conv and every candidate ratio, one row: MACs before/after and a
``loss``, the measured damage of converting that layer and no other. Two measures:

* ``method="alone"`` (default): for each ratio, one conversion fits every layer on the
  *original* model's inputs (``init="calib"`` with ``sequential=False``, so a layer's fit
  does not depend on which others convert); then each fitted Ghost layer is put alone into
  the original model, which is evaluated on ``eval_data`` against the original's cached
  outputs. ``loss`` is the mean KL(original || converted) in nats (``measure="kl"``),
  ``-log(top-1 agreement)`` (``"agree"``), the drop in top-1 accuracy (``"top1"``, needs
  labels) or, for a model whose output is not logits (a backbone, a detector's trunk), the
  squared relative error ``||f - f0||^2 / ||f0||^2`` of its output (``"output"``). One
  calibration pass per ratio plus one evaluation per layer and ratio.
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
import sys
from typing import Iterable

import torch
from torch import nn

from .._util import capture, eval_mode
from ..config import GhostConfig, build_config, default_cheap
from ..conversion.fold import foldable_layers
from ..graph import bn_output_scales
from ..conversion.plan import make_plan
from ..conversion.rewrite import convert
from ..errors import GhostifyError
from ..init import INITS, Layer
from ..init.calib import as_input_batches, calibration_batches
from ..measure.counting import count
from ..measure.evaluation import compare_outputs, model_outputs, output_error
from .table import MEASURES, LayerSensitivity, SensitivityTable, loss_of

__all__ = ["LayerSensitivity", "SensitivityTable", "sensitivity", "MEASURES"]


def _calibrate_alone(model: nn.Module, ghost: nn.Module, names: list[str], auto: set[str], scatter: bool,
                     progress: bool, calib_data=None, calib_size: int | None = None, calib_augment: int = 0,
                     memory_gb: float = 1.5, max_layer_error=None, sequential=None, **options) -> dict:
    """Fit each Ghost layer of ``ghost`` on the *original* model's input to that conv (``init="calib"``
    with ``sequential=False``), capturing the inputs of many layers per forward pass.

    The calibrated init's own sequential loop runs the model up to each layer in turn; fitting
    every layer alone needs only the original's activations, so a few passes capture them all
    (layers grouped to hold at most ``memory_gb`` of inputs at a time).
    """
    from tqdm import tqdm

    batches = calibration_batches(calib_data, calib_size, calib_augment, options.get("seed", 0))
    modules = {n: model.get_submodule(n) for n in names}
    sizes = {n: x[0].numel() for n, x in capture(model, modules, batches[0][:1]).items()}
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
    scales = bn_output_scales(ghost, names) if options.get("weighting", "bn") == "bn" else {}
    info = {}
    bar = tqdm(total=len(names), disable=not progress, file=sys.stderr, desc="fit alone", leave=False)
    for group in groups:
        got = {n: [] for n in group}
        for b in batches:
            for n, x in capture(model, {n: modules[n] for n in group}, b).items():
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


def _context_rows(model, ratios, config: GhostConfig, inputs, refs, labels, measure, baseline, x0, macs0, progress,
                  options: dict) -> list[LayerSensitivity]:
    """``method="context"``: every layer at every ratio (and kept) inside the uniform model ``config`` converts."""
    from tqdm import tqdm

    reference = config.global_spec.ratio

    def measured(layer_overrides):
        ghost = convert(model, config=build_config(overrides=layer_overrides, config=config), **options).eval()
        metrics = _compare(model_outputs(ghost, inputs), refs, labels, measure)
        return ghost, metrics, loss_of(measure, metrics, baseline)

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


def sensitivity(model: nn.Module, *, config: GhostConfig | None = None, ratios: Iterable[int] = (2,),
                dw_size: int | None = None, init: str = "calib", cheap: str | None = None, calib_data=None,
                eval_data=None, method: str = "alone", measure: str | None = None, input_size=(1, 3, 224, 224),
                include: Iterable[str] = (), exclude: Iterable[str] = (), overrides: dict | None = None,
                scatter: bool = False, leaf_modules=(), progress: bool = True, reference: int | float | None = None,
                **init_options) -> SensitivityTable:
    """Measure, for each convertible conv of ``model`` and each ratio, the cost of converting it alone.

    Args:
        ratios: candidate ratios (each layer is measured at each).
        config: the layer settings, a :class:`~ghostify.GhostConfig` (its global ratio is replaced by each
            of ``ratios``); without it one is built from ``dw_size, init, cheap, include, exclude,
            overrides`` (as :func:`ghostify.convert` does).
        scatter, leaf_modules: as :func:`ghostify.convert`.
        calib_data: calibration data for ``init="calib"``.
        eval_data: batches of ``x`` or ``(x, y)`` on which ``method="alone"`` evaluates; use data
            the final check will not use (e.g. other crops of the calibration photos).
        method: ``"alone"`` (evaluate each layer converted alone), ``"proxy"`` (calibration's
            held-out relative error, no evaluation; needs ``init="calib"``) or ``"context"`` (each
            layer moved alone away from the uniform ratio-``reference`` model; see the module doc).
        reference: the uniform ratio ``method="context"`` starts from (default: the smallest ratio).
        measure: the loss: ``"kl"`` (default for ``alone``), ``"agree"``, ``"top1"``, ``"output"`` (the
            relative error of the whole output, squared: for trunks and other models without logits) or
            ``"error"`` (the only one for ``proxy``).

    Example:
        >>> import torch, torchvision, ghostify
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.randn(4, 3, 32, 32) for _ in range(3)]
        >>> t = ghostify.sensitivity(net, calib_data=data, eval_data=data[:1], input_size=(1, 3, 32, 32),
        ...                          progress=False)
        >>> len(t.layers), t.measure
        (19, 'kl')
    """
    ratios = tuple(ratios)
    config = build_config(min(ratios), dw_size, init, cheap, include, exclude, overrides, config)
    spec = config.global_spec
    measure = _check(method, measure, spec.init, calib_data, eval_data)
    if spec.init == "calib":
        init_options = {"calib_data": calib_data, **init_options}
    x0 = torch.zeros(*input_size)
    with eval_mode(model):
        macs0 = count(model, x0)
        baseline, refs, inputs, labels = {}, None, None, None
        if method != "proxy":
            pairs = [b if isinstance(b, (tuple, list)) else (b, None) for b in eval_data]
            inputs = as_input_batches([x for x, _ in pairs])
            labels = [y for _, y in pairs] if all(y is not None for _, y in pairs) else None
            if measure == "top1" and labels is None:
                raise GhostifyError("measure='top1' needs labelled eval data; use measure='kl' or 'agree'")
            refs = model_outputs(model, inputs)
            if measure != "output" and not all(isinstance(r, torch.Tensor) and r.dim() == 2 for r in refs):
                shape = tuple(refs[0].shape) if isinstance(refs[0], torch.Tensor) else type(refs[0]).__name__
                raise GhostifyError(f"measure={measure!r} compares logits (batch, classes), but the model returns "
                                    f"{shape}; use measure='output' (the relative error of the whole output; on the "
                                    f"command line `ghostify sensitivity --measure output -o FILE`, then "
                                    f"`--sensitivity FILE`)")
            baseline = _compare(refs, refs, labels, measure)
        reference = (reference or min(ratios)) if method == "context" else None
        if method == "context":
            rows = _context_rows(model, ratios, config.with_global(ratio=reference), inputs, refs, labels, measure,
                                 baseline, x0, macs0, progress,
                                 dict(scatter=scatter, leaf_modules=leaf_modules, **init_options))
        else:
            rows = _alone_rows(model, ratios, config, method, measure, inputs, refs, labels, baseline, x0, macs0,
                               scatter, leaf_modules, progress, init_options)
    if not rows:
        raise GhostifyError("no conv converts with these settings; see `ghostify inspect`")
    if method == "proxy" and any("heldout_error" not in r.metrics for r in rows):
        print("note: the calibration data is a single batch, so no batch was held out: the proxy ranks the convs by "
              "their error on the fitted batch (optimistic); give more calibration examples than one batch",
              file=sys.stderr)
    cheap, dw_size = default_cheap(spec.init, spec.cheap, spec.dw_size)  # recorded as converted
    settings = {"dw_size": dw_size, "init": spec.init, "cheap": cheap, "scatter": scatter, "ratios": list(ratios)}
    if method == "context":
        settings["reference"] = reference
    if init_options.get("calib_augment"):
        settings["calib_augment"] = init_options["calib_augment"]
    return SensitivityTable(measure, method, int(macs0.macs), rows, baseline, settings, tuple(input_size))


def _check(method: str, measure: str | None, init: str, calib_data, eval_data) -> str:
    """The measure to use; refuses combinations of method, measure and data that cannot work."""
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
        raise GhostifyError("method='context' measures the model's output: use measure='kl', 'agree', 'top1' or "
                            "'output'")
    if init == "calib" and calib_data is None:
        raise GhostifyError("init='calib' needs calib_data (or --calib-data)")
    return measure


def _compare(outs, refs, labels, measure: str) -> dict:
    """The metrics of ``outs`` against the original's ``refs``: the relative output error for ``measure="output"``,
    else agreement and KL of logits (and top-1 with labels)."""
    if measure == "output":
        return {"output_error": output_error(outs, refs)}
    return compare_outputs(outs, refs, labels)


def _alone_rows(model, ratios, config: GhostConfig, method, measure, inputs, refs, labels, baseline, x0, macs0,
                scatter, leaf_modules, progress, init_options) -> list[LayerSensitivity]:
    """``method="alone"`` and ``"proxy"``: per ratio, every layer fitted on the original's inputs, then (alone)
    each put alone into the original model and evaluated."""
    from tqdm import tqdm

    calib = config.global_spec.init == "calib"
    work = copy.deepcopy(model)
    rows = []
    for ratio in ratios:
        plan = make_plan(model, config.with_global(ratio=ratio), leaf_modules=leaf_modules)
        if not plan.converted:
            continue
        if progress:
            print(f"sensitivity: ratio {ratio}: fitting {len(plan.converted)} layers", file=sys.stderr)
        ghost = convert(model, plan=plan, fold=False, scatter=scatter, leaf_modules=leaf_modules,
                        initialize=not calib, **({} if calib else init_options))
        info = ghost.ghostify_info
        if calib:
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
                    metrics.update(_compare(model_outputs(work, inputs), refs, labels, measure))
                finally:
                    work.set_submodule(name, original)
            rows.append(LayerSensitivity(name, ratio, int(macs0.macs_by_module.get(name, 0)),
                                         int(macs1.macs_by_module.get(name, 0)),
                                         loss_of(measure, metrics, baseline), metrics))
    return rows
