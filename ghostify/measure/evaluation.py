"""Evaluation: accuracy with labels, agreement with a baseline model without them."""
from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._util import eval_mode
from ..graph import bn_output_scales
from ..errors import GhostifyError
from ..conversion.fold import folded_inputs
from ..layers import GhostConv2d, inverse_permutation

__all__ = ["evaluate", "layer_errors", "compare_outputs", "output_error", "model_outputs", "Agreement"]


class Agreement:
    """Accumulates, batch by batch, top-1/top-5 accuracy against labels and agreement with reference logits.

    ``agree_top1``: same top-1 class as the reference; ``agree_top5``: the reference's top-1
    inside the model's top-5; ``kl``: mean KL(reference || model) of the softmax outputs, in
    nats. The one place these are computed (:func:`evaluate`, :func:`compare_outputs`,
    sensitivity and sweeps use it).
    """

    def __init__(self):
        self.n = self.labelled = self.correct1 = self.correct5 = self.agree1 = self.agree5 = 0
        self.kl = 0.0
        self.compared = False

    def update(self, out: torch.Tensor, ref: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        if labels is not None:
            self.labelled += len(labels)
            self.correct1 += (top[:, 0] == labels).sum().item()
            self.correct5 += (top == labels[:, None]).any(1).sum().item()
        if ref is not None:
            self.compared = True
            ref1 = ref.argmax(1)
            self.agree1 += (top[:, 0] == ref1).sum().item()
            self.agree5 += (top == ref1[:, None]).any(1).sum().item()
            self.kl += F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="sum").item()
        self.n += len(out)

    def result(self) -> dict:
        res: dict = {"examples": self.n}
        if self.labelled:
            res.update(top1=self.correct1 / self.labelled, top5=self.correct5 / self.labelled)
        if self.compared:
            res.update(agree_top1=self.agree1 / self.n, agree_top5=self.agree5 / self.n, kl=self.kl / self.n)
        return res


@torch.no_grad()
def model_outputs(model: nn.Module, batches) -> list[torch.Tensor]:
    """``model``'s outputs on each batch of inputs, without gradients."""
    return [model(x) for x in batches]


@torch.no_grad()
def compare_outputs(outs: list[torch.Tensor], refs: list[torch.Tensor], labels: list[torch.Tensor] | None = None
                    ) -> dict:
    """Top-1 agreement and mean KL(ref || out) of lists of logits; top-1 accuracy when ``labels`` are given.

    Example:
        >>> logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]])]
        >>> compare_outputs(logits, logits, [torch.tensor([0, 0])])
        {'agree_top1': 1.0, 'kl': 0.0, 'top1': 0.5}
    """
    acc = Agreement()
    for i, (o, r) in enumerate(zip(outs, refs)):
        acc.update(o, r, labels[i] if labels is not None else None)
    res = acc.result()
    return {"agree_top1": res["agree_top1"], "kl": res["kl"], **({"top1": res["top1"]} if labels is not None else {})}


@torch.no_grad()
def output_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """Relative error ``||out - ref|| / ||ref||`` of whole outputs (feature maps, not logits), over every batch.

    Example:
        >>> output_error([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 0.0])])
        1.3333333333333333
    """
    num = sum((o - r).float().pow(2).sum().item() for o, r in zip(outs, refs, strict=True))
    den = sum(r.float().pow(2).sum().item() for r in refs)
    if den == 0:
        raise GhostifyError("the original's outputs are all zero on this data: no relative error to measure")
    return (num / den) ** 0.5


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

    dev = torch.device(device) if device else next(iter(model.parameters()), torch.empty(0)).device
    acc = Agreement()
    with eval_mode(model, baseline):
        total = len(data) if hasattr(data, "__len__") else None
        for batch in tqdm(data, total=total, disable=not progress, file=sys.stderr, desc="eval", leave=False):
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.to(dev)
            out = model(x)
            if out.dim() != 2:
                raise GhostifyError(f"the model returned shape {tuple(out.shape)}; eval expects (batch, classes) logits")
            acc.update(out, baseline(x) if baseline is not None else None, y.to(dev) if y is not None else None)
    if acc.n == 0:
        raise GhostifyError("the evaluation data is empty")
    return acc.result()


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

    if weighting not in ("bn", "none"):
        raise GhostifyError(f"weighting={weighting!r} is not known; use 'bn' or 'none'")
    ghosts = {name: m for name, m in converted.named_modules() if isinstance(m, GhostConv2d)}
    scales = bn_output_scales(converted, list(ghosts)) if weighting == "bn" else {}
    for name, s in scales.items():  # a folded layer's BN reads its internal order
        if ghosts[name].emit_internal_order:
            scales[name] = s[inverse_permutation(ghosts[name].channel_map.cpu())]
    orders = folded_inputs(converted) if isinstance(converted, fx.GraphModule) else {}
    num = dict.fromkeys(ghosts, 0.0)
    den = dict.fromkeys(ghosts, 0.0)
    handles = []

    def hook(name):
        def fn(mod, args, out):
            g, x = ghosts[name], args[0]
            if name in orders:  # it reads a folded layer's output: the fold permuted its input weights
                x = x[:, orders[name].to(x.device)]
            y = g(x)
            if g.emit_internal_order:  # folded layer: its output is in internal channel order
                y = y[:, inverse_permutation(g.channel_map)]
            w = scales[name].to(out)[None, :, None, None] ** 2 if name in scales else 1.0
            num[name] += (w * (y - out).pow(2)).sum().item()
            den[name] += (w * out.pow(2)).sum().item()
        return fn

    with eval_mode(original, converted):
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
    return {name: (num[name] / den[name]) ** 0.5 if den[name] > 0 else 0.0 for name in ghosts}

