"""Convert a torchvision model to Ghost layers in Python and print the before/after report.

Run:  python examples/convert_torchvision.py
"""
import torch
import torchvision

import ghostify


def main():
    # Random weights, since this machine may have no network. With a network,
    # torchvision.models.resnet18(weights="DEFAULT") converts the ImageNet model instead.
    model = torchvision.models.resnet18(weights=None).eval()

    # Every groups=1 conv except the stem becomes a GhostConv2d that computes
    # ceil(n / 2) "intrinsic" maps with the primary conv and the rest with a cheap
    # 3x3 depthwise conv. init="copy" (the default) copies the chosen intrinsic
    # filters exactly and fits the depthwise kernels to the remaining filters.
    ghost = ghostify.convert(model, ratio=2)
    print(f"converted with mode={ghost.ghostify_info.mode!r}; "
          f"{len(ghost.ghostify_info.folded)} layers had their channel order folded into the next layer")

    # Same input, same output shape: the converted model is a drop-in replacement.
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert ghost(x).shape == model(x).shape == (1, 1000)

    # MACs and parameters before/after, total and per conv (fvcore counting: 1 multiply-add = 1 MAC).
    rep = ghostify.report(model, ghost, input_size=(1, 3, 224, 224))
    print(rep.table())
    print(f"MACs kept: {rep.macs_after / rep.macs_before:.1%}, params kept: {rep.params_after / rep.params_before:.1%}")


if __name__ == "__main__":
    main()
