"""Fine-tuning recipes: a YAML file loaded into typed dataclasses, ``--set key=value`` overrides, validation.

A recipe has six sections (every key optional; the defaults below fine-tune on MNIST)::

    name: mnist_resnet20_r2
    seed: 0
    output_dir: runs/mnist_resnet20_r2
    model:      {name: checkpoints/resnet20_mnist.pt, weights: DEFAULT, kwargs: {}}
    conversion: {ratio: 2, init: calib, cheap: null, dw_size: null, calib_size: 512, include: [], exclude: []}
    data:       {train: mnist:train, val: mnist:test, root: null, image_size: null}
    train:      {epochs: 1, batch_size: 128, amp: auto, clip_grad_norm: null, ema_decay: null, freeze_bn: false}
    optim:      {name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}
    schedule:   {name: cosine, warmup_steps: 0}
    loss:       {temperature: 4.0, alpha: 0.5, feature_weight: 0.0, teacher: true}

Unknown keys and bad values raise a one-line :class:`~ghostify.errors.GhostifyError` that
names the key and the valid choices. This module does not import torch.

Example:
    >>> cfg = from_dict({"train": {"epochs": 2}}, overrides=["optim.lr=0.05", "conversion.exclude=[layer1.*]"])
    >>> cfg.train.epochs, cfg.optim.lr, cfg.conversion.exclude
    (2.0, 0.05, ['layer1.*'])
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import GhostConfig, LayerSpec, build_config
from ..errors import GhostifyError
from .schema import build_section, coerce, type_hints, unknown_key

__all__ = ["Recipe", "ModelConfig", "ConversionConfig", "DataConfig", "TrainConfig", "OptimConfig",
           "ScheduleConfig", "LossConfig", "ghost_config", "load_recipe", "from_dict", "apply_override", "to_dict", "dump_yaml",
           "REQUIRED"]

REQUIRED = "???"  # a value the user must set (e.g. the path of a trained CIFAR checkpoint)


def _choices(*values: str, **meta) -> dict:
    return {"choices": values, **meta}


@dataclass
class ModelConfig:
    """The trained model: a torchvision name, ``package.module:callable`` or a checkpoint path."""

    name: str = "checkpoints/resnet20_mnist.pt"
    weights: str = "DEFAULT"  # DEFAULT, a weights enum name, none, or a state-dict / checkpoint file
    kwargs: dict = field(default_factory=dict)  # passed to the builder (module:callable or torchvision)


def _conversion_fields() -> list:
    """``LayerSpec``'s fields (name, type, default, checks) followed by the recipe's own conversion keys."""
    hints = typing.get_type_hints(LayerSpec)
    layer = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata)) for f in dataclasses.fields(LayerSpec)]
    return layer + [
        ("include", list, field(default_factory=list)),
        ("exclude", list, field(default_factory=list)),
        ("overrides", dict, field(default_factory=dict)),  # {glob or name: {ratio: 4, ...} or null (keep the conv)}
        ("scatter", bool, False),
        ("calib_data", str, "train"),  # "train": the training data without augmentation; or a data spec
        ("calib_size", int, field(default=512, metadata={"min": 1})),
        ("max_layer_error", Optional[float], field(default=None, metadata={"min": 0})),
    ]


# How the model is converted (see ghostify.convert): the layer settings are LayerSpec's own fields, so the
# recipe, the CLI and the Python API share one definition (ratio: integer >= 1 or fraction > 1; dw_size:
# odd, null = 1 for mix, else 3; init: a strategy in ghostify.INITS; cheap: a family in ghostify.CHEAP_OPS,
# null = mix for calib, else dw).
ConversionConfig = dataclasses.make_dataclass("ConversionConfig", _conversion_fields(),
                                              namespace={"__module__": __name__, "__doc__": (
                                                  "How the model is converted (see :func:`ghostify.convert`); "
                                                  "the layer settings are :class:`~ghostify.LayerSpec`'s fields.")})


def ghost_config(c) -> GhostConfig:
    """The :class:`~ghostify.GhostConfig` a recipe's ``conversion`` section describes."""
    return build_config(c.ratio, c.dw_size, c.init, c.cheap, c.include, c.exclude, c.overrides, round_to=c.round_to)


