"""Weight transfer: initialisation strategies for converted layers, registered by name.

A strategy is called once per conversion with every layer it owns::

    strategy(original_model, converted_model, layers, **options) -> dict[name, info]

so that per-layer strategies (``copy``, ``random``) and whole-model ones (calibrated,
sequential fitting) share one interface. ``layers`` holds :class:`Layer` records with the
original conv and its :class:`~ghostify.modules.GhostConv2d` replacement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .modules import GhostConv2d

__all__ = ["Layer", "INITS", "register_init", "select_intrinsic", "pair_ghosts", "fit_dw_kernels"]


@dataclass
class Layer:
    """One conversion: the layer's qualified name, the original conv and its replacement.

    ``fixed_order``: the layer's channel order cannot be folded into its consumers (its
    output meets a residual add, a concat or the model output), so the strategy must keep
    the identity layout - intrinsic channels ``0..m-1``, ghost ``k`` = channel ``m + k`` - and
    the layer runs as a plain ``cat`` with no reordering.
    """

    name: str
    conv: nn.Conv2d
    ghost: GhostConv2d
    fixed_order: bool = False
    cheap_auto: bool = False  # the spec says cheap="auto": the strategy picks the family (see LayerSpec)


InitFn = Callable[..., dict]
INITS: dict[str, InitFn] = {}


def register_init(name: str):
    """Register an init strategy under ``name``; a duplicate name is refused.

    Example:
        >>> @register_init("zeros-demo")
        ... def zeros(original, converted, layers, **options):
        ...     for l in layers:
        ...         nn.init.zeros_(l.ghost.primary.weight)
        ...     return {}
        >>> del INITS["zeros-demo"]
    """

    def add(fn: InitFn) -> InitFn:
        if name in INITS:
            raise ValueError(f"init strategy {name!r} is already registered")
        INITS[name] = fn
        return fn

    return add


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
    from .calibrate import _pivoted_cholesky

    n, m = ghost.out_channels, ghost.intrinsic_channels
    w = conv.weight.detach()
    intrinsic = list(range(m)) if fixed_order else _pivoted_cholesky(gram.double(), m)
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


def select_intrinsic(gram: torch.Tensor, m: int, rounds: int = 12) -> list[int]:
    """Pick ``m`` filters that best explain the others by scaling (greedy facility location).

    ``gram`` holds inner products: of filters (weight space) or of output channels
    (their covariance on calibration data). ``gain[c, j] = g[c, j]^2 / g[j, j]`` is the energy
    of ``c`` that a scaled copy of ``j`` explains; the objective is ``sum_c max_{j in I} gain[c, j]``. Each of
    ``rounds`` rounds computes every candidate's marginal gain at once and then accepts
    about ``m / rounds`` of the best, re-checking each against the picks of the round so
    that near-duplicates are not taken together. Returned in pick order: the least useful
    intrinsic filter comes last.
    """
    g = gram.float()
    gain_t = g * g / g.diagonal().clamp_min(1e-30)[:, None]  # row j: gain of every channel from j
    gain = gain_t.numpy()
    n = len(gain)
    best_t = torch.zeros(n)
    best = best_t.numpy()  # shares memory with best_t
    alive = np.ones(n, bool)
    chosen: list[int] = []
    per_round = max(1, -(-m // rounds))
    buf = torch.empty_like(gain_t)
    while len(chosen) < m:
        marginal = torch.sub(gain_t, best_t[None, :], out=buf).clamp_min_(0).sum(1).numpy()
        marginal = np.nan_to_num(marginal, nan=0.0, posinf=np.finfo(marginal.dtype).max)  # the alive sort first
        marginal[~alive] = -np.inf
        want = min(per_round, m - len(chosen))
        order = np.argsort(-marginal)[: 2 * want + 1]
        took = 0
        for j in order:
            if not alive[j]:
                continue
            row = gain[j]
            fresh = np.maximum(row - best, 0).sum()
            if took == 0 or fresh >= 0.5 * marginal[j]:
                chosen.append(int(j))
                alive[j] = False
                np.maximum(best, row, out=best)
                took += 1
                if took == want:
                    break
    return chosen


def pair_ghosts(gram: torch.Tensor, intrinsic: list[int], rest: list[int],
                per_parent: int) -> tuple[list[int], list[int]]:
    """Assign each non-intrinsic channel to a ghost slot (``per_parent`` slots per intrinsic, in order).

    Minimises the total scalar-fit residual ``g[c, c] - g[c, j]^2 / g[j, j]`` (``gram`` as in
    :func:`select_intrinsic`) with the Hungarian method; in weight space the scalar fit
    bounds the ``d x d`` fit from above. With fewer ghosts than intrinsic maps (a ratio below
    2) any intrinsic map may be a parent; the intrinsic list is reordered so that the parents
    come first, as the cheap op expects. Returns ``(intrinsic, slots)``: the intrinsic channels
    in internal order and the original channel of each ghost slot.
    """
    from scipy.optimize import linear_sum_assignment

    g = gram.double()
    diag = g.diagonal()
    cross = g[rest][:, intrinsic]
    cost = (diag[rest][:, None] - cross**2 / diag[intrinsic].clamp_min(1e-300)[None, :]).cpu().numpy()
    if per_parent == 1 and len(rest) < len(intrinsic):
        rows, cols = linear_sum_assignment(cost)  # each ghost to a distinct intrinsic map
        parents = [intrinsic[c] for c in cols]
        order = parents + [c for c in intrinsic if c not in set(parents)]
        return order, [rest[r] for r in rows]
    cost = cost[:, np.arange(len(rest)) // per_parent] if per_parent > 1 else cost[:, : len(rest)]
    rows, cols = linear_sum_assignment(cost)
    slots = [0] * len(rest)
    for r, c in zip(rows, cols):
        slots[c] = rest[r]
    return list(intrinsic), slots


def fit_dw_kernels(w: torch.Tensor, parents: torch.Tensor, targets: torch.Tensor, d: int, stride,
                   dilation) -> tuple[torch.Tensor, float]:
    """Least-squares ``d x d`` kernels ``K_k`` with ``K_k * w[parents[k]] ~ w[targets[k]]`` in weight space.

    The primary conv has stride ``S`` and dilation ``D``; cheap tap ``v`` applied to its
    output reads the input at ``S*v + D*u`` for primary tap ``u``. With ``P`` a filter
    drawn on the input grid (taps ``D`` apart), the composite is ``sum_v K[v] P(x - S v)``,
    linear in ``K``. Its normal equations need only correlations:

        gram[v, v'] = sum_y P(y) P(y + S (v - v'))      (autocorrelation of the parent)
        rhs[v]      = sum_y P(y) T(y + S (v - r))       (cross-correlation with the target)

    Both filters are zero off the lattice ``D*u``, so a product ``P(y) Q(y + s)`` can be
    non-zero only when the shift ``s`` is a multiple of ``D``, and then the sum is the
    correlation of the *undilated* ``k x k`` kernels at lag ``s / D`` (zero when
    ``|s / D| > k - 1``). The kernels are correlated once at every lag (per filter, the
    channel-summed products of every pair of taps, added up along each lag), and each
    ``(v, v')`` picks its lag: the work grows with the kernel, not with its dilated extent
    (a 3x3 conv at dilation 36 costs what a 3x3 conv costs). All in float64, so the residual
    of a ghost that is an exact multiple of its parent is 0 to ~1e-8.

    Returns the kernels ``(len(parents), d, d)`` and the relative residual over all ghosts.
    """
    import torch.nn.functional as F

    (sh, sw), (dh, dw_), r = tuple(stride), tuple(dilation), d // 2
    wd = w.detach().double()
    n, cin, kh, kw = wd.shape
    if kh == kw == 1:
        # A 1x1 filter: off-centre cheap taps only reach grid points where the target is zero,
        # so they fit to 0 and the centre tap is the scalar fit <w_t, w_p> / |w_p|^2.
        flat = wd.reshape(n, cin)
        wp, wt = flat[parents], flat[targets]
        scale = (wp * wt).sum(1) / (wp * wp).sum(1).clamp_min(1e-30)
        k = wd.new_zeros(len(parents), d, d)
        k[:, r, r] = scale
        tt = (wt * wt).sum()
        err = ((wt - scale[:, None] * wp) ** 2).sum()
        return k, math.sqrt(err.item() / tt.item()) if tt > 0 else 0.0
    g = len(parents)
    if g == 0:
        return wd.new_zeros(0, d, d), 0.0

    # lag index (into a (2kh, 2kw) grid) of every pair of kernel taps (u, u'): l = u' - u, offset by k - 1
    uh, uw = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    uh, uw = uh.reshape(-1), uw.reshape(-1)
    pair_lag = ((uh[None, :] - uh[:, None] + kh - 1) * 2 * kw + uw[None, :] - uw[:, None] + kw - 1).reshape(-1)

    def correlate(a, b):  # (len(a), 2kh, 2kw): c[i, k-1+l] = sum_u a_i(u) b_i(u + l); last row/column 0
        # summed over channels first, one k^2 x k^2 matrix per filter (a batched matmul in float64),
        # then each lag adds up the pairs of taps l apart
        m = torch.bmm(wd[a].flatten(2).transpose(1, 2), wd[b].flatten(2)).reshape(len(a), -1)
        out = wd.new_zeros(len(a), 4 * kh * kw)  # the last row and column stay 0: lags off the lattice or kernel
        return out.index_add_(1, pair_lag, m).reshape(len(a), 2 * kh, 2 * kw)

    def lag(shifts, s, dil, k):  # index into correlate's output for input shifts s*shifts
        x = s * shifts
        ok = (x % dil == 0) & ((x // dil).abs() <= k - 1)
        return torch.where(ok, x // dil + k - 1, torch.full_like(x, 2 * k - 1))

    taps = torch.arange(d)
    cross = correlate(parents, targets)
    rhs = cross[:, lag(taps - r, sh, dh, kh)[:, None], lag(taps - r, sw, dw_, kw)[None, :]].reshape(g, d * d, 1)
    uniq, inv = torch.unique(parents, return_inverse=True)
    auto = correlate(uniq, uniq)
    vh, vw = torch.meshgrid(taps, taps, indexing="ij")
    vh, vw = vh.reshape(-1), vw.reshape(-1)
    gram = auto[:, lag(vh[:, None] - vh[None, :], sh, dh, kh), lag(vw[:, None] - vw[None, :], sw, dw_, kw)][inv]
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
    k = torch.linalg.solve(gram + ridge * torch.eye(d * d, dtype=gram.dtype), rhs)
    tt = (wd[targets] ** 2).sum()
    err = tt - 2 * (k * rhs).sum() + (k.transpose(1, 2) @ gram @ k).sum()
    return k.reshape(g, d, d), math.sqrt(max(err.item(), 0.0) / tt.item()) if tt > 0 else 0.0


from . import calibrate  # noqa: E402,F401  (registers "calib"; imports this module)
