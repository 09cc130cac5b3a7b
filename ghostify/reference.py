"""Small reference CNNs for MNIST, with the training, evaluation and checkpoint code that made them.

``resnet20`` (He et al. 2016, the CIFAR ResNet) and ``vgg_small`` trace with torch.fx, so
``ghostify.convert`` converts every conv but the stem. Train one and write a checkpoint
that ``ghostify.get_model(PATH)`` loads::

    python -m ghostify.reference --arch resnet20 --epochs 1 -o checkpoints/resnet20_mnist.pt
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import resolve_data
from .errors import GhostifyError
from .outputs import atomic_write, check_output

__all__ = ["CifarResNet", "BasicBlock", "VGGSmall", "resnet20", "vgg_small", "resnet56", "vgg16_cifar", "ARCHS",
           "BUILDERS", "train", "evaluate", "save_checkpoint", "main"]


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
    # not __name__: that is "__main__" under ``python -m ghostify.reference``
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
# ghostify's own model builders: a file may name them ("ghostify.reference:resnet20") without --trust-code
BUILDERS = {"resnet20": resnet20, "vgg_small": vgg_small, "resnet56": resnet56, "vgg16_cifar": vgg16_cifar}


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def train(model: nn.Module, train_data: Any, epochs: int = 2, lr: float = 0.1, *, batch_size: int = 128,
          schedule: str = "onecycle", momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
          limit: int | None = None, root=None, device=None, progress: bool = True) -> list[float]:
    """Train ``model`` in place with SGD (Nesterov momentum, weight decay) and a per-step LR schedule.

    Args:
        train_data: a data spec (``mnist:train``) or an iterable of ``(x, y)`` batches (see
            :func:`ghostify.data.resolve_data`); a spec is reshuffled every epoch with ``seed``.
        lr: the peak learning rate (``onecycle``) or the starting one (``cosine``).
        schedule: ``onecycle`` (warm-up then cosine decay) or ``cosine``.
        limit: train on the first ``limit`` examples only.

    Returns:
        The loss of every step. The model is left in eval mode.

    Example:
        >>> model = resnet20()
        >>> data = [(torch.randn(8, 1, 28, 28), torch.arange(8))] * 2
        >>> len(train(model, data, epochs=1, progress=False))
        2
    """
    if schedule not in ("onecycle", "cosine"):
        raise GhostifyError(f"unknown schedule '{schedule}'; use onecycle or cosine")
    data = resolve_data(train_data, batch_size=batch_size, limit=limit, root=root, shuffle=True, seed=seed)
    try:
        steps = epochs * len(data)
    except TypeError:
        raise GhostifyError("training needs data of known length (a spec, a list or a DataLoader)") from None
    if steps < 1:
        raise GhostifyError(f"nothing to train: {epochs} epochs of {len(data)} batches")
    device = _device(device)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, cycle_momentum=False)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    from tqdm.auto import tqdm

    losses: list[float] = []
    with tqdm(total=steps, desc=f"train {data.name}", file=sys.stderr, disable=not progress, mininterval=2.0) as bar:
        for epoch in range(epochs):
            for x, y in data:
                if y is None:
                    raise GhostifyError(f"training needs labels; {data.name} yields bare tensors, give (x, y) pairs")
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update()
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 256, limit: int | None = None, root=None,
             device=None) -> float:
    """Top-1 accuracy of ``model`` on labelled ``data`` (a spec or iterable), as a fraction in [0, 1].

    Runs in eval mode and restores ``model.training`` afterwards.

    Example:
        >>> model = resnet20()
        >>> 0.0 <= evaluate(model, [(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))]) <= 1.0
        True
    """
    data = resolve_data(data, batch_size=batch_size, limit=limit, root=root)
    param = next(model.parameters(), None)
    device = torch.device(device) if device else (param.device if param is not None else torch.device("cpu"))
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in data:
            if y is None:
                raise GhostifyError(f"evaluation needs labels; {data.name} yields bare tensors, give (x, y) pairs")
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise GhostifyError(f"no examples to evaluate in {data.name}")
    return correct / total


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                    input_size=(1, 1, 28, 28), metrics: dict | None = None, force: bool = False) -> Path:
    """Write ``{"arch", "state_dict", "metrics"}`` for ``ghostify.get_model(path)``; atomic, no overwrite unless ``force``.

    ``model`` must carry its recipe (``model.ghostify_arch``), as models from this module do.

    Example:
        >>> import ghostify, os, tempfile
        >>> path = save_checkpoint(resnet20(), os.path.join(tempfile.mkdtemp(), "r20.pt"))
        >>> ghostify.get_model(str(path)).ghostify_arch["input_size"]
        [1, 1, 28, 28]
    """
    path = check_output(path, force=force)
    arch = getattr(model, "ghostify_arch", None)
    if not arch or arch.get("kind") != "callable":
        raise GhostifyError("the model records no build recipe (ghostify_arch); build it with "
                            "ghostify.reference.resnet20() / vgg_small() or ghostify.get_model")
    arch = {**arch, "name": name or arch.get("name"), "input_size": list(input_size)}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: torch.save({"arch": arch, "state_dict": state,
                                                      "metrics": dict(metrics or {})}, tmp), force=force)


def main(argv: list[str] | None = None) -> None:
    """``python -m ghostify.reference``: train on mnist:train, report mnist:test accuracy, write a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m ghostify.reference", description=main.__doc__)
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet20")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="train on the first N examples only (quick trials)")
    p.add_argument("--root", default=None, help="folder holding the MNIST idx files (else searched for)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-o", "--output", default=None, help="checkpoint path (default checkpoints/ARCH_mnist.pt)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = p.parse_args(argv)
    output = Path(args.output or f"checkpoints/{args.arch}_mnist.pt")
    try:
        check_output(output, force=args.force)
        torch.manual_seed(args.seed)
        model = ARCHS[args.arch]()
        t0 = time.perf_counter()
        train(model, "mnist:train", args.epochs, args.lr, batch_size=args.batch_size, schedule=args.schedule,
              seed=args.seed, limit=args.limit, root=args.root, device=args.device)
        seconds = time.perf_counter() - t0
        acc = evaluate(model, "mnist:test", root=args.root)
        command = shlex.join(["python", "-m", "ghostify.reference", *argv])
        device = next(model.parameters()).device
        metrics = {"test_acc": acc, "epochs": args.epochs, "seconds": round(seconds, 1), "command": command,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": str(torch.__version__)}
        save_checkpoint(model, output, name=f"{args.arch}_mnist", metrics=metrics, force=args.force)
    except GhostifyError as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.arch}: MNIST test accuracy {100 * acc:.2f} % after {args.epochs} epoch{'s' * (args.epochs != 1)} "
          f"({seconds:.0f} s training); wrote {output}")


if __name__ == "__main__":
    main()
