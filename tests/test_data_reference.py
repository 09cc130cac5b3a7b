"""Data sources (``ghostify.zoo.data``) and the MNIST reference models (``ghostify.reference``)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx

import ghostify
from ghostify.zoo.data import MNIST_MEAN, MNIST_STD, SOURCES, find_mnist, register_source, resolve_data
from ghostify.errors import GhostifyError
from benchmarks.train_reference import save_checkpoint, train
from ghostify import evaluate
from ghostify.reference import resnet20, vgg_small


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two threads wait on each other (a step took 50x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- MNIST -----------------------------------------------------------------------------------------


@pytest.mark.mnist
def test_mnist_test_split_shapes_labels_and_normalisation():
    src = resolve_data("mnist", batch_size=500)
    assert (src.name, src.input_size, src.num_examples, len(src)) == ("mnist:test", (1, 28, 28), 10000, 20)
    xs, ys = zip(*src)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.long and y[:5].tolist() == [7, 2, 1, 0, 4]  # the canonical first test labels
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # normalised with the training set's statistics: the test set comes out near mean 0, std 1
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.1
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)


@pytest.mark.mnist
def test_mnist_train_limit_and_seeded_shuffle():
    src = resolve_data("mnist:train", limit=300, batch_size=128, shuffle=True, seed=1)
    assert (src.num_examples, len(src)) == (300, 3)
    first, second = [torch.cat([y for _, y in src]) for _ in range(2)]
    assert [len(x) for x, _ in src] == [128, 128, 44]
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)  # reshuffled
    again = resolve_data("mnist:train", limit=300, batch_size=128, shuffle=True, seed=1)
    assert torch.equal(torch.cat([y for _, y in again]), first)  # same seed, same order


def _write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    """LeCun's idx format: big-endian magic (2051 images, 2049 labels), the dims, then the bytes."""
    prefix = "train" if split == "train" else "t10k"
    for stem, magic, arr in ((f"{prefix}-images-idx3-ubyte", 2051, images),
                             (f"{prefix}-labels-idx1-ubyte", 2049, labels)):
        data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
        (folder / (stem + ".gz" * gz)).write_bytes(gzip.compress(data) if gz else data)


def test_mnist_search_order_root_env_cache_and_torchvision_layout(tmp_path, monkeypatch):
    """root= beats $GHOSTIFY_MNIST_ROOT beats the user cache; .gz or unpacked, flat or MNIST/raw/; no shared/ path."""
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    places = ("root", "env/MNIST/raw", "cache", "shared/data/mnist", "repo/shared/data/mnist")
    for i, place in enumerate(places):
        (tmp_path / place).mkdir(parents=True)
        _write_idx(tmp_path / place, "test", images, np.full(3, i, np.uint8), gz=i != 1)  # torchvision unpacks
    monkeypatch.setattr("ghostify.zoo.sources.MNIST_CACHE", tmp_path / "cache")
    monkeypatch.setenv("GHOSTIFY_MNIST_ROOT", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path / "repo")
    labels = lambda **kw: next(iter(resolve_data("mnist:test", **kw)))[1].tolist()
    assert labels(root=tmp_path / "root") == [0, 0, 0]
    assert labels() == [1, 1, 1]
    assert find_mnist("test")[0] == tmp_path / "env" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    monkeypatch.delenv("GHOSTIFY_MNIST_ROOT")
    assert labels() == [2, 2, 2]
    x, _ = next(iter(resolve_data("mnist:test", limit=2)))
    torch.testing.assert_close(x * MNIST_STD + MNIST_MEAN, torch.from_numpy(images[:2, None]).float() / 255)
    monkeypatch.setattr("ghostify.zoo.sources.MNIST_CACHE", tmp_path / "empty")
    with pytest.raises(GhostifyError, match=r"download was not tried .*GHOSTIFY_MNIST_ROOT=FOLDER"):
        find_mnist("test", download=False)  # ../shared/data/mnist and ./shared/data/mnist are not looked in