@dataclass
class DataConfig:
    """Training and validation data.

    ``train``/``val`` are data specs: ``mnist:train``, ``mnist:test``, ``cifar10:PATH`` (train
    split for ``train``, test split for ``val``), ``imagefolder:PATH`` (one subfolder per class),
    or any spec :func:`ghostify.resolve_data` knows (held in memory). ``{root}`` in a spec is
    replaced by ``root``.
    """

    train: str = "mnist:train"
    val: Optional[str] = "mnist:test"
    root: Optional[str] = None
    image_size: Optional[int] = field(default=None, metadata={"min": 1})  # imagefolder crop (default 224)
    augment: bool = True  # random crop + flip for cifar10 and imagefolder training data
    limit: Optional[int] = field(default=None, metadata={"min": 1})  # N training examples (first N; imagefolder: spread)
    val_limit: Optional[int] = field(default=None, metadata={"min": 1})
    workers: int = field(default=0, metadata={"min": 0})


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, regularisers, logging and checkpoints."""

    epochs: float = field(default=1.0, metadata={"min": 0})
    steps: Optional[int] = field(default=None, metadata={"min": 1})  # overrides epochs when set
    batch_size: int = field(default=128, metadata={"min": 1})  # global: split over the processes
    amp: str = field(default="auto", metadata=_choices("auto", "off", "bf16", "fp16"))  # CUDA only
    channels_last: str = field(default="auto", metadata=_choices("auto", "on", "off"))  # auto: on CUDA
    clip_grad_norm: Optional[float] = field(default=None, metadata={"min": 0})
    ema_decay: Optional[float] = field(default=None, metadata={"min": 0, "max": 1})
    freeze_bn: bool = False  # keep BN running statistics fixed (BN layers in eval mode)
    sync_bn: bool = False  # SyncBatchNorm under DDP
    log_every: int = field(default=10, metadata={"min": 1})
    checkpoint_every: Optional[int] = field(default=500, metadata={"min": 1})  # steps; also each epoch end
    eval_every_epoch: bool = True
    device: str = "auto"  # auto (cuda when available), cpu, cuda


@dataclass
class OptimConfig:
    name: str = field(default="sgd", metadata=_choices("sgd", "adamw"))
    lr: float = field(default=0.01, metadata={"min": 0})
    momentum: float = field(default=0.9, metadata={"min": 0})
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata={"min": 0})
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """Per-step learning-rate factor: linear warm-up, then cosine to ``min_lr`` / steps at ``milestones``."""

    name: str = field(default="cosine", metadata=_choices("cosine", "step", "constant"))
    warmup_steps: int = field(default=0, metadata={"min": 0})
    warmup_epochs: float = field(default=0.0, metadata={"min": 0})
    min_lr: float = field(default=0.0, metadata={"min": 0})  # as a fraction of optim.lr
    milestones: list = field(default_factory=list)  # epochs, for step
    gamma: float = field(default=0.1, metadata={"min": 0})


@dataclass
class LossConfig:
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) + feature_weight * feature loss``.

    The feature loss is the mean over converted layers of the relative squared error between
    the Ghost layer's output and the original conv's output. ``teacher: false`` trains on
    labels only (the from-scratch ablation).
    """

    temperature: float = field(default=4.0, metadata={"min": 0, "open": True})
    alpha: float = field(default=0.5, metadata={"min": 0, "max": 1})
    feature_weight: float = field(default=0.0, metadata={"min": 0})
    teacher: bool = True


