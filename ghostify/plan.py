"""Layer selection and the conversion plan.

Which conv gets which settings is said once, with a stated priority (as in
``torch.ao.quantization.QConfigMapping``)::

    global  <  module type  <  glob pattern on the name  <  exact name

A level's value is a partial spec (``{"ratio": 4}``) merged over the levels below it,
or ``None``, which skips the layer. ``make_plan`` turns this into one decision per
``nn.Conv2d`` - convert with ``(ratio, dw_size, init, cheap)`` or skip with a reason -
without touching the model.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable

from torch import nn

from . import tracing
from .errors import GhostifyError
from .modules import CHEAP_OPS, GhostConv2d, ghost_macs_per_position
from .ratio import check_ratio

__all__ = ["LayerSpec", "GhostConfig", "PlanEntry", "Plan", "make_plan", "check_plan"]

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class LayerSpec:
    """How one conv is converted.

    Attributes:
        ratio: ``s``; the layer keeps ``ceil(n / s)`` intrinsic filters (an integer >= 1 or a
            fraction > 1, e.g. 1.5 keeps two thirds).
        dw_size: kernel size of the cheap op (odd, >= 1).
        init: name of a weight-transfer strategy (see ``ghostify.transfer.INITS``).
        cheap: name of a cheap-op family (see ``ghostify.modules.CHEAP_OPS``), or ``"auto"``:
            the init strategy fits the families it can and keeps, per layer, the one with the
            lower held-out error per MAC (``init="calib"`` does; the plan then records the choice).
    """

    ratio: int | float = 2
    dw_size: int = 3
    init: str = "copy"
    cheap: str = "dw"

    def __post_init__(self):
        try:
            object.__setattr__(self, "ratio", check_ratio(self.ratio))  # 2.0 -> 2
        except ValueError as e:
            raise GhostifyError(str(e)) from None
        if isinstance(self.dw_size, bool) or not isinstance(self.dw_size, int) or self.dw_size < 1 or self.dw_size % 2 == 0:
            raise GhostifyError(f"dw_size must be an odd integer >= 1 (got {self.dw_size!r}); try --dw-size 3")
        from .transfer import INITS  # late: transfer imports plan's users

        if self.init not in INITS:
            raise GhostifyError(f"unknown init {self.init!r}; choose one of {sorted(INITS)}")
        if self.cheap not in CHEAP_OPS and self.cheap != "auto":
            raise GhostifyError(f"unknown cheap op {self.cheap!r}; choose one of {sorted(CHEAP_OPS) + ['auto']}")
        if self.cheap == "auto" and not getattr(INITS[self.init], "chooses_cheap", False):
            raise GhostifyError(f"cheap='auto' is chosen per layer from calibration data; use it with --init calib "
                                f"(init {self.init!r} cannot choose)")

    def merged(self, override: dict[str, Any]) -> "LayerSpec":
        unknown = set(override) - {f.name for f in fields(self)}
        if unknown:
            raise GhostifyError(f"unknown layer setting(s) {sorted(unknown)}; valid: ratio, dw_size, init, cheap")
        return replace(self, **override)


Override = "dict[str, Any] | LayerSpec | None"


def _as_override(value) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, LayerSpec):
        return asdict(value)
    if isinstance(value, dict):
        return dict(value)
    raise GhostifyError(f"a layer override must be a dict, a LayerSpec or None (got {type(value).__name__})")


@dataclass
class GhostConfig:
    """Which convs to convert, and with which settings.

    Example:
        >>> cfg = (GhostConfig(LayerSpec(ratio=2))
        ...        .set_glob("layer4.*", {"ratio": 4})
        ...        .set_name("layer4.0.conv1", None)      # keep this one as a conv
        ...        .exclude("fc*"))
        >>> cfg.resolve("layer4.1.conv2").ratio, cfg.resolve("layer4.0.conv1")
        (4, None)
    """

    global_spec: LayerSpec = field(default_factory=LayerSpec)
    by_type: list[tuple[type, dict | None]] = field(default_factory=list)
    by_glob: list[tuple[str, dict | None]] = field(default_factory=list)
    by_name: dict[str, dict | None] = field(default_factory=dict)
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)

    # setters return self so calls chain
    def set_global(self, spec: LayerSpec | None = None, **kwargs) -> "GhostConfig":
        self.global_spec = (spec or self.global_spec).merged(kwargs)
        return self

    def set_type(self, module_type: type, override) -> "GhostConfig":
        self.by_type.append((module_type, _as_override(override)))
        return self

    def set_glob(self, pattern: str, override) -> "GhostConfig":
        self.by_glob.append((pattern, _as_override(override)))
        return self

    def set_name(self, name: str, override) -> "GhostConfig":
        self.by_name[name] = _as_override(override)
        return self

    def set(self, pattern: str, override) -> "GhostConfig":
        """``set_glob`` when ``pattern`` holds ``* ? [``, else ``set_name``."""
        return self.set_glob(pattern, override) if _GLOB_CHARS & set(pattern) else self.set_name(pattern, override)

    def include(self, *patterns: str) -> "GhostConfig":
        self.includes.extend(patterns)
        return self

    def exclude(self, *patterns: str) -> "GhostConfig":
        self.excludes.extend(patterns)
        return self

    def selected(self, name: str) -> str | None:
        """None when ``name`` passes include/exclude, else the reason it does not."""
        if self.includes and not any(fnmatch.fnmatchcase(name, p) for p in self.includes):
            return f"not matched by --include {' '.join(self.includes)}"
        for p in self.excludes:
            if fnmatch.fnmatchcase(name, p):
                return f"excluded by --exclude {p}"
        return None

    def resolve(self, name: str, module_types: Iterable[type] = ()) -> LayerSpec | None:
        """The spec for layer ``name`` (``module_types``: the conv's class and its parents'), or None to skip."""
        module_types = tuple(module_types)
        levels: list[dict | None] = []
        levels += [o for t, o in self.by_type if any(issubclass(mt, t) for mt in module_types)]
        levels += [o for p, o in self.by_glob if fnmatch.fnmatchcase(name, p)]
        if name in self.by_name:
            levels.append(self.by_name[name])
        spec: LayerSpec | None = self.global_spec
        for o in levels:
            spec = None if o is None else (spec or self.global_spec).merged(o)
        return spec

    def explicit_name(self, name: str) -> bool:
        return self.by_name.get(name) is not None

    def to_dict(self) -> dict:
        return {
            "global": asdict(self.global_spec),
            "type": [[f"{t.__module__}.{t.__qualname__}", o] for t, o in self.by_type],
            "glob": [[p, o] for p, o in self.by_glob],
            "name": dict(self.by_name),
            "include": list(self.includes),
            "exclude": list(self.excludes),
        }

    @classmethod
    def from_dict(cls, d: dict, *, trust_code: bool = False) -> "GhostConfig":
        """The inverse of :meth:`to_dict`. Type overrides name classes (``torch.nn.modules.conv.Conv2d``); a
        dict is data, so only classes of modules already imported are looked up, unless ``trust_code=True``
        lets the names be imported (importing a module runs its code).
        """
        import sys

        from .zoo import TRUST_HINT, import_object

        cfg = cls(LayerSpec(**d.get("global", {})))
        for t, o in d.get("type", []):
            mod, _, name = str(t).rpartition(".")
            if trust_code:
                cls_ = import_object(f"{mod}:{name}")
            elif mod in sys.modules and isinstance(getattr(sys.modules[mod], name, None), type):
                cls_ = getattr(sys.modules[mod], name)
            else:
                raise GhostifyError(f"the configuration names the type '{t}', whose module is not imported; "
                                    f"{TRUST_HINT}")
            if not (isinstance(cls_, type) and issubclass(cls_, nn.Module)):
                raise GhostifyError(f"the configuration names '{t}', which is not an nn.Module class")
            cfg.set_type(cls_, o)
        for p, o in d.get("glob", []):
            cfg.set_glob(p, o)
        for n, o in d.get("name", {}).items():
            cfg.set_name(n, o)
        return cfg.include(*d.get("include", [])).exclude(*d.get("exclude", []))


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
        >>> len(plan.converted), plan.skipped[0].name, plan.skipped[0].reason.split(":")[0]
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
                         *(map(str, (s.ratio, s.dw_size, s.init, s.cheap)) if s else ("",) * 4), *errs, e.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        head = f"{len(self.converted)} of {len(self.entries)} convs convert"
        if not self.traced:
            head += f" (model not traceable, submodules swapped instead: {self.trace_error})"
        if fidelity:
            head += "; errors: relative output error of each layer fitted by init=calib"
        return head + "\n" + "\n".join(lines)

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
    form would cost more MACs (see :func:`ghostify.modules.ghost_macs_per_position`);
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
