"""Evaluation: accuracy with labels, agreement with a baseline model without them."""
from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GhostifyError

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, baseline: nn.Module | None = None, *, progress: bool = True,
             device: str | torch.device | None = None) -> dict:
    """Top-1/top-5 accuracy when ``data`` has labels; agreement with ``baseline`` when given.

    Agreement metrics: ``agree_top1`` (same top-1 class as the baseline), ``agree_top5``
    (the baseline's top-1 inside the model's top-5) and ``kl`` (mean KL(baseline || model)
    of the softmax outputs, in nats). ``model.training`` and ``baseline.training`` are restored.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> data = [(torch.eye(4)[:3], torch.tensor([0, 1, 2]))]
        >>> sorted(evaluate(net, data, baseline=net, progress=False))
        ['agree_top1', 'agree_top5', 'examples', 'kl', 'top1', 'top5']
    """
    from tqdm import tqdm

    models = [m for m in (model, baseline) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    dev = torch.device(device) if device else next(iter(model.parameters()), torch.empty(0)).device
    n = correct1 = correct5 = labelled = agree1 = agree5 = 0
    kl = 0.0
    try:
        total = len(data) if hasattr(data, "__len__") else None
        for batch in tqdm(data, total=total, disable=not progress, file=sys.stderr, desc="eval", leave=False):
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.to(dev)
            out = model(x)
            if out.dim() != 2:
                raise GhostifyError(f"the model returned shape {tuple(out.shape)}; eval expects (batch, classes) logits")
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            if y is not None:
                y = y.to(dev)
                labelled += len(y)
                correct1 += (top[:, 0] == y).sum().item()
                correct5 += (top == y[:, None]).any(1).sum().item()
            if baseline is not None:
                ref = baseline(x)
                ref1 = ref.argmax(1)
                agree1 += (top[:, 0] == ref1).sum().item()
                agree5 += (top == ref1[:, None]).any(1).sum().item()
                kl += F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True,
                               reduction="sum").item()
            n += len(x)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if n == 0:
        raise GhostifyError("the evaluation data is empty")
    res: dict = {"examples": n}
    if labelled:
        res.update(top1=correct1 / labelled, top5=correct5 / labelled)
    if baseline is not None:
        res.update(agree_top1=agree1 / n, agree_top5=agree5 / n, kl=kl / n)
    return res
