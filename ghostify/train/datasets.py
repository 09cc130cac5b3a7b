"""Training data: map-style datasets with seeded augmentation (exact resumes), reusing the zoo's readers."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from ..augment import Items
from ..errors import GhostifyError
from ..zoo.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, resolve_data
from ..zoo.sources import imagefolder_dataset, read_cifar10, spread

__all__ = ["crop_flip", "build_dataset", "SkipSampler"]


def crop_flip(pad: int):
    def augment(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        x = F.pad(x, (pad, pad, pad, pad))[:, i:i + h, j:j + w]
        return x.flip(-1) if torch.rand(()) < 0.5 else x

    return augment


def build_dataset(spec: str, *, split: str, augment: bool, image_size: int | None = None, limit: int | None = None,
                  seed: int = 0) -> Items:
    """A map-style dataset of ``(x, y)`` for training (``split="train"``) or validation (``"val"``).

    ``cifar10:PATH`` reads the train or test split by ``split`` (random crop with 4 padding
    and flip when ``augment``); ``imagefolder:PATH`` reads one subfolder per class (random
    resized crop and flip when ``augment``, else resize and centre crop; ``image_size``
    default 224; ``limit`` images spread evenly over the folder, so over its classes); any other
    spec goes through :func:`ghostify.resolve_data` and is held in memory.
    """
    name, _, arg = spec.partition(":")
    if name == "cifar10":
        x, y = read_cifar10(Path(arg).expanduser(), split)
        if limit:
            x, y = x[:limit], y[:limit]
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD))
        get = lambda i: ((x[i].float() / 255 - mean) / std, y[i])
        return Items(get, len(x), (3, 32, 32), crop_flip(4) if augment else None, seed)
    if name == "imagefolder":
        from torchvision import transforms as T

        size = image_size or 224
        path = Path(arg).expanduser()
        if not path.is_dir():
            raise GhostifyError(f"image folder '{arg}' does not exist; set data.root=PATH (for {spec!r}) or give "
                                "imagefolder:PATH with one subfolder of images per class")
        ds = imagefolder_dataset(path, size)
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if augment:  # the random crop replaces the resize; the seeded augmentation runs on the loaded image
            ds.transform = None
            crop = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
        idx = spread(len(ds), limit)  # not the first `limit`: those would be one class
        return Items(lambda i: ds[idx[i]], len(idx), (3, size, size), crop if augment else None, seed)
    src = resolve_data(spec, batch_size=4096, limit=limit)
    xs, ys = [], []
    for bx, by in src:
        if by is None:
            raise GhostifyError(f"the data {spec!r} has no labels; fine-tuning needs (x, y) pairs "
                                "(KD alone: keep the labels out with loss.alpha=0)")
        xs.append(bx)
        ys.append(by)
    x, y = torch.cat(xs), torch.cat(ys)
    return Items(lambda i: (x[i], y[i]), len(x), tuple(x.shape[1:]), None, seed)


class SkipSampler(Sampler):
    """The indices of ``base`` from position ``skip`` on (a resumed epoch)."""

    def __init__(self, base: Sampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return max(0, len(self.base) - self.skip)
