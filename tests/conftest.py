"""Shared fixtures: tiny hand-checkable networks and deterministic seeding.

The networks are small enough that every MAC and parameter can be counted by hand
and every plan decision predicted from the code below.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn


def _have_full_mnist() -> bool:
    from ghostify.zoo.data import find_mnist
    from ghostify.errors import GhostifyError

    try:
        return all(find_mnist(split, download=False) for split in ("train", "test"))
    except GhostifyError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``mnist`` are skipped, with the reason, where the full MNIST is not at hand (never downloaded)."""
    marked = [item for item in items if item.get_closest_marker("mnist")]
    if marked and not _have_full_mnist():
        skip = pytest.mark.skip(reason="needs the full MNIST: set GHOSTIFY_MNIST_ROOT to a folder holding its four "
                                       "idx files (or copy them to ~/.cache/ghostify/mnist)")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


# -- tiny networks -------------------------------------------------------------------------------


class ChainNet(nn.Module):
    """stem conv-bn-relu, then two convertible convs, then pool/flatten/linear.

    Default plan (ratio 2): ``stem`` skipped (first conv on the input), ``conv1`` and
    ``conv2`` converted. ``conv1 -> bn1 -> relu -> conv2`` is foldable; ``conv2 -> bn2 ->
    relu -> pool -> flatten -> fc`` is foldable through the flatten into ``fc``.
    """

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 12, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(12)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ChainTrunk(ChainNet):
    """ChainNet without its head: returns conv2's block output, a feature map (no logits)."""

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        x = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))


class ResidualNet(nn.Module):
    """A stem and one basic residual block: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``.

    ``conv1``'s order folds into ``bn1``/``conv2``; ``conv2``'s output meets the residual add,
    so its order cannot be folded and it reorders at run time.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = self.relu(x + y)
        return self.head(x)


class UntraceableNet(nn.Module):
    """Data-dependent control flow (``if x.sum() > 0``): torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.stem(x))
        if x.sum() > 0:
            x = self.relu(self.conv1(x))
        else:
            x = -x
        return self.conv2(x)


class SharedConvNet(nn.Module):
    """``shared`` is called twice; converting it would change both call sites."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.last(x)


class OddLayersNet(nn.Module):
    """One conv per default-skip rule, after a stem.

    * ``dw``: groups=8 (depthwise) -> skipped
    * ``small``: out_channels=3 < 2*ratio -> skipped at ratio 2
    * ``reflect``: padding_mode='reflect' -> skipped
    * ``ok``: an ordinary conv -> converted
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.ok = nn.Conv2d(8, 8, 3, padding=1)
        self.small = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.small(self.ok(self.reflect(self.dw(self.stem(x)))))


class Block(nn.Module):
    """A container type, to test type-level overrides that match a conv's parents."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class BlocksNet(nn.Module):
    """stem, then ``body.0`` .. ``body.2`` (``Block``), then ``head`` (a plain conv)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(Block(16), Block(16), Block(16))
        self.head = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pytest.fixture
def chain_net():
    return ChainNet().eval()


@pytest.fixture
def chain_trunk():
    return ChainTrunk().eval()


@pytest.fixture
def residual_net():
    return ResidualNet().eval()


@pytest.fixture
def untraceable_net():
    return UntraceableNet().eval()


@pytest.fixture
def shared_net():
    return SharedConvNet().eval()


@pytest.fixture
def odd_net():
    return OddLayersNet().eval()


@pytest.fixture
def blocks_net():
    return BlocksNet().eval()


@pytest.fixture
def net_classes():
    """The network classes, for tests that need fresh instances (e.g. ``ghostify.load(path, model=Cls())``)."""
    return {c.__name__: c for c in (ChainNet, ResidualNet, UntraceableNet, SharedConvNet, OddLayersNet,
                                    Block, BlocksNet)}


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so a wrong permutation shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.fixture
def bn_randomizer():
    return randomize_bn


def _fake_imagenet(root, classes=3, per_class=6, side=40):
    """ImageNet's layout in miniature: ``root/{train,val}/class{c}/{i}.png``, random RGB images ``side x side+4``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (side, side + 4, 3)).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def fake_imagenet():
    """``fake_imagenet(root, classes=3, per_class=6, side=40)`` writes a tiny ImageNet-style folder and returns ``root``."""
    return _fake_imagenet
