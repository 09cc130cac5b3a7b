"""Train the MNIST reference models and write the checkpoints in ``checkpoints/`` (the script that made them).

    python -m benchmarks.train_reference --arch resnet20 --epochs 1 -o checkpoints/resnet20_mnist.pt

(``checkpoints/*.pt`` record the command that wrote them; those written before the restructure name
``python -m ghostify.reference``, this script's earlier home.) The model definitions live in
:mod:`ghostify.zoo.reference`; evaluation is :func:`ghostify.evaluate`.
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

from ghostify.errors import GhostifyError
from ghostify.measure.evaluation import evaluate
from ghostify.outputs import atomic_write, check_output
from ghostify.zoo.data import resolve_data
from ghostify.zoo.reference import ARCHS, resnet20  # noqa: F401  (resnet20: the doctest's)

__all__ = ["train", "save_checkpoint", "main"]


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def train(model: nn.Module, train_data: Any, epochs: int = 2, lr: float = 0.1, *, batch_size: int = 128,
          schedule: str = "onecycle", momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
          limit: int | None = None, root=None, device=None, progress: bool = True) -> list[float]:
    """Train ``model`` in place with SGD (Nesterov momentum, weight decay) and a per-step LR schedule.

    Args:
        train_data: a data spec (``mnist:train``) or an iterable of ``(x, y)`` batches (see
            :func:`ghostify.resolve_data`); a spec is reshuffled every epoch with ``seed``.
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
    """``python -m benchmarks.train_reference``: train on mnist:train, report mnist:test accuracy, write a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_reference", description=main.__doc__)
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
        acc = evaluate(model, resolve_data("mnist:test", batch_size=256, root=args.root), progress=False)["top1"]
        command = shlex.join(["python", "-m", "benchmarks.train_reference", *argv])
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
