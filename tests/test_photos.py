"""The ``photos`` data source: packaged photographs as 224x224 crops, split by whole photo."""
import numpy as np
import pytest
import torch

from ghostify.zoo import photos as data
from ghostify.zoo.data import resolve_data
from ghostify.errors import GhostifyError

BUILTIN = ("astronaut", "chelsea", "china", "coffee", "flower", "hubble_deep_field", "motorcycle_left", "rocket")
needs_packages = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("sklearn", "skimage")),
    reason="the photos source's packaged photos need scikit-learn and scikit-image (pip install scikit-learn "
           "scikit-image)")


@pytest.fixture(autouse=True)
def only_packaged(monkeypatch):
    """No wallpaper folders or $GHOSTIFY_PHOTOS_DIR: the tests see the packaged photos only."""
    monkeypatch.setattr(data, "PHOTOS_DIRS", ())
    monkeypatch.delenv("GHOSTIFY_PHOTOS_DIR", raising=False)


def crops(spec, **kw):
    src = resolve_data(spec, **kw)
    batches = list(src)
    assert all(y is None for _, y in batches)
    return src, torch.cat([x for x, _ in batches])


@needs_packages
def test_split_by_whole_photo():
    calib, heldout, all_ = (resolve_data(f"photos:{p}") for p in ("calib", "heldout", "all"))
    assert all_.photos == BUILTIN and resolve_data("photos").photos == BUILTIN
    assert heldout.photos == ("chelsea", "flower", "rocket")  # sorted by name, every 3rd from the 2nd
    assert not set(calib.photos) & set(heldout.photos)
    assert sorted(calib.photos + heldout.photos) == list(BUILTIN)
    assert (calib.num_examples, heldout.num_examples, all_.num_examples) == (5 * 16, 3 * 16, 8 * 16)


@needs_packages
def test_crops_shape_finite_deterministic():
    src, x = crops("photos:heldout", batch_size=20)
    assert src.input_size == (3, 224, 224) and len(src) == 3
    assert x.shape == (48, 3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert -3 < x.mean() < 3 and x.std() > 0.3  # ImageNet-normalised, not constant
    assert not torch.equal(x[0], x[1])  # different crops of one photo
    assert torch.equal(x, crops("photos:heldout", batch_size=7)[1])
    assert not torch.equal(x, crops("photos:heldout", seed=1)[1])


@needs_packages
def test_limit_spreads_crops_over_photos():
    src, x = crops("photos:heldout", limit=10)  # 3 photos: 3 + 3 + 4 crops ((i+1)*10//3 - i*10//3)
    assert src.num_examples == 10 and x.shape[0] == 10 and src.photos == ("chelsea", "flower", "rocket")
    _, full = crops("photos:heldout")
    # each photo's first crops
    assert torch.equal(x[:3], full[:3]) and torch.equal(x[3:6], full[16:19]) and torch.equal(x[6:], full[32:36])
    src, x = crops("photos:heldout", limit=2)  # fewer crops than photos: one of each of 2 evenly spaced photos
    assert src.photos == ("flower", "rocket") and torch.equal(x, full[[16, 32]])
    src, x = crops("photos:calib", limit=3)  # 5 photos: the 2nd, 4th and 5th
    assert x.shape[0] == 3 and src.photos == ("china", "hubble_deep_field", "motorcycle_left")


def test_the_asset_cache_is_a_photo_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data._assets_photos() == str(tmp_path / "ghostify" / "assets" / "photos")
    monkeypatch.undo()
    assert data.PHOTOS_DIRS[-1] == data._assets_photos()  # searched after the wallpaper folders


def test_folder_photos_and_errors(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(data, "_builtin_photos", lambda: [])
    with pytest.raises(GhostifyError, match="GHOSTIFY_PHOTOS_DIR"):
        resolve_data("photos:calib")
    rng = np.random.default_rng(0)
    img = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for name in ("a.jpg", "b.JPEG", "c.jpg", "sub/d.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        img(300, 400).save(tmp_path / name)
    img(100, 100).save(tmp_path / "e.png")  # not a JPEG or WebP: ignored
    img(240, 320).save(tmp_path / "sub" / "w.webp")
    images = tmp_path / "Wall" / "contents" / "images"  # a wallpaper package: one photo
    images.mkdir(parents=True)
    img(600, 800).save(images / "800x600.jpg")
    img(300, 400).save(images / "400x300.jpg")
    img(60, 80).save(tmp_path / "Wall" / "contents" / "screenshot.jpg")
    monkeypatch.setenv("GHOSTIFY_PHOTOS_DIR", str(tmp_path))
    src, x = crops("photos:all", limit=10)
    assert src.photos == ("Wall", "a.jpg", "b.JPEG", "c.jpg", "sub/d.jpg", "sub/w.webp")
    assert x.shape == (10, 3, 224, 224)
    assert resolve_data("photos:heldout").photos == ("a.jpg", "sub/d.jpg")
    again = resolve_data("photos:all", root=tmp_path / "sub").photos  # root first; the same file twice: once
    assert again == ("Wall", "a.jpg", "b.JPEG", "c.jpg", "d.jpg", "w.webp")
    with pytest.raises(GhostifyError, match="photos:heldout"):
        resolve_data("photos:test")
    (tmp_path / "f.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(GhostifyError, match="f.jpg"):
        resolve_data("photos:all")
