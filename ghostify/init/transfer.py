"""The data-free init strategies: ``none``, ``random`` and ``copy`` (weight-space transfer).

``copy`` keeps the chosen intrinsic filters bit-exactly and fits each ghost's cheap op to the
original ghost filter in weight space (:mod:`ghostify.init.fitting`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import GhostConv2d
from .fitting import fit_dw_kernels, pair_ghosts, pivoted_cholesky, select_intrinsic
from .registry import register_init

__all__ = ["init_none", "init_random", "init_copy", "copy_layer"]


@register_init("none")
def init_none(original, converted, layers, **options) -> dict:
    """Leave the new layers uninitialised: for weights loaded afterwards (``ghostify.load``)."""
    return {}


@register_init("random")
def init_random(original, converted, layers, **options) -> dict:
    """Kaiming-normal init of every weight, zero biases: the from-scratch baseline."""
    for layer in layers:
        for m in layer.ghost.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return {}


@register_init("copy")
@torch.no_grad()
def init_copy(original, converted, layers, **options) -> dict:
    """Copy the chosen intrinsic filters bit-exactly and fit each ghost's cheap kernel in weight space.

    Needs no data. Returns, per layer, the relative weight-space residual of the ghost filters.
    """
    from concurrent.futures import ThreadPoolExecutor

    # Layers are independent; two threads overlap the GIL-free parts (BLAS, Hungarian, numpy).
    with ThreadPoolExecutor(max_workers=2) as pool:
        residuals = list(pool.map(lambda l: copy_layer(l.conv, l.ghost, l.fixed_order), layers))
    return {l.name: {"weight_residual": r} for l, r in zip(layers, residuals)}


@torch.no_grad()
def copy_layer(conv: nn.Conv2d, ghost: GhostConv2d, fixed_order: bool = False) -> float:
    """Initialise ``ghost`` from ``conv`` (see :func:`init_copy`); returns the relative ghost-filter residual.

    ``fixed_order`` keeps the identity layout (see :class:`Layer`) instead of choosing the
    intrinsic filters and the pairing.
    """
    w = conv.weight.detach()
    n, m = ghost.out_channels, ghost.intrinsic_channels
    if ghost.cheap is None:
        ghost.primary.weight.copy_(w)
        if conv.bias is not None:
            ghost.primary.bias.copy_(conv.bias)
        ghost.set_channel_map(torch.arange(n))
        return 0.0
    flat = w.detach().reshape(n, -1).double()
    flat = (flat / flat.abs().max().clamp_min(1e-300)).float()  # the choices are scale-free; no float32 overflow
    gram = flat @ flat.T
    if ghost.cheap_kind == "mix":
        return _copy_mix(conv, ghost, gram, fixed_order)
    if fixed_order:
        intrinsic, slots = list(range(m)), list(range(m, n))
    else:
        intrinsic = select_intrinsic(gram, m)
        rest = sorted(set(range(n)) - set(intrinsic))
        intrinsic, slots = pair_ghosts(gram, intrinsic, rest, ghost.cheap.per_parent)  # slots[k]: channel of ghost k
    parents = torch.as_tensor(intrinsic)[ghost.cheap.parents()]
    kernels, residual = fit_dw_kernels(w, parents, torch.as_tensor(slots), ghost.dw_size,
                                       conv.stride, conv.dilation)
    ghost.primary.weight.copy_(w[intrinsic])
    dw = ghost.cheap.conv
    dw.weight.zero_()
    dw.weight[: len(slots), 0] = kernels.to(dw.weight.dtype)
    if conv.bias is not None:
        b = conv.bias.detach()
        ghost.primary.bias.copy_(b[intrinsic])
        dw.bias.zero_()
        # cheap(y + b_parent) = cheap(y) + b_parent * sum(K), away from the borders
        dw.bias[: len(slots)] = b[slots] - b[parents] * kernels.sum((1, 2)).to(b.dtype)
    ghost.set_channel_map(torch.as_tensor(intrinsic + slots))
    return residual


def _copy_mix(conv: nn.Conv2d, ghost: GhostConv2d, gram: torch.Tensor, fixed_order: bool = False) -> float:
    """``mix`` cheap op in weight space: ghost filters as linear mixtures of the intrinsic ones."""
    n, m = ghost.out_channels, ghost.intrinsic_channels
    w = conv.weight.detach()
    intrinsic = list(range(m)) if fixed_order else pivoted_cholesky(gram.double(), m)
    rest = sorted(set(range(n)) - set(intrinsic))
    wi, wr = w[intrinsic].reshape(m, -1).double(), w[rest].reshape(len(rest), -1).double()
    a = wi @ wi.T
    mix = torch.linalg.solve(a + 1e-8 * a.diagonal().mean() * torch.eye(m, dtype=a.dtype), wi @ wr.T).T
    ghost.primary.weight.copy_(w[intrinsic])
    ghost.cheap.load_mix(mix)
    if conv.bias is not None:
        b = conv.bias.detach().double()
        ghost.primary.bias.copy_(b[intrinsic])
        ghost.cheap.mix.bias.copy_((b[rest] - mix @ b[intrinsic]).to(ghost.cheap.mix.bias.dtype))
    ghost.set_channel_map(torch.as_tensor(intrinsic + rest))
    resid = ((wr - mix @ wi) ** 2).sum() / (wr**2).sum().clamp_min(1e-300)
    return math.sqrt(resid.item())


