"""Would a Ghost layer whose cheap half costs nothing at run time keep a trunk faithful? A probe, nothing trained.

A ghost map that is a positive multiple of one intrinsic map *after* BatchNorm, ``g_j = c * z_i`` with
``c > 0``, passes through ReLU and max-pooling as ``c * relu(z_i)`` (both commute with a positive scale), so
the next conv can absorb it (``W[:, i] += c * W[:, j]``) and the deployed layer is an ordinary narrower conv:
a pruned layer whose dropped channels are merged into kept ones instead of zeroed. Whether that is worth
building depends on how close each channel of a trained trunk is to a positive multiple of another one. This
prints, for each conv of the trunk (its BatchNorm + ReLU output, what the next layer sees), the distribution
over channels of the best such fit's relative residual ``||r_j - c r_i|| / ||r_j||``: pairing and ``c``
chosen on calibration crops, residual measured on held-out crops of other photos. Dropping the channel (what
pruning does) is 1.0; ghostify's ``mix`` ghosts, which combine many intrinsic maps, are the comparison::

    python -m benchmarks.foldable_ghosts                    # CRAFT's VGG16-BN trunk, about a minute on 2 cores
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import ghostify
from benchmarks import peers


@torch.no_grad()
def relu_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each ReLU's output (the map the next layer sees) over ``batches``, one ``(channels, positions)`` matrix per
    ReLU, positions sub-sampled to at most 20,000 (seeded)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    seen: list[list[torch.Tensor]] = [[] for _ in relus]
    hooks = [r.register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.clone())) for k, r in enumerate(relus)]
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    maps = [torch.cat(s).transpose(0, 1).flatten(1) for s in seen]
    return [r[:, torch.randperm(r.shape[1], generator=gen)[:20000]] for r in maps]


def best_positive_pairs(fit: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per channel ``j``: the relative residual on ``test`` of ``c * r_i`` (``i != j``, ``c >= 0``) chosen by least
    squares on ``fit``; a channel with no energy on ``test`` gets 0 (nothing to lose there).

    >>> a = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    >>> best_positive_pairs(a, a)      # rows 0 and 1 are multiples of each other, row 2 of nothing
    tensor([0., 0., 1.])
    """
    gram = fit @ fit.T
    norms = gram.diagonal().clamp(min=1e-12)
    cos = gram / (norms.sqrt()[:, None] * norms.sqrt()[None, :])
    cos.fill_diagonal_(-1.0)
    pick = cos.argmax(1)
    c = (gram[torch.arange(len(fit)), pick] / norms[pick]).clamp(min=0)
    energy = test.norm(dim=1)
    res = (test - c[:, None] * test[pick]).norm(dim=1) / energy.clamp(min=1e-12)
    return torch.where(energy > 0, res, torch.zeros_like(res))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="craft_trunk", choices=["craft_trunk", "vgg16_trunk"])
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (peers.py's)")
    ap.add_argument("--heldout", type=int, default=48, help="held-out crops of other photos (peers.py's)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = peers.SETUPS[a.model].build().eval()
    fit = relu_inputs(model, [x for x, _ in ghostify.resolve_data("photos:calib", batch_size=16, limit=a.calib)])
    test = relu_inputs(model, [x for x, _ in ghostify.resolve_data("photos:heldout", batch_size=16,
                                                                   limit=a.heldout)])
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    q = torch.tensor([0.1, 0.25, 0.5])
    print(f"{a.model}: best positive single-map fit of each channel after ReLU, relative residual on held-out "
          f"crops ({a.calib} calibration / {a.heldout} held-out crops); dropping a channel is 1.00")
    print("| conv | channels | 10 % of channels at most | 25 % | median |\n|---|---|---|---|---|")
    rows = []
    for name, f, t in zip(convs, fit, test):
        res = best_positive_pairs(f, t)
        rows.append(dict(conv=name, channels=len(res), quantiles=res.quantile(q).tolist()))
        print(f"| {name} | {len(res)} | " + " | ".join(f"{v:.2f}" for v in rows[-1]["quantiles"]) + " |")
    return rows


if __name__ == "__main__":
    main()
