"""Augmentation that makes a few images go far: random resized crops, flips, colour jitter, and mixing
between examples (mixup, cutmix), on tensors, on the CPU, seeded per example so that resumes are exact.
The few-shot distillation trains on it (``ghostify.distill``) and the calibrated init fits on it
(``convert(..., calib_augment=N)``: :func:`augmented_views`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["AugmentConfig", "random_resized_crop", "colour_jitter", "mixup", "cutmix", "augmentation", "Items", "Mixed",
           "unlabelled", "augmented_views"]


@dataclass
class AugmentConfig:
    """How :func:`ghostify.distill` varies its few images (the ``augment`` section of its run's recipe).

    ``crop_scale``: the smallest area a random resized crop keeps (1: no crop); ``flip``: random
    horizontal flips; ``jitter``: brightness, contrast and saturation changes of up to this
    fraction (0: none); ``mix``: the share of examples mixed with another one, by cutmix with
    probability ``cutmix``, else by mixup; ``mix_alpha``: the mixing weight is Beta(alpha, alpha).
    """

    crop_scale: float = field(default=0.25, metadata={"min": 0, "max": 1, "open": True})
    flip: bool = True
    jitter: float = field(default=0.2, metadata={"min": 0, "max": 1})
    mix: float = field(default=0.5, metadata={"min": 0, "max": 1})
    cutmix: float = field(default=0.5, metadata={"min": 0, "max": 1})
    mix_alpha: float = field(default=1.0, metadata={"min": 0, "open": True})


def random_resized_crop(x: torch.Tensor, scale: float = 0.25, size: int | None = None) -> torch.Tensor:
    """A random crop of ``x`` (``(C, H, W)``) covering ``scale``-100 % of its area, aspect 3/4-4/3, resized to
    ``size`` (default: ``x``'s own size).

    Example:
        >>> random_resized_crop(torch.randn(3, 32, 40), 0.5, size=24).shape
        torch.Size([3, 24, 24])
    """
    h, w = x.shape[-2:]
    out = (size, size) if size else (h, w)
    u = torch.rand(4).tolist()
    area = h * w * (scale + (1 - scale) * u[0])
    aspect = math.exp(math.log(3 / 4) + u[1] * math.log(16 / 9))
    ch, cw = max(1, min(h, round(math.sqrt(area / aspect)))), max(1, min(w, round(math.sqrt(area * aspect))))
    top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
    crop = x[None, :, top:top + ch, left:left + cw]
    return F.interpolate(crop, size=out, mode="bilinear", align_corners=False, antialias=True)[0]


def colour_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Random brightness (a shift), contrast (about the image mean) and, for 3 channels, saturation (about
    each pixel's grey) of up to ``strength``; applied to normalised images, where all three are affine.

    Example:
        >>> x = torch.randn(3, 8, 8)
        >>> torch.equal(colour_jitter(x, 0.0), x)
        True
    """
    if strength <= 0:
        return x
    b, c, s = ((torch.rand(3) * 2 - 1) * strength).tolist()
    mean = x.mean()
    x = (x - mean) * (1 + c) + mean + b
    if x.shape[0] == 3:
        grey = x.mean(0, keepdim=True)
        x = grey + (x - grey) * (1 + s)
    return x


def mixup(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * a + (1 - lam) * b``.

    Example:
        >>> mixup(torch.ones(2), torch.zeros(2), 0.25)
        tensor([0.2500, 0.2500])
    """
    return lam * a + (1 - lam) * b


def cutmix(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """``a`` with a random box covering about ``1 - lam`` of its area taken from ``b`` (same shape).

    Example:
        >>> out = cutmix(torch.ones(1, 4, 4), torch.zeros(1, 4, 4), 0.75)
        >>> int(out.sum())                                   # a 2x2 box of b's zeros
        12
    """
    h, w = a.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = round(h * cut), round(w * cut)
    top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
    out = a.clone()
    out[..., top:top + ch, left:left + cw] = b[..., top:top + ch, left:left + cw]
    return out


def augmentation(cfg: AugmentConfig, size: int | None = None):
    """One example's crop, flip and jitter as ``cfg`` says (the mixing is :class:`Mixed`'s)."""

    def augment(x: torch.Tensor) -> torch.Tensor:
        if cfg.crop_scale < 1 or (size and size != x.shape[-1]):
            x = random_resized_crop(x, cfg.crop_scale, size)
        if cfg.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return colour_jitter(x, cfg.jitter)

    return augment


class Items(Dataset):
    """``(x, y)`` examples with an optional augmentation seeded by (seed, epoch, index), for exact resumes."""

    def __init__(self, get: Callable[[int], tuple], n: int, input_size: tuple[int, ...], augment=None, seed=0):
        self.get, self.n, self.input_size = get, n, tuple(input_size)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x, y = self.get(i)
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF_FFFF)
                x = self.augment(x)
        return x, y

    def set_epoch(self, epoch: int):
        self.epoch = epoch


class Mixed(Dataset):
    """``base``'s examples, a share ``cfg.mix`` of them mixed with another example of the same epoch.

    Which partner, the weight and mixup or cutmix are seeded by (seed, epoch, index), as
    :class:`Items` seeds its augmentation, so a resumed run sees the same inputs.
    """

    def __init__(self, base: Items, cfg: AugmentConfig):
        self.base, self.cfg, self.input_size = base, cfg, base.input_size

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch: int):
        self.base.set_epoch(epoch)

    def __getitem__(self, i):
        x, y = self.base[i]
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.base.seed, self.base.epoch, int(i), 1)) & 0x7FFF_FFFF_FFFF)
            if len(self.base) < 2 or torch.rand(()) >= cfg.mix:
                return x, y
            j = (int(i) + 1 + int(torch.randint(len(self.base) - 1, ()))) % len(self.base)  # any other example
            lam = float(torch.distributions.Beta(cfg.mix_alpha, cfg.mix_alpha).sample())
            mix = cutmix if torch.rand(()) < cfg.cutmix else mixup
            return mix(x, self.base[j][0], lam), y


def unlabelled(x: torch.Tensor, augment: AugmentConfig | None, size: int | None = None, seed: int = 0) -> Items | Mixed:
    """The images ``x`` (``(N, C, H, W)``) as label-free ``(image, 0)`` examples, each augmented as ``augment`` says
    (None: as they are) and cropped to ``size`` (default: their own size), seeded by (seed, epoch, index).

    Example:
        >>> ds = unlabelled(torch.randn(8, 3, 32, 32), AugmentConfig(), size=24)
        >>> len(ds), tuple(ds[0][0].shape)
        (8, (3, 24, 24))
    """
    label = torch.zeros((), dtype=torch.long)
    items = Items(lambda i: (x[i], label), len(x), (x.shape[1], size or x.shape[2], size or x.shape[3]),
                  augmentation(augment, size) if augment is not None else None, seed)
    return Mixed(items, augment) if augment is not None and augment.mix > 0 else items


def augmented_views(batches: list[torch.Tensor], count: int, *, augment: AugmentConfig | None = None, seed: int = 0,
                    batch_size: int = 32) -> list[torch.Tensor]:
    """``count`` augmented views of the images in ``batches`` (``(N, C, H, W)`` tensors), varied as
    ``ghostify.distill`` varies its images (``augment``, default :class:`AugmentConfig`: crops, flips, jitter,
    mixing): epoch after epoch, each epoch's examples in a seeded order, in batches of ``batch_size``.
    ``convert(..., calib_augment=N)`` calibrates on these beside the images themselves.

    Example:
        >>> views = augmented_views([torch.randn(8, 3, 32, 32)], 20, batch_size=16)
        >>> [tuple(v.shape) for v in views]
        [(16, 3, 32, 32), (4, 3, 32, 32)]
    """
    data = unlabelled(torch.cat(list(batches)), augment or AugmentConfig(), seed=seed)
    gen, views, epoch = torch.Generator().manual_seed(seed), [], 0
    while len(views) < count:
        data.set_epoch(epoch)
        views += [data[i][0] for i in torch.randperm(len(data), generator=gen).tolist()[:count - len(views)]]
        epoch += 1
    return [torch.stack(views[i:i + batch_size]) for i in range(0, count, batch_size)]
