"""Small reference CNNs, registered by name in :data:`BUILDERS`: ``resnet20`` and ``vgg_small`` (MNIST),
``resnet56`` and ``vgg16_cifar`` (CIFAR-10).

``resnet20`` (He et al. 2016, the CIFAR ResNet) and ``vgg_small`` trace with torch.fx, so
``ghostify.convert`` converts every conv but the stem. Files name the builders as
``ghostify.reference:resnet20`` (the module :mod:`ghostify.reference` re-exports them); the
script that trained ``checkpoints/`` is ``benchmarks/train_reference.py``::

    python -m benchmarks.train_reference --arch resnet20 --epochs 1 -o checkpoints/resnet20_mnist.pt
"""
from __future__ import annotations

import torch
from torch import nn

from ..trust import GHOSTIFY_BUILDERS

__all__ = ["CifarResNet", "BasicBlock", "VGGSmall", "resnet20", "vgg_small", "resnet56", "vgg16_cifar", "ARCHS",
           "BUILDERS"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (identity, or 1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``blocks`` BasicBlocks (``widths``; stride 2 from stage 2), avg pool, Linear."""

    def __init__(self, blocks: int = 3, widths: tuple[int, ...] = (16, 32, 64), *, num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1)
                                          for j in range(blocks)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _init(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGGSmall(nn.Module):
    """conv3x3-BN-ReLU blocks per ``cfg`` (an int is a conv's width, ``"M"`` a 2x2 max pool), avg pool, Linear."""

    def __init__(self, cfg=(32, 32, "M", 64, 64, "M", 128, 128, "M"), *, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _recipe(name: str, **kwargs) -> dict:
    # not __name__: files name the stable path ghostify.reference (kept as a re-exporting module)
    return {"kind": "callable", "target": f"ghostify.reference:{name}", "kwargs": kwargs, "name": name}


def resnet20(*, num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """ResNet-20 (He et al. 2016, CIFAR variant): 0.27 M parameters; 28x28 MNIST input by default.

    Example:
        >>> resnet20()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    model = CifarResNet(3, (16, 32, 64), num_classes=num_classes, in_channels=in_channels)
    model.ghostify_arch = _recipe("resnet20", num_classes=num_classes, in_channels=in_channels)
    return model


def vgg_small(*, num_classes: int = 10, in_channels: int = 1) -> VGGSmall:
    """A small VGG: conv widths 32,32,M,64,64,M,128,128,M, then global avg pool and Linear.

    Example:
        >>> vgg_small()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    model = VGGSmall(num_classes=num_classes, in_channels=in_channels)
    model.ghostify_arch = _recipe("vgg_small", num_classes=num_classes, in_channels=in_channels)
    return model


def _with_recipe(model: nn.Module, name: str, **kwargs) -> nn.Module:
    model.ghostify_arch = _recipe(name, **kwargs)
    return model


def resnet56(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (He et al. 2016) for CIFAR: nine blocks per stage, 0.86 M parameters, 125 M MACs at 32x32.

    Example:
        >>> resnet56()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    model = CifarResNet(9, (16, 32, 64), num_classes=num_classes, in_channels=in_channels)
    return _with_recipe(model, "resnet56", num_classes=num_classes, in_channels=in_channels)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_cifar(*, num_classes: int = 10, in_channels: int = 3) -> VGGSmall:
    """VGG-16 with BN for CIFAR (the GhostNet paper's CIFAR-10 VGG-16): 13 convs, one Linear, 313 M MACs at 32x32.

    Example:
        >>> vgg16_cifar()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    model = VGGSmall(VGG16_CFG, num_classes=num_classes, in_channels=in_channels)
    return _with_recipe(model, "vgg16_cifar", num_classes=num_classes, in_channels=in_channels)


ARCHS = {"resnet20": resnet20, "vgg_small": vgg_small}
# ghostify's own model builders, by name: a file may name them ("ghostify.reference:resnet20") without
# --trust-code; the names are the trust module's allow-list
BUILDERS = {name: globals()[name] for name in GHOSTIFY_BUILDERS}
