"""The conversion plan: one decision per ``nn.Conv2d`` - convert with a concrete
:class:`~ghostify.config.LayerSpec` or skip with a reason - made from a
:class:`~ghostify.config.GhostConfig` without touching the model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from torch import nn

from .._util import format_table
from ..config import GhostConfig, LayerSpec
from ..errors import GhostifyError
from ..layers import GhostConv2d, ghost_macs_per_position
from . import tracing

__all__ = ["PlanEntry", "Plan", "make_plan", "check_plan"]


@dataclass
class PlanEntry:
    """One conv's decision: ``action`` is ``"convert"`` (with ``spec``) or ``"skip"`` (with ``reason``)."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    action: str
    spec: LayerSpec | None = None
    reason: str = ""

    @property
    def intrinsic(self) -> int | None:
        return math.ceil(self.out_channels / self.spec.ratio) if self.spec else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_size"], d["stride"] = list(self.kernel_size), list(self.stride)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanEntry":
        d = dict(d)
        d["spec"] = LayerSpec(**d["spec"]) if d.get("spec") else None
        d["kernel_size"], d["stride"] = tuple(d["kernel_size"]), tuple(d["stride"])
        return cls(**d)


@dataclass
class Plan:
    """The per-conv decisions for one model, in execution order when the model traced.

    Example:
        >>> import torchvision
        >>> plan = make_plan(torchvision.models.resnet18(), GhostConfig())
        >>> len(plan.converted), plan.skipped[0].name, plan.skipped[0].reason.split(" (")[0]
        (19, 'conv1', 'stem')
    """

    entries: list[PlanEntry]
    traced: bool = True
    trace_error: str | None = None

    @property
    def converted(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.action == "convert"]

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.action == "skip"]

    def __getitem__(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def table(self, fidelity: dict[str, dict] | None = None) -> str:
        """A fixed-width table: one row per conv.

        ``fidelity``: per-layer records of a calibrated conversion (``ConversionInfo.layer_info``);
        adds each layer's relative output error on the calibration and held-out batches.
        """
        fields_ = ("calib_error", "heldout_error") if fidelity else ()
        rows = [("layer", "shape", "action", "ratio", "dw", "init", "cheap",
                 *(["calib err", "held-out err"] if fidelity else []), "reason")]
        for e in self.entries:
            k = "x".join(map(str, e.kernel_size))
            s = e.spec
            rec = (fidelity or {}).get(e.name, {})
            errs = [f"{rec[f]:.3f}" if f in rec else "" for f in fields_]
            rows.append((e.name, f"{e.in_channels}->{e.out_channels} {k}/{e.stride[0]}", e.action,
                         *(map(str, (f"{s.ratio:.6g}", s.dw_size, s.init, s.cheap)) if s else ("",) * 4), *errs,
                         e.reason))
        head = f"{len(self.converted)} of {len(self.entries)} convs convert"
        if not self.traced:
            head += f" (model not traceable, submodules swapped instead: {self.trace_error})"
        if fidelity:
            head += "; errors: relative output error of each layer fitted by init=calib"
        return head + "\n" + format_table(rows)

    def to_dict(self) -> dict:
        return {"traced": self.traced, "trace_error": self.trace_error,
                "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls([PlanEntry.from_dict(e) for e in d["entries"]], d.get("traced", True), d.get("trace_error"))


def _parent_types(model: nn.Module, name: str) -> list[type]:
    types, mod = [type(model)], model
    for part in name.split(".")[:-1]:
        mod = getattr(mod, part)
        types.append(type(mod))
    return types


def _decide(name: str, conv: nn.Conv2d, stem: bool, shared: bool, cfg: GhostConfig,
            model: nn.Module) -> PlanEntry:
    entry = PlanEntry(name, conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                      conv.groups, "skip")

    def skip(reason):
        entry.reason = reason
        return entry

    if conv.groups != 1:
        return skip(f"groups={conv.groups}: Ghost layers replace groups=1 convs")
    if conv.padding_mode != "zeros":
        return skip(f"padding_mode={conv.padding_mode!r}: only 'zeros' padding converts")
    why = cfg.selected(name)
    if why:
        return skip(why)
    spec = cfg.resolve(name, [type(conv)] + _parent_types(model, name)[::-1])
    if spec is None:
        return skip("set to None by an override")
    spec = replace(spec, ratio=spec.ratio_for(conv.out_channels))
    if stem and not cfg.explicit_name(name):
        return skip(f"stem (first conv on the input); an override on '{name}' converts it")
    if shared:
        return skip("module is called more than once; Ghost conversion would change every call site")
    if conv.out_channels < 2 * spec.ratio or (spec.ratio > 1 and math.ceil(conv.out_channels / spec.ratio) == conv.out_channels):
        return skip(f"out_channels={conv.out_channels} is too few for ratio {spec.ratio}: no ghost channel to gain")
    cheap = "dw" if spec.cheap == "auto" else spec.cheap
    ghost, plain = ghost_macs_per_position(conv.in_channels, conv.out_channels, conv.kernel_size, spec.ratio,
                                           spec.dw_size, cheap)
    if ghost > plain and not cfg.explicit_name(name):
        return skip(f"no saving: the Ghost form (cheap={cheap}) costs {ghost} MACs per position, the conv {plain}; "
                    f"an override on '{name}' converts it anyway")
    entry.action, entry.spec = "convert", spec
    return entry


def make_plan(model: nn.Module, config: GhostConfig | None = None, *, leaf_modules=(),
              traced: "tracing.TraceResult | None" = None) -> Plan:
    """Decide, for every ``nn.Conv2d`` in ``model``, whether and how it converts. Pure: ``model`` is not changed.

    Defaults follow GhostNet: convert every conv except the stem; skip grouped convs,
    non-``zeros`` padding, convs with fewer than ``2 * ratio`` outputs and convs whose Ghost
    form would cost more MACs (see :func:`ghostify.layers.ghost_macs_per_position`);
    an exact-name override converts the last two anyway.

    Example:
        >>> import torchvision
        >>> plan = make_plan(torchvision.models.vgg11_bn(), GhostConfig(LayerSpec(ratio=4)))
        >>> [e.action for e in plan.entries][:3]
        ['skip', 'convert', 'convert']
    """
    cfg = config or GhostConfig()
    traced = traced or tracing.trace(model, leaf_modules)
    mods = dict(model.named_modules())
    if traced.graph_module is not None:
        gm = traced.graph_module
        nodes = tracing.conv_nodes(gm)
        order = list(dict.fromkeys(n.target for n in nodes))
        calls = {t: sum(1 for n in nodes if n.target == t) for t in order}
        stems = tracing.stem_nodes(gm)
    else:  # not traceable: module order, the first conv taken as the stem
        order = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        calls, stems = {}, set(order[:1])
    # convs inside existing Ghost layers are not converted again
    inner = {f"{n}.{c}" for n, m in mods.items() if isinstance(m, GhostConv2d) for c, _ in m.named_modules()}
    entries = [_decide(n, mods[n], n in stems, calls.get(n, 1) > 1, cfg, model)
               for n in order if n not in inner and isinstance(mods.get(n), nn.Conv2d)]
    return Plan(entries, traced.graph_module is not None, traced.error)


def check_plan(plan: Plan, model: nn.Module, *, leaf_modules=(), source: str = "the plan") -> Plan:
    """Refuse a plan not made for ``model``: it must list exactly the model's convs, with their shapes.

    Example:
        >>> import torchvision
        >>> plan = make_plan(torchvision.models.resnet18())
        >>> check_plan(plan, torchvision.models.resnet34())
        Traceback (most recent call last):
        ...
        ghostify.errors.GhostifyError: the plan was made for another model (this one has 16 convs it does not list, e.g. 'layer1.2.conv1'); make the plan from this model (--save-plan)
    """
    if not plan.entries:
        raise GhostifyError(f"{source} is empty (it lists no convs); make the plan from this model (--save-plan)")

    def geometry(e: PlanEntry):
        return e.in_channels, e.out_channels, tuple(e.kernel_size), tuple(e.stride), e.groups

    want = {e.name: geometry(e) for e in make_plan(model, GhostConfig(), leaf_modules=leaf_modules).entries}
    got = {e.name: geometry(e) for e in plan.entries}
    problems = []
    for text, names in (("it lists {n} convs this one does not have", [n for n in got if n not in want]),
                        ("this one has {n} convs it does not list", [n for n in want if n not in got]),
                        ("{n} convs have other shapes", [n for n in got if n in want and got[n] != want[n]])):
        if names:
            problems.append(text.format(n=len(names)) + f", e.g. '{names[0]}'")
    if problems:
        raise GhostifyError(f"{source} was made for another model ({'; '.join(problems)}); "
                            "make the plan from this model (--save-plan)")
    return plan
