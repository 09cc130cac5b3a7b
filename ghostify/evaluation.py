"""Evaluation: accuracy with labels, agreement with a baseline model without them."""
from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GhostifyError

__all__ = ["evaluate", "layer_errors"]


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


@torch.no_grad()
def layer_errors(original: nn.Module, converted: nn.Module, data: Iterable, *, progress: bool = True,
                 weighting: str = "bn") -> dict[str, float]:
    """Each converted layer's relative output error on ``data``, the layer alone.

    For every conv that ``converted`` holds as a :class:`~ghostify.GhostConv2d`, the Ghost
    layer gets the input the original conv gets inside ``original`` and
    ``||ghost(x) - conv(x)|| / ||conv(x)||`` is summed over all of ``data`` (one forward pass
    of the original per batch). Use data never used for calibration to measure fidelity.
    With ``weighting="bn"`` (default, as calibration measures it) each channel counts as the
    BatchNorm after the layer sees it, scaled by ``|gamma| / sqrt(var + eps)``; ``"none"``
    compares the raw conv outputs.

    Example:
        >>> import ghostify, torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> data = [torch.randn(2, 3, 32, 32)]
        >>> ghost = ghostify.convert(model, init="calib", calib_data=data * 2)
        >>> errs = layer_errors(model, ghost, data, progress=False)
        >>> len(errs) == len(ghostify.conversion_info(ghost).plan.converted)
        True
    """
    from tqdm import tqdm

    from .calibrate import _output_scales
    from .modules import GhostConv2d, _inverse

    if weighting not in ("bn", "none"):
        raise GhostifyError(f"weighting={weighting!r} is not known; use 'bn' or 'none'")
    ghosts = {name: m for name, m in converted.named_modules() if isinstance(m, GhostConv2d)}
    scales = _output_scales(converted, list(ghosts)) if weighting == "bn" else {}
    for name, s in scales.items():  # a folded layer's BN reads its internal order
        if ghosts[name].emit_internal_order:
            scales[name] = s[_inverse(ghosts[name].channel_map.cpu())]
    num = dict.fromkeys(ghosts, 0.0)
    den = dict.fromkeys(ghosts, 0.0)
    handles = []

    def hook(name):
        def fn(mod, args, out):
            g = ghosts[name]
            y = g(args[0])
            if g.emit_internal_order:  # folded layer: its output is in internal channel order
                y = y[:, _inverse(g.channel_map)]
            w = scales[name].to(out)[None, :, None, None] ** 2 if name in scales else 1.0
            num[name] += (w * (y - out).pow(2)).sum().item()
            den[name] += (w * out.pow(2)).sum().item()
        return fn

    modes = (original.training, converted.training)
    original.eval(), converted.eval()
    try:
        for name in ghosts:
            handles.append(original.get_submodule(name).register_forward_hook(hook(name)))
        dev = next(iter(original.parameters())).device
        total = len(data) if hasattr(data, "__len__") else None
        for batch in tqdm(data, total=total, disable=not progress, file=sys.stderr, desc="layer errors", leave=False):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            original(x.to(dev))
    finally:
        for h in handles:
            h.remove()
        original.train(modes[0]), converted.train(modes[1])
    return {name: (num[name] / den[name]) ** 0.5 if den[name] > 0 else 0.0 for name in ghosts}

