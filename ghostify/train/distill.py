"""Few-shot distillation repair: a converted model learns to match its original on a few hundred unlabelled
images, through the fine-tuning loop (its checkpoints, exact resumes, logs and progress bar).

The loss is the fine-tuning loop's, label-free: ``T^2 * KL(teacher_T || student_T)`` on the logits
plus ``feature_weight`` times the mean over Ghost layers of ``||s - t||^2 / ||t||^2`` between each
Ghost layer's output and the original conv's. The images are augmented per example (random
resized crops, flips, colour jitter) and a share of them mixed with another image (mixup,
cutmix): see :class:`~ghostify.augment.AugmentConfig`.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import GhostifyError
from ..zoo.data import IMAGENET_MEAN, IMAGENET_STD, resolve_data
from ..augment import AugmentConfig, Items, Mixed, unlabelled
from .distributed import setup_dist
from .loss import converted_names
from .recipe import Recipe, diff, to_dict
from .rundir import check_run_dir
from .schema import build_section
from .session import Session
from .state import load_checkpoint

__all__ = ["distill", "DistillRecipe", "distill_dataset"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class DistillRecipe(Recipe):
    """A fine-tuning recipe plus how :func:`distill` augments its images (saved in the run and its checkpoints)."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)


def _read_folder(path: Path, size: int, limit: int | None) -> torch.Tensor:
    """Every image under ``path`` (class subfolders or not), shorter side ``size * 8 / 7``, centre-cropped
    square, ImageNet-normalised: random resized crops of ``size`` are taken from these."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    if not path.is_dir():
        raise GhostifyError(f"image folder '{path}' does not exist; write imagefolder:PATH with PATH a folder of "
                            "images (class subfolders are allowed, not needed)")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())[:limit]
    if not files:
        raise GhostifyError(f"image folder '{path}' holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    side = round(size * 8 / 7)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    out = []
    for f in files:
        with Image.open(f) as im:
            img = TF.pil_to_tensor(im.convert("RGB"))
        img = TF.center_crop(TF.resize(img, side, antialias=True), [side, side])
        out.append((img.float() / 255 - mean) / std)
    return torch.stack(out)


def distill_dataset(data: Any, *, augment: AugmentConfig | None, image_size: int | None = None,
                    limit: int | None = None, seed: int = 0, model: nn.Module | None = None,
                    input_size: tuple[int, ...] | None = None) -> Items | Mixed:
    """The examples of ``data`` held in memory, labels dropped, augmented per example (``augment=None``: as is).

    ``data`` is a spec (``photos:calib``, ``imagefolder:PATH`` with or without class folders,
    ``synthetic`` made from ``model``, ``mnist-sample``, ...) or an iterable of batches, as
    :func:`ghostify.resolve_data` takes. ``image_size``: the crop size (default: the examples' own).

    Example:
        >>> ds = distill_dataset(torch.randn(8, 3, 32, 32), augment=AugmentConfig(), image_size=24)
        >>> len(ds), tuple(ds[0][0].shape)
        (8, (3, 24, 24))
    """
    if isinstance(data, str) and data.partition(":")[0] == "imagefolder":
        x = _read_folder(Path(data.partition(":")[2]).expanduser(), image_size or 224, limit)
    else:
        src = resolve_data(data, batch_size=256, limit=limit, model=model, input_size=input_size)
        x = torch.cat([bx for bx, _ in src]) if len(src) else torch.empty(0)
    if len(x) == 0:
        raise GhostifyError(f"the data {data if isinstance(data, str) else type(data).__name__!r} holds no examples")
    size = image_size or x.shape[-1]
    if augment is None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return unlabelled(x, augment, size, seed)  # label-free: the loop's CE term is off (alpha = 0)


class DistillSession(Session):
    """A :class:`~ghostify.train.session.Session` whose student, teacher and data are given, not built."""

    def __init__(self, cfg, run_dir, dist, ckpt, force, progress, on_step, given: dict):
        super().__init__(cfg, run_dir, dist, ckpt, force, progress, on_step)
        self.given = given

    def _data(self):
        g, cfg = self.given, self.cfg
        common = {"image_size": cfg.data.image_size, "model": g["teacher"], "input_size": g["input_size"]}
        self.train_set = distill_dataset(g["data"], augment=cfg.augment, limit=cfg.data.limit, seed=cfg.seed,
                                         **common)
        self.val_set = (distill_dataset(g["val_data"], augment=None, limit=cfg.data.val_limit, **common)
                        if g["val_data"] is not None else None)
        self.input_size = self.train_set.input_size
        self._sampling()

    def _models(self):
        g, dev = self.given, self.dist.device
        self.teacher = copy.deepcopy(g["teacher"]).to(dev).eval().requires_grad_(False)
        self.student = (g["student"] if g["inplace"] else copy.deepcopy(g["student"])).to(dev)
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        self._converted_layers()

    def _evaluate(self, model, baseline=True) -> dict:
        res = super()._evaluate(model, baseline)  # the labels are placeholders: only agreement counts
        res = {k: v for k, v in res.items() if k not in ("top1", "top5")}
        return res if "agree_top1" in res else {}


def _recipe(**o) -> DistillRecipe:
    data = {"name": o["name"], "seed": o["seed"],
            "data": {"train": o["data"] if isinstance(o["data"], str) else "<iterable>",
                     "val": o["val_data"] if isinstance(o["val_data"], str) or o["val_data"] is None else "<iterable>",
                     "image_size": o["image_size"], "limit": o["limit"], "val_limit": o["val_limit"]},
            "train": {"steps": o["steps"], "batch_size": o["batch_size"], "freeze_bn": o["freeze_bn"], "amp": "off",
                      "log_every": o["log_every"], "checkpoint_every": o["checkpoint_every"],
                      "eval_every_epoch": False, "device": o["device"]},
            "optim": {"name": "adamw", "lr": o["lr"], "weight_decay": 0.0},
            "schedule": {"name": "cosine", "warmup_steps": o["warmup_steps"]},
            "loss": {"temperature": o["temperature"], "alpha": 0.0, "feature_weight": o["feature_weight"]},
            "augment": to_dict(o["augment"]) if isinstance(o["augment"], AugmentConfig) else (o["augment"] or {})}
    return build_section(DistillRecipe, data, "")


def distill(student: nn.Module, teacher: nn.Module, data: Any, *, steps: int = 200, batch_size: int = 16,
            lr: float = 3e-5, temperature: float = 2.0, feature_weight: float = 1.0,
            augment: AugmentConfig | dict | None = None, image_size: int | None = None, limit: int | None = 256,
            freeze_bn: bool = True, warmup_steps: int = 10, val_data: Any = None, val_limit: int | None = None,
            input_size: tuple[int, ...] | None = None, run_dir: str | os.PathLike | None = None,
            resume: str | os.PathLike | None = None, force: bool = False, inplace: bool = False, seed: int = 0,
            device: str = "auto", progress: bool = True, log_every: int = 10, checkpoint_every: int | None = 100,
            on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Repair a converted model by distilling its original into it on a few unlabelled images.

    Each step draws ``batch_size`` augmented images (see :class:`AugmentConfig`; ``augment=None``
    uses its defaults, ``{"mix": 0}`` turns mixing off) and lowers ``T^2 KL(teacher_T ||
    student_T) + feature_weight * (per-Ghost-layer relative squared error to the teacher's conv
    output)`` with AdamW at ``lr`` on a cosine schedule after ``warmup_steps`` of linear warm-up,
    BN statistics frozen (``freeze_bn``). The defaults are gentle on purpose: on MobileNetV2 at
    ratio 2, ``lr=1e-4`` without warm-up cost two thirds of the calibrated agreement in the first
    50 steps; 3e-5 with 10 warm-up steps raised it (docs/distillation.md).

    Args:
        student: a model from :func:`ghostify.convert` or :func:`ghostify.load`; not modified
            unless ``inplace=True``.
        teacher: the original model (its convs have the Ghost layers' names).
        data: a spec (``photos:calib``, ``imagefolder:PATH``, ``synthetic``, ``mnist-sample``, ...)
            or an iterable of batches; labels are ignored. ``limit``: at most this many images.
        image_size: train on crops of this size (default: the images' own size).
        val_data: held-out images: agreement with the teacher before and after, in the run's report.
        input_size: one example's shape, for ``synthetic`` data (made from the teacher).
        run_dir: a folder for the run's logs, checkpoints and report (default: a temporary one).
        resume: a ``last.ckpt`` of an earlier run with the same settings: continue it at its step;
            the result equals the uninterrupted run's. ``force``: replace an existing ``run_dir``.
        on_step: called as ``on_step(step, loss)`` after every step.

    Returns:
        The distilled model (eval mode), savable with :func:`ghostify.save`.

    Example:
        >>> import torch, ghostify
        >>> from ghostify.reference import resnet20
        >>> net = resnet20().eval()                                    # MNIST-sized; load trained weights here
        >>> calib = ghostify.resolve_data("mnist-sample:calib", limit=64)
        >>> ghost = ghostify.convert(net, ratio=2, init="calib", calib_data=calib)
        >>> fixed = ghostify.distill(ghost, net, "mnist-sample:calib", steps=2, limit=64, progress=False)
        >>> fixed(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    converted_names(student)  # refuses a model ghostify did not make
    cfg = _recipe(name="distill", seed=seed, data=data, val_data=val_data, image_size=image_size, limit=limit,
                  val_limit=val_limit, steps=steps, batch_size=batch_size, freeze_bn=freeze_bn, log_every=log_every,
                  checkpoint_every=checkpoint_every, device=device, lr=lr, warmup_steps=warmup_steps,
                  temperature=temperature, feature_weight=feature_weight, augment=augment)
    ckpt, tmp = None, None
    if resume is not None:
        ckpt = load_checkpoint(Path(resume))
        changed = [k for k in diff(build_section(DistillRecipe, ckpt["recipe"], ""), cfg)
                   if k not in ("output_dir", "name")]
        if changed:
            raise GhostifyError(f"--resume continues the run in '{Path(resume).parent}' with its own settings; "
                                f"these differ: {', '.join(changed)}. Pass the run's settings, or start a new run")
        run_dir = Path(resume).parent
    elif run_dir is None:
        tmp = tempfile.mkdtemp(prefix="ghostify-distill-")
        run_dir = Path(tmp) / "run"
    else:
        check_run_dir(Path(run_dir), force, None)
    given = {"student": student, "teacher": teacher, "data": data, "val_data": val_data, "inplace": inplace,
             "input_size": input_size}
    dist = setup_dist(cfg.train.device)
    try:
        session = DistillSession(cfg, Path(run_dir), dist, ckpt, force, progress, on_step, given)
        result = session.run()
        if result.report and result.report["before"]:
            b, a = result.report["before"], result.report["after"]
            print(f"agreement with the teacher on the held-out data: top-1 {b['agree_top1']:.4f} -> "
                  f"{a['agree_top1']:.4f}, top-5 {b['agree_top5']:.4f} -> {a['agree_top5']:.4f}", file=sys.stderr)
        return result.model
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
