"""Real pretrained networks from the asset cache, as ``module:callable`` builders for ghostify.

Fetch the weights first (``python -m benchmarks.assets fetch``); from the repository root:

    PYTHONPATH=$PWD ghostify convert benchmarks.real_models:vgg16_imagenet_trunk --ratio 2 -o vgg.safetensors
    PYTHONPATH=$PWD ghostify convert benchmarks.real_models:efficientnet_lite0 --ratio 2 --init calib \\
        --calib-data photos:calib -o lite0.safetensors

Every builder returns a model in eval mode that takes what ghostify's ``photos`` and
``imagefolder`` sources give (RGB, ImageNet-normalised); a fixed :class:`InputAdapter` (not
a conv, so ghostify leaves it alone) turns that into the input the weights were trained on.
``imagenet_input=False`` leaves it out.

- :func:`vgg16_imagenet_trunk`: torchvision ``vgg16().features`` (13 convs, 512x7x7 out at
  224 px) with VGG16's original ImageNet conv weights; inputs BGR, 0-255, Caffe mean subtracted.
- :func:`craft_vgg16bn_trunk`: ``vgg16_bn().features[:39]`` (12 convs, up to the BN after
  conv5_2) with CRAFT's ``basenet``; inputs ImageNet-normalised RGB (CRAFT's own).
- :func:`efficientnet_lite0`: the ImageNet-1k EfficientNet-Lite0 classifier (1000 logits);
  inputs RGB normalised with mean = std = 0.5. Needs the model code,
  ``pip install -e '.[bench]'`` (``efficientnet-lite-pytorch==0.1.0``).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from benchmarks.assets import ASSETS, FETCH_COMMAND, cache_dir, verify, vgg16_features
from ghostify.zoo.data import IMAGENET_MEAN, IMAGENET_STD
from ghostify.errors import GhostifyError

__all__ = ["InputAdapter", "vgg16_imagenet_trunk", "craft_vgg16bn_trunk", "load_craft_trunk", "efficientnet_lite0",
           "asset_path", "CAFFE_BGR_MEAN"]

CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # VGG's training mean, B, G, R, on the 0-255 scale


class InputAdapter(nn.Module):
    """``out[:, c] = x[:, order[c]] * scale[c] + shift[c]``: a fixed change of input normalisation.

    Example:
        >>> caffe = InputAdapter.imagenet_to_caffe_bgr()
        >>> x = torch.zeros(1, 3, 2, 2)                       # the ImageNet mean colour
        >>> [round(v, 1) for v in caffe(x)[0, :, 0, 0].tolist()]
        [-0.2, -0.5, -0.4]
    """

    def __init__(self, scale, shift, order=(0, 1, 2)):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))
        self.order = list(order)

    def forward(self, x):
        return x[:, self.order] * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"order={self.order}"

    @classmethod
    def imagenet_to_caffe_bgr(cls) -> "InputAdapter":
        """ImageNet-normalised RGB -> BGR on the 0-255 scale minus :data:`CAFFE_BGR_MEAN` (VGG's own input)."""
        bgr = [2, 1, 0]
        return cls([255 * IMAGENET_STD[c] for c in bgr],
                   [255 * IMAGENET_MEAN[c] - m for c, m in zip(bgr, CAFFE_BGR_MEAN)], bgr)

    @classmethod
    def imagenet_to_half(cls) -> "InputAdapter":
        """ImageNet-normalised RGB -> RGB normalised with mean = std = 0.5 (EfficientNet-Lite's input)."""
        return cls([s / 0.5 for s in IMAGENET_STD], [(m - 0.5) / 0.5 for m in IMAGENET_MEAN])


def asset_path(asset: str, rel: str) -> Path:
    """The verified file ``rel`` of ``asset`` in the cache; one clear line when it is missing."""
    dest = cache_dir()
    problem = verify(ASSETS[asset], dest)
    if problem is not None:
        raise GhostifyError(f"asset '{asset}' is not in {dest} ({problem}); run '{FETCH_COMMAND} --only {asset}' "
                            "from the repository root")
    return dest / rel


def _adapt(adapter: InputAdapter | None, body: nn.Module, name: str) -> nn.Module:
    if adapter is None:
        return body.eval()
    return nn.Sequential(OrderedDict([("input", adapter), (name, body)])).eval()


def vgg16_imagenet_trunk(*, imagenet_input: bool = True) -> nn.Module:
    """torchvision ``vgg16().features`` with VGG16's original ImageNet conv weights (the trunk; no head).

    Example:
        >>> trunk = vgg16_imagenet_trunk()                                    # doctest: +SKIP
        >>> trunk(torch.zeros(1, 3, 224, 224)).shape                          # doctest: +SKIP
        torch.Size([1, 512, 7, 7])
    """
    from safetensors.torch import load_file

    features = vgg16_features()
    features.load_state_dict(load_file(asset_path("vgg16-imagenet", "vgg16-imagenet/vgg16_features.safetensors")),
                             strict=True)
    return _adapt(InputAdapter.imagenet_to_caffe_bgr() if imagenet_input else None, features, "features")


def load_craft_trunk(path: str | Path) -> nn.Sequential:
    """``nn.Sequential(vgg16_bn().features[:39])`` with CRAFT's basenet: ``basenet.sliceK.I.*`` -> ``0.I.*``, strict."""
    import torchvision

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "basenet" and parts[1] in ("slice1", "slice2", "slice3", "slice4"):
            mapped[".".join(["0", *parts[2:]])] = value
    trunk = nn.Sequential(torchvision.models.vgg16_bn().features[:39])
    trunk.load_state_dict(mapped, strict=True)
    return trunk.eval()


def craft_vgg16bn_trunk() -> nn.Module:
    """CRAFT's VGG16-BN trunk (``vgg16_bn().features[:39]``); inputs ImageNet-normalised RGB, as CRAFT's.

    Example:
        >>> trunk = craft_vgg16bn_trunk()                                     # doctest: +SKIP
        >>> trunk(torch.zeros(1, 3, 224, 224)).shape                          # doctest: +SKIP
        torch.Size([1, 512, 14, 14])
    """
    return load_craft_trunk(asset_path("craft-vgg16bn", "craft-vgg16bn/craft_mlt_25k.pth"))


def _plain_convs(model: nn.Module) -> nn.Module:
    """Replace the package's "same"-padding conv subclasses by a plain ``nn.Conv2d`` (after a ``ZeroPad2d`` when the
    padding is asymmetric), weights shared: the same function, with modules that ghostify converts correctly."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d) or type(module) is nn.Conv2d:
            continue
        pad = getattr(module, "static_padding", None)
        if not isinstance(pad, (nn.ZeroPad2d, nn.Identity)) and type(pad).__name__ != "Identity":
            raise GhostifyError(f"layer '{name}': {type(module).__name__} pads at run time; build the model with "
                                "an image size (static padding)")
        left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                         (top, left) if (left, top) == (right, bottom) else 0, module.dilation, module.groups,
                         module.bias is not None)
        conv.weight, conv.bias = module.weight, module.bias
        new = conv if (left, top) == (right, bottom) else nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
        model.set_submodule(name, new)
    return model


def efficientnet_lite0(*, imagenet_input: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights (1000 logits), convs made plain ``nn.Conv2d``.

    Example:
        >>> model = efficientnet_lite0()                                      # doctest: +SKIP
        >>> model(torch.zeros(1, 3, 224, 224)).shape                          # doctest: +SKIP
        torch.Size([1, 1000])
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise GhostifyError("efficientnet_lite0 needs the model code: pip install -e '.[bench]' (or pip install "
                            "efficientnet-lite-pytorch==0.1.0)") from None
    path = asset_path("efficientnet-lite0", "efficientnet-lite0/efficientnet-lite0-57934424.pth")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return _adapt(InputAdapter.imagenet_to_half() if imagenet_input else None, _plain_convs(net.eval()), "net")
