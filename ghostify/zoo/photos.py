"""The ``photos`` data source: crops of natural photographs (scikit-learn and scikit-image samples, Debian's
wallpapers, the benchmark assets), split by whole photo into ``calib`` and ``heldout``."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import GhostifyError
from .datasource import IMAGENET_MEAN, IMAGENET_STD, DataSource, register_source, tensor_source

__all__ = ["PHOTOS_DIRS"]


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
    src = tensor_source(f"photos:{part}", x, None, (3, _CROP, _CROP), batch_size, shuffle, seed, normalise)
    src.photos = tuple(name for name, _, _ in chosen)
    return src