def test_mnist_truncated_file_is_a_clear_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") * 3 + b"\0" * 7)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\0" * 10)
    with pytest.raises(GhostifyError, match="truncated"):
        resolve_data("mnist:test", root=tmp_path)


def test_mnist_missing_everywhere_says_where_it_looked(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("ghostify.zoo.sources._mnist_dirs", lambda root: [tmp_path / "a", tmp_path / "cache"])
    monkeypatch.setattr("ghostify.zoo.sources.MNIST_CACHE", tmp_path / "cache")
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(GhostifyError, match=r"looked in .*a, .*cache .*no network.*GHOSTIFY_MNIST_ROOT"):
        resolve_data("mnist:train")


def test_unknown_mnist_split():
    with pytest.raises(GhostifyError, match="mnist:train or mnist:test"):
        resolve_data("mnist:val")


# -- iterables, errors, registry --------------------------------------------------------------------


def test_iterable_of_bare_tensors_gives_unlabelled_batches():
    src = resolve_data([torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)], limit=6)
    batches = list(src)
    assert (src.input_size, src.num_examples, len(src)) == ((3, 8, 8), 6, 2)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(y is None for _, y in batches)


def test_iterable_of_pairs_and_dataloader_and_generator():
    pairs = [(torch.randn(2, 1, 5, 5), [0, 1]), [torch.randn(2, 1, 5, 5), torch.tensor([2, 3], dtype=torch.int32)]]
    ys = [y for _, y in resolve_data(pairs)]
    assert all(y.dtype == torch.long for y in ys) and torch.cat(ys).tolist() == [0, 1, 2, 3]

    dataset = torch.utils.data.TensorDataset(torch.randn(10, 1, 5, 5), torch.arange(10))
    src = resolve_data(torch.utils.data.DataLoader(dataset, batch_size=4), limit=5)
    assert (src.num_examples, len(src), src.name) == (5, 2, "DataLoader")
    assert torch.cat([y for _, y in src]).tolist() == [0, 1, 2, 3, 4]
    assert resolve_data(dataset, batch_size=3).num_examples == 10  # a map-style Dataset is batched for you

    gen = resolve_data(torch.randn(3, 1, 5, 5) for _ in range(2))  # one pass, nothing lost to the peek
    assert gen.input_size == (1, 5, 5) and sum(len(x) for x, _ in gen) == 6


def test_bad_items_and_unknown_spec_are_clear_errors(tmp_path):
    with pytest.raises(GhostifyError, match="batch 0 is a str"):
        list(resolve_data(["not a tensor"]))
    with pytest.raises(GhostifyError, match=r"unknown data source 'imagenet'.*mnist\[:test\|:train\].*imagefolder:PATH"):
        resolve_data("imagenet")
    with pytest.raises(GhostifyError, match=f"imagefolder:{tmp_path}"):  # a bare folder: suggest the spec
        resolve_data(str(tmp_path))
    missing = tmp_path / "no-such-folder"
    with pytest.raises(GhostifyError, match=f"image folder '{missing}' does not exist"):
        resolve_data(f"imagefolder:{missing}")
    with pytest.raises(GhostifyError, match="cifar-10-batches-py"):
        resolve_data(f"cifar10:{missing}")
    with pytest.raises(GhostifyError, match="limit"):
        resolve_data([torch.zeros(1, 1, 2, 2)], limit=0)


def test_imagefolder_reads_a_class_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (300, 260), (200, 10, 10)).save(tmp_path / cls / "a.png")
    src = resolve_data(f"imagefolder:{tmp_path}", batch_size=2)
    (x, y), = list(src)
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1] and src.num_examples == 2


def test_a_limit_on_an_image_folder_takes_every_class(fake_imagenet, tmp_path):
    from ghostify.train.datasets import build_dataset

    root = fake_imagenet(tmp_path, classes=3, per_class=4, side=8)  # 12 images, listed class by class
    src = resolve_data(f"imagefolder:{root / 'train'}", batch_size=16, limit=6)
    (x, y), = list(src)
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and src.num_examples == 6  # images 0, 2, 4, 6, 8, 10
    ds = build_dataset(f"imagefolder:{root / 'train'}", split="train", augment=False, limit=3)
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 2]
    torch.testing.assert_close(ds[1][0], x[2])  # image 4: the first of class 1, same preprocessing


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_source("mnist")(lambda arg, **kw: None)
    assert {"mnist", "imagefolder", "cifar10"} <= set(SOURCES)


