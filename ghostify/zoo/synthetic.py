"""Synthetic calibration inputs for users with no data (the ``synthetic`` data source).

A trained network's batch-norm layers remember the mean and variance of the features they
saw in training. Starting from noise, the inputs are optimised until the statistics of
every BN layer's input on the synthetic batch match those running statistics (ZeroQ,
Cai et al. 2020; DeepInversion, Yin et al. 2020), with a small total-variation prior that
keeps images smooth. The model's weights are not touched and ``model.training`` is restored.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .._util import eval_mode
from ..errors import GhostifyError

__all__ = ["synthesize", "bn_statistics_loss"]


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def _stats_loss(model: nn.Module, x: torch.Tensor, bns) -> torch.Tensor:
    """Sum over BN layers of ||batch mean - running mean|| + ||batch std - running std|| (ZeroQ's loss)."""
    terms = []

    def hook(bn, args):
        h = args[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
        terms.append(torch.linalg.vector_norm(h.mean(1) - bn.running_mean)
                     + torch.linalg.vector_norm((h.var(1, unbiased=False) + bn.eps).sqrt()
                                                - (bn.running_var + bn.eps).sqrt()))

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum()


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> float:
    """How far the BN-input statistics of batch ``x`` are from ``model``'s running statistics.

    The sum over BN layers of the distances between batch and running means and standard
    deviations; 0 means the batch looks, to every BN layer, like the training data.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> bn_statistics_loss(net, torch.randn(8, 1, 8, 8)) > 0
        True
    """
    bns = _bn_layers(model)
    if not bns:
        raise GhostifyError("the model has no BatchNorm layers with running statistics")
    with eval_mode(model), torch.no_grad():
        return float(_stats_loss(model, x, bns))


def synthesize(model: nn.Module, num_examples: int = 64, input_size: tuple[int, ...] = (3, 224, 224), *,
               batch_size: int = 32, steps: int = 200, lr: float = 0.1, tv: float = 1e-3, seed: int = 0,
               progress: bool = True) -> torch.Tensor:
    """``num_examples`` inputs optimised so that ``model``'s BN layers see their training statistics.

    Args:
        model: a trained model with ``BatchNorm`` layers (it runs in eval mode; weights unchanged).
        input_size: one example's shape ``(C, H, W)``.
        batch_size: examples optimised together (the statistics are matched per batch).
        steps, lr: Adam steps and learning rate per batch.
        tv: weight of the total-variation prior (smooth images); 0 disables it.

    Returns:
        A float tensor ``(num_examples, *input_size)`` on the model's device.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> synthesize(net, 4, (1, 8, 8), steps=5, progress=False).shape
        torch.Size([4, 1, 8, 8])
    """
    from tqdm import tqdm

    bns = _bn_layers(model)
    if not bns:
        raise GhostifyError("synthetic calibration data is made from the model's BatchNorm statistics, and this "
                            "model has none; calibrate on real data (--calib-data imagefolder:PATH)")
    if num_examples < 1 or batch_size < 1 or steps < 0:
        raise GhostifyError(f"synthesize needs num_examples, batch_size >= 1 and steps >= 0 "
                            f"(got {num_examples}, {batch_size}, {steps})")
    dev = next(iter(model.parameters()), torch.empty(0)).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model):
        with tqdm(total=-(-num_examples // batch_size) * steps, desc="synthetic", file=sys.stderr,
                  disable=not progress, mininterval=2.0) as bar:
            for start in range(0, num_examples, batch_size):
                n = min(batch_size, num_examples - start)
                x = torch.randn((n, *input_size), generator=gen).to(dev).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for _ in range(steps):
                    with torch.enable_grad():
                        loss = _stats_loss(model, x, bns)
                        if tv > 0 and x.dim() == 4:
                            loss = loss + tv * ((x[..., 1:, :] - x[..., :-1, :]).abs().sum()
                                                + (x[..., 1:] - x[..., :-1]).abs().sum()) / n
                        (grad,) = torch.autograd.grad(loss, x)  # no gradients land on the model
                    opt.zero_grad(set_to_none=True)
                    x.grad = grad
                    opt.step()
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                    bar.update()
                out.append(x.detach())
    return torch.cat(out)
