"""The one configuration object: which convs convert, and with which settings.

Which conv gets which settings is said once, with a stated priority (as in
``torch.ao.quantization.QConfigMapping``)::

    global  <  module type  <  glob pattern on the name  <  exact name

A level's value is a partial :class:`LayerSpec` (``{"ratio": 4}``) merged over the levels
below it, or ``None``, which skips the layer. A :class:`GhostConfig` is built once - by
:func:`build_config` from ``convert``'s keywords, by the CLI from the options generated from
:class:`LayerSpec`'s fields, or by a recipe - and travels as is to ``convert``,
``sensitivity``, ``allocate``, ``Sweep`` and the budget.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable

from .errors import GhostifyError
from .ratio import check_ratio, rounded_ratio
from .trust import TRUST_HINT, import_object

__all__ = ["LayerSpec", "GhostConfig", "build_config", "default_cheap"]

_GLOB_CHARS = set("*?[")

# The cheap op a layer gets when none is given, by init strategy (every other init: the paper's "dw"),
# and its kernel size, by cheap-op family (every other family: 3). Calibrated, the 1x1 mix measured
# best on the MNIST reference models and on a ResNet-20 the project never saw (README, "Training-free
# conversion"); copied weights keep the paper's depthwise 3x3.
DEFAULT_CHEAP = {"calib": "mix"}
DEFAULT_DW_SIZE = {"mix": 1}


def default_cheap(init: str, cheap: str | None = None, dw_size: int | None = None) -> tuple[str, int]:
    """The ``(cheap, dw_size)`` a layer converted with ``init`` gets: the given ones, else the defaults.

    Without ``cheap``: ``mix`` for ``init="calib"``, ``dw`` (the paper's depthwise op) otherwise.
    Without ``dw_size``: 1 for ``mix``, 3 for the other families. Every entry point (``convert``,
    the CLI, recipes, sweeps, sensitivity) resolves its defaults here.

    Example:
        >>> default_cheap("copy"), default_cheap("calib"), default_cheap("calib", "dw"), default_cheap("calib", None, 3)
        (('dw', 3), ('mix', 1), ('dw', 3), ('mix', 3))
    """
    cheap = DEFAULT_CHEAP.get(init, "dw") if cheap is None else cheap
    return cheap, DEFAULT_DW_SIZE.get(cheap, 3) if dw_size is None else dw_size


@dataclass(frozen=True)
class LayerSpec:
    """How one conv is converted.

    Attributes:
        ratio: ``s``; the layer keeps ``ceil(n / s)`` intrinsic filters (an integer >= 1 or a
            fraction > 1, e.g. 1.5 keeps two thirds).
        dw_size: kernel size of the cheap op (odd, >= 1); None: 1 for ``mix``, else 3.
        init: name of a weight-transfer strategy (see ``ghostify.INITS``).
        cheap: name of a cheap-op family (see ``ghostify.CHEAP_OPS``), or ``"auto"``:
            the init strategy fits the families it can and keeps, per layer, the one with the
            lower held-out error per MAC (``init="calib"`` does; the plan then records the choice).
            None: ``mix`` for ``init="calib"``, ``dw`` otherwise (:func:`default_cheap`).
        round_to: keep the intrinsic count a multiple of this, the nearest to ``ceil(n / ratio)``
            (:func:`ghostify.ratio.rounded_ratio`); the plan records each layer's ratio that gives it.

    A plan's entries hold concrete values (:meth:`resolved`), so a saved model records them.
    """

    # The one definition of the layer settings: the CLI generates its --ratio/--dw-size/--init/--cheap
    # options from these fields ("help"), and a recipe's ``conversion`` section reuses them with their
    # checks ("ratio", "min", "odd"). ``ratio`` is a float in the type sense; integers stay int.
    ratio: float = field(default=2, metadata={"ratio": True, "help": (
        "s: keep ceil(n/s) intrinsic filters per converted conv (2, 3, 4, ... or a fraction like 1.5).")})
    dw_size: int | None = field(default=None, metadata={"min": 1, "odd": True, "help": (
        "Kernel size of the cheap op (odd; default 1 for mix, 3 otherwise).")})
    init: str = field(default="copy", metadata={"help": (
        "Weight transfer: copy (exact intrinsic channels, fitted ghosts), calib (fitted on --calib-data) "
        "or random.")})
    cheap: str | None = field(default=None, metadata={"help": (
        "Cheap-op family: dw (depthwise, as the paper), mix (1x1 from the intrinsic maps), or auto "
        "(per layer, the better fit per MAC; needs --init calib). Default: mix with --init calib, else dw.")})
    round_to: int = field(default=1, metadata={"min": 1, "help": (
        "Keep each converted conv's intrinsic count a multiple of this (the nearest; 8 or 4 for ONNX Runtime "
        "on CPU, which runs convs with other channel counts markedly slower). 1: ceil(n/s) as it is.")})

    def __post_init__(self):
        # torch-free at import (the CLI reads these fields for --help): the registries are read here
        from .init.registry import INITS
        from .layers import CHEAP_OPS  # late, as INITS

        try:
            object.__setattr__(self, "ratio", check_ratio(self.ratio))  # 2.0 -> 2
        except ValueError as e:
            raise GhostifyError(str(e)) from None
        d = self.dw_size
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1 or d % 2 == 0):
            raise GhostifyError(f"dw_size must be an odd integer >= 1 (got {d!r}); try --dw-size 3")
        r = self.round_to
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise GhostifyError(f"round_to must be an integer >= 1 (got {r!r}); try --round-to 8")
        if self.init not in INITS:
            raise GhostifyError(f"unknown init {self.init!r}; choose one of {sorted(INITS)}")
        if self.cheap is not None and self.cheap not in CHEAP_OPS and self.cheap != "auto":
            raise GhostifyError(f"unknown cheap op {self.cheap!r}; choose one of {sorted(CHEAP_OPS) + ['auto']}")
        if self.cheap == "auto" and not getattr(INITS[self.init], "chooses_cheap", False):
            raise GhostifyError(f"cheap='auto' is chosen per layer from calibration data; use it with --init calib "
                                f"(init {self.init!r} cannot choose)")

    def merged(self, override: dict[str, Any]) -> "LayerSpec":
        unknown = set(override) - {f.name for f in fields(self)}
        if unknown:
            raise GhostifyError(f"unknown layer setting(s) {sorted(unknown)}; valid: "
                                + ", ".join(f.name for f in fields(self)))
        return replace(self, **override)

    def ratio_for(self, out_channels: int, ratio=None) -> int | float:
        """The ratio a conv with ``out_channels`` outputs gets from ``ratio`` (default: this spec's), rounded to
        keep a multiple of ``round_to`` intrinsic maps (:func:`ghostify.ratio.rounded_ratio`).

        Example:
            >>> LayerSpec(ratio=3, round_to=8).ratio_for(16), LayerSpec(ratio=3).ratio_for(16)
            (2, 3)
        """
        ratio = self.ratio if ratio is None else ratio
        return rounded_ratio(out_channels, ratio, self.round_to) if self.round_to > 1 else ratio

    def resolved(self) -> "LayerSpec":
        """This spec with ``cheap`` and ``dw_size`` made concrete (:func:`default_cheap`).

        Example:
            >>> LayerSpec(init="calib").resolved()
            LayerSpec(ratio=2, dw_size=1, init='calib', cheap='mix')
        """
        cheap, dw_size = default_cheap(self.init, self.cheap, self.dw_size)
        return replace(self, cheap=cheap, dw_size=dw_size)


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

    def with_global(self, **changes) -> "GhostConfig":
        """A copy whose global spec has ``changes`` (e.g. ``ratio=4``); ``self`` is not changed.

        Example:
            >>> GhostConfig().exclude("fc").with_global(ratio=4).global_spec.ratio
            4
        """
        out = copy.deepcopy(self)
        out.global_spec = replace(out.global_spec, **changes)
        return out

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
        """The concrete spec for layer ``name`` (``module_types``: the conv's class and parents'), or None to skip."""
        module_types = tuple(module_types)
        levels: list[dict | None] = []
        levels += [o for t, o in self.by_type if any(issubclass(mt, t) for mt in module_types)]
        levels += [o for p, o in self.by_glob if fnmatch.fnmatchcase(name, p)]
        if name in self.by_name:
            levels.append(self.by_name[name])
        spec: LayerSpec | None = self.global_spec
        for o in levels:
            spec = None if o is None else (spec or self.global_spec).merged(o)
        return spec and spec.resolved()

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

        from torch import nn  # late: this module is torch-free at import


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


def build_config(ratio: int = 2, dw_size: int | None = None, init: str = "copy", cheap: str | None = None,
                 include: Iterable[str] = (), exclude: Iterable[str] = (),
                 overrides: dict[Any, Any] | None = None, config: GhostConfig | None = None, *,
                 round_to: int = 1) -> GhostConfig:
    """A :class:`GhostConfig` from the flat keyword form that ``convert`` and the CLI take.

    ``overrides`` maps a module type, a glob pattern or an exact name to a partial spec
    dict or ``None`` (skip).
    """
    cfg = copy.deepcopy(config) if config is not None else GhostConfig(LayerSpec(ratio, dw_size, init, cheap, round_to))
    cfg.include(*include).exclude(*exclude)
    for key, value in (overrides or {}).items():
        if isinstance(key, type):
            cfg.set_type(key, value)
        else:
            cfg.set(key, value)
    return cfg
