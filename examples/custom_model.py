"""Convert your own nn.Module, including one that torch.fx cannot trace.  Run: python examples/custom_model.py"""
import torch
from torch import nn

import ghostify


class SmallCNN(nn.Module):
    def __init__(self, num_classes=10, checked=False):
        super().__init__()
        self.checked = checked
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.checked and not torch.isfinite(x).all():  # data-dependent `if`: fx cannot trace it
            raise FloatingPointError("non-finite activations")
        return self.head(x.mean((2, 3)))


def main():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    ghost = ghostify.convert(model, ratio=2)  # the stem (first conv on the input) is kept by default
    print(ghost.ghostify_info.plan.table())

    # The intrinsic filters are copied bit-exactly: the primary conv of a Ghost layer
    # computes exactly the original conv's channels channel_map[:m] (m = ceil(32 / 2)).
    conv, layer = model.body[0], ghost.get_submodule("body.0")
    idx = layer.channel_map[: layer.intrinsic_channels]  # original channel of each intrinsic map
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(layer.primary.weight, conv.weight[idx])
        diff = (layer.primary(x) - conv(x)[:, idx]).abs().max().item()
    print(f"body.0: {len(idx)} of {conv.out_channels} channels intrinsic, max |difference| on them = {diff:g}")

    # A model fx cannot trace is converted by swapping its conv submodules (no channel-order
    # folding then: each Ghost layer puts its channels back in the original order itself).
    checked = SmallCNN(checked=True).eval()
    checked.load_state_dict(model.state_dict())
    ghost_c = ghostify.convert(checked, ratio=2)
    info = ghost_c.ghostify_info
    assert info.mode == "swap" and not info.plan.traced
    print(f"\nchecked model: mode={info.mode!r}, converted {[e.name for e in info.plan.converted]}\n"
          f"  (fx said: {info.plan.trace_error})")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        same = torch.allclose(ghost_c(images), ghost(images), atol=1e-5)
    print(f"same logits as the fx-converted model: {same}")


if __name__ == "__main__":
    main()