# -- reference models ------------------------------------------------------------------------------


@pytest.mark.parametrize("build, n_convs", [(resnet20, 21), (vgg_small, 6)])
def test_reference_models_trace_and_convert(build, n_convs):
    model = build().eval()
    x = torch.randn(2, 1, 28, 28)
    gm = fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    ghost = ghostify.convert(model)
    entries = ghost.ghostify_info.plan.entries
    assert len(entries) == n_convs and ghost.ghostify_info.mode == "fx"
    skipped = [e.name for e in entries if e.action == "skip"]
    assert skipped == [entries[0].name] and entries[0].name in ("conv1", "features.0")  # only the stem
    assert ghost(x).shape == (2, 10)
    assert ghost.ghostify_arch["target"] == f"ghostify.reference:{build.__name__}"


def test_resnet20_shape():
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == 272_186  # He et al. (2016): 0.27 M
    assert [type(b.downsample).__name__ for b in (model.layer1[0], model.layer2[0], model.layer3[0])] == \
        ["Identity", "Sequential", "Sequential"]


def test_checkpoint_round_trips_through_get_model(tmp_path):
    model = vgg_small().eval()
    path = save_checkpoint(model, tmp_path / "ck" / "v.pt", name="vgg_small_mnist", metrics={"test_acc": 0.5})
    loaded = ghostify.get_model(str(path))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.ghostify_arch["name"] == "vgg_small_mnist" and loaded.ghostify_arch["input_size"] == [1, 1, 28, 28]
    assert torch.load(path, weights_only=True)["metrics"] == {"test_acc": 0.5}
    with pytest.raises(GhostifyError, match="--force"):
        save_checkpoint(model, path)
    save_checkpoint(model, path, force=True)
    assert [p.name for p in path.parent.iterdir()] == ["v.pt"]  # no temp file left behind


def test_cli_refuses_to_overwrite(tmp_path):
    from benchmarks.train_reference import main

    out = tmp_path / "x.pt"
    out.write_bytes(b"")
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(["--arch", "vgg_small", "--epochs", "1", "-o", str(out)])


def test_training_a_few_steps_reduces_the_loss_and_evaluate_restores_mode():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 12, 12, generator=gen)  # small inputs keep this fast; the nets pool globally
    y = torch.arange(32) % 4
    x[:, :, :4] += y.view(-1, 1, 1, 1).float()  # a learnable signal
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    model = vgg_small(num_classes=4)
    losses = train(model, data, epochs=3, lr=0.05, schedule="cosine", progress=False, device="cpu")
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < 0.7 * losses[0]
    model.train()
    assert 0.0 <= evaluate(model, data, progress=False)["top1"] <= 1.0 and model.training
    assert "top1" not in evaluate(model, [x], progress=False)  # no labels, no accuracy


def test_mnist_sample_splits_are_disjoint_and_offline():
    calib = ghostify.resolve_data("mnist-sample:calib", batch_size=1000)
    held = ghostify.resolve_data("mnist-sample:heldout", batch_size=5000)
    xc = torch.cat([x for x, _ in calib])
    xh, yh = next(iter(held))
    assert xc.shape == (512, 1, 28, 28) and xh.shape == (4488, 1, 28, 28)
    assert yh.bincount().tolist() != [0] * 10 and set(yh.tolist()) == set(range(10))
    rows = {r.numpy().tobytes() for r in xc}
    assert not any(r.numpy().tobytes() in rows for r in xh)  # no digit in both
    # normalised like the mnist source: background pixels at -mean/std
    assert xc.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    with pytest.raises(ghostify.GhostifyError, match="mnist-sample:calib"):
        ghostify.resolve_data("mnist-sample:train")