@dataclass
class Recipe:
    name: str = field(default="finetune", metadata={"plain_name": True})  # the run folder is runs/NAME
    seed: int = 0
    output_dir: Optional[str] = None  # default runs/NAME
    model: ModelConfig = field(default_factory=ModelConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.name))

    def spec(self, text: str | None) -> str | None:
        """A data spec with ``{root}`` replaced by ``data.root`` (an error when that is unset)."""
        if text is None or "{root}" not in text:
            return text
        if not self.data.root:
            raise GhostifyError(f"the data spec '{text}' needs data.root: add --set data.root=PATH")
        return text.replace("{root}", str(self.data.root).rstrip("/"))


# -- loading ---------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides (``--set``), validate.

    Example:
        >>> cfg = load_recipe("recipes/mnist_resnet20_r2.yaml", ["train.epochs=2"])   # doctest: +SKIP
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
        raise GhostifyError(f"recipe '{path}' does not exist" + (f"; shipped recipes: {', '.join(shipped)}"
                                                                  if shipped else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise GhostifyError(f"recipe '{path}' is not valid YAML: {' '.join(first[:2])}") from None
    if not isinstance(data, dict):
        raise GhostifyError(f"recipe '{path}' must be a mapping of sections, not a {type(data).__name__}")
    data.setdefault("name", path.stem)
    return from_dict(data, overrides)


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated :class:`Recipe` from a nested dict, then ``key=value`` overrides."""
    cfg = build_section(Recipe, data, "")
    for text in overrides:
        apply_override(cfg, text)
    return cfg


def apply_override(cfg: Recipe, text: str) -> Recipe:
    """Set ``section.key=value`` in place; the value is read as YAML and coerced to the field's type.

    Example:
        >>> apply_override(Recipe(), "train.batch_size=64").train.batch_size
        64
    """
    import yaml

    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise GhostifyError(f"--set '{text}': expected KEY=VALUE, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            raise GhostifyError(unknown_key(part, prefix, names))
        f = names[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                if not isinstance(value, dict):
                    raise GhostifyError(f"--set {key}: '{key}' is a section; set one of its keys, e.g. "
                                        f"{key}.{dataclasses.fields(getattr(obj, part))[0].name}=...")
                value = build_section(type(getattr(obj, part)), {**to_dict(getattr(obj, part)), **value}, key)
            else:
                value = coerce(value, type_hints(type(obj))[part], f, key)
            setattr(obj, part, value)
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise GhostifyError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
    return cfg


def to_dict(cfg: Any) -> dict:
    """The recipe as plain nested dicts (YAML- and JSON-ready)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Recipe) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: Recipe, b: Recipe) -> list[str]:
    """The dotted keys whose values differ between two recipes."""
    out = []

    def walk(x, y, prefix):
        for k in x:
            if isinstance(x[k], dict) and isinstance(y.get(k), dict) and k != "kwargs" and k != "overrides":
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x[k] != y.get(k):
                out.append(f"{prefix}{k}")

    walk(to_dict(a), to_dict(b), "")
    return out


def check_registries(cfg: Recipe) -> None:
    """Check names that live in ghostify's registries (imports torch): cheap op, init strategy."""
    from ..init.registry import INITS  # late: the registries import torch, this module does not
    from ..layers import CHEAP_OPS  # late, as INITS

    c = cfg.conversion
    if c.cheap is not None and c.cheap not in CHEAP_OPS and c.cheap != "auto":
        raise GhostifyError(f"recipe key 'conversion.cheap': '{c.cheap}' is not one of {', '.join(sorted(CHEAP_OPS))}")
    if c.init not in INITS:
        raise GhostifyError(f"recipe key 'conversion.init': '{c.init}' is not one of {', '.join(sorted(INITS))}")
    if cfg.loss.teacher is False and cfg.loss.alpha < 1:
        raise GhostifyError("recipe key 'loss.alpha': with loss.teacher=false there is no KD term; set loss.alpha=1")
    if cfg.model.weights == REQUIRED or cfg.model.name == REQUIRED:
        key = "model.weights" if cfg.model.weights == REQUIRED else "model.name"
        raise GhostifyError(f"recipe key '{key}' must be set: add --set {key}=PATH (a trained checkpoint of the "
                            "model to convert)")
