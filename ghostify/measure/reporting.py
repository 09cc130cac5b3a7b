"""The conversion report: MACs, parameters and (optionally) latency, before and after, per layer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..conversion.rewrite import conversion_info
from .._util import format_size, format_table
from .counting import count
from .latency import measure_latency
from ..errors import GhostifyError

__all__ = ["ConversionReport", "LayerRow", "report"]


@dataclass
class LayerRow:
    """One conv of the original model: what happened to it and what it costs before and after."""

    name: str
    action: str
    reason: str = ""
    ratio: int | None = None
    dw_size: int | None = None
    init: str | None = None
    cheap: str | None = None
    folded: bool = False
    order: str = ""  # folded (into consumers), cat (identity layout) or scatter (reordered at run time)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    info: dict = field(default_factory=dict)


@dataclass
class ConversionReport:
    """Before/after figures of a conversion. ``table()`` prints it; ``to_dict()``/``to_json()`` serialise it.

    MACs count one multiply-add as one (fvcore's convention) on ``input_size``.
    """

    input_size: tuple[int, ...]
    mode: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: list[LayerRow]
    trace_error: str | None = None
    uncounted_ops: dict[str, int] = field(default_factory=dict)
    latency: dict | None = None
    model: str | None = None

    @property
    def converted(self) -> list[LayerRow]:
        return [r for r in self.layers if r.action == "convert"]

    @property
    def skipped(self) -> list[LayerRow]:
        return [r for r in self.layers if r.action == "skip"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["macs_ratio"] = self.macs_after / self.macs_before if self.macs_before else None
        d["params_ratio"] = self.params_after / self.params_before if self.params_before else None
        d["converted"] = [r.name for r in self.converted]
        d["skipped"] = [{"name": r.name, "reason": r.reason} for r in self.skipped]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self, layers: bool = True) -> str:
        """An fvcore-like table: totals first, then one row per conv (sizes to three significant figures)."""
        def ratio(a, b):
            return f"{a / b:.3f}" if b else "-"

        out = [f"ghostify report{f' for {self.model}' if self.model else ''}: input {tuple(self.input_size)}, "
               f"{len(self.converted)} convs converted, {len(self.skipped)} kept, mode={self.mode}"]
        if self.trace_error:
            out.append(f"note: the model could not be traced ({self.trace_error}); convs were swapped "
                       "in place and channel orders are not folded")
        rows = [("", "before", "after", "after/before"),
                ("MACs", format_size(self.macs_before), format_size(self.macs_after),
                 ratio(self.macs_after, self.macs_before)),
                ("params", format_size(self.params_before), format_size(self.params_after),
                 ratio(self.params_after, self.params_before))]
        for key, lat in (self.latency or {}).items():
            rows.append((f"latency {key} (ms)", f"{lat['before']['median_ms']:.2f}", f"{lat['after']['median_ms']:.2f}",
                         ratio(lat["after"]["median_ms"], lat["before"]["median_ms"])))
        out.append(format_table(rows, markdown=True))
        if self.uncounted_ops:
            out.append("not counted by fvcore (no multiply-adds or unsupported): "
                       + ", ".join(f"{k} x{v}" for k, v in sorted(self.uncounted_ops.items())))
        if layers:
            rows = [("layer", "action", "ratio", "dw", "init", "MACs", "after", "params", "after", "note")]
            for r in self.layers:
                conv = r.action == "convert"
                note = r.reason if not conv else f"order: {r.order}"
                if conv and "weight_residual" in r.info:
                    note += f", weight fit residual {r.info['weight_residual']:.3f}"
                if conv and "heldout_error" in r.info:
                    note += f", held-out error {r.info['heldout_error']:.3f}"
                rows.append((r.name, r.action, str(r.ratio or ""), str(r.dw_size or ""), r.init or "",
                             format_size(r.macs_before), format_size(r.macs_after) if conv else "",
                             format_size(r.params_before), format_size(r.params_after) if conv else "", note))
            out.append(format_table(rows, markdown=True))
        return "\n".join(out)


def report(model: nn.Module, ghost: nn.Module, input_size=(1, 3, 224, 224), *, latency: bool = False,
           batch_sizes=(1,), repeats: int = 10, threads: int | None = None, device: str | None = None,
           name: str | None = None, timer=None) -> ConversionReport:
    """Compare ``model`` with its converted ``ghost``: MACs, params and optionally latency, total and per layer.

    ``timer(models, inputs, repeats=, threads=)`` times the two models (default
    :func:`~ghostify.measure_latency`, eager PyTorch); e.g. ``functools.partial(ghostify.runtime_latency,
    runtime="ort")`` times them, fused, in ONNX Runtime.

    Example:
        >>> import torchvision, ghostify
        >>> model = torchvision.models.resnet18()
        >>> rep = ghostify.report(model, ghostify.convert(model), input_size=(1, 3, 64, 64))
        >>> rep.macs_after < rep.macs_before
        True
    """
    info = conversion_info(ghost)
    if info is None:
        raise GhostifyError("the second model was not made by ghostify.convert (no ghostify_info); "
                            "pass the result of ghostify.convert or ghostify.load")
    dev = torch.device(device) if device else next(iter(model.parameters()), torch.empty(0)).device
    x = torch.randn(*input_size, device=dev)
    before, after = count(model, x), count(ghost, x)
    folded = set(info.folded)
    rows = []
    for e in info.plan.entries:
        s = e.spec
        order = ""
        if e.action == "convert":
            layer = ghost.get_submodule(e.name)
            order = "folded" if layer.emit_internal_order else "cat" if layer._identity_order else "scatter"
        rows.append(LayerRow(e.name, e.action, e.reason, s and s.ratio, s and s.dw_size, s and s.init, s and s.cheap,
                             e.name in folded, order, before.macs_by_module.get(e.name, 0),
                             after.macs_by_module.get(e.name, 0), before.params_by_module.get(e.name, 0),
                             after.params_by_module.get(e.name, 0), dict(info.layer_info.get(e.name, {}))))
    uncounted = dict(after.uncounted)
    rep = ConversionReport(tuple(input_size), info.mode, before.macs, after.macs, before.params, after.params, rows,
                           info.plan.trace_error, uncounted, model=name or (info.arch or {}).get("name"))
    if latency:
        rep.latency = {}
        for b in batch_sizes:
            xb = torch.randn(b, *input_size[1:], device=dev)
            res = (timer or measure_latency)({"before": model, "after": ghost}, xb, repeats=repeats, threads=threads)
            rep.latency[f"batch {b}"] = res
    return rep
