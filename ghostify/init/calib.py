"""Calibrated weight transfer (``init="calib"``): fit each Ghost layer to the original's outputs on data.

Sequential by default: layers are fitted in execution order; each layer's input comes
from the partially converted model (so it corrects the error of the layers before it)
and its target is the original conv's output on the original model. Per layer:

1. statistics, streamed over calibration batches at sub-sampled output positions (where
   every position is sampled, from shifted products of the whole input, without gathering):
   ``A = sum p p^T`` over input patches ``p`` (with a bias 1), ``B = sum p y^T``, and the
   output covariance ``C``;
2. the intrinsic channels and the intrinsic->ghost pairing are chosen on ``C`` (greedy
   facility location + Hungarian for the depthwise form); channels are weighted as the
   BatchNorm after the conv sees them (``weighting="bn"``);
3. the intrinsic filters and biases are refit by ridge least squares ``(A + lI) w = B``; for
   ``mix`` (free channel order) they are the best rank-``m`` map instead (reduced-rank
   regression, channels by pivoted Cholesky); with few rows per unknown the ridge ``l`` is
   chosen by two-fold cross-validation over images (for large layers once per layer shape);
4. the cheap op is fitted in closed form on the refit intrinsic maps: per ghost a
   ``d x d`` kernel and bias for ``dw``, a linear map for ``mix`` (from the normal equations of
   step 1 projected on the intrinsic filters: no second pass over the data).

The last ``holdout`` fraction of the calibration batches is never used for fitting; each
layer's relative output error is measured on it and recorded (``heldout_error``), and a
layer whose error exceeds ``max_layer_error`` is kept as its original conv.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._util import capture
from ..augment import augmented_views
from ..errors import GhostifyError
from ..layers import GhostConv2d, ghost_macs_per_position
from ..graph import bn_output_scales
from .lockstep import Lockstep, check_memory
from .fitting import (CV_ROWS, choose_ridge, pair_ghosts, pivoted_cholesky, reduced_rank, ridge_solve,
                      select_intrinsic, windows)
from .registry import Layer, register_init
from .statistics import accumulate, normal_equations, output_rows
from .transfer import copy_layer

__all__ = ["init_calib", "as_input_batches", "fit_layer", "Lockstep"]


def as_input_batches(data: Iterable, limit: int | None = None) -> list[torch.Tensor]:
    """The input tensors of ``data`` (tensors or ``(x, y)`` pairs), up to ``limit`` examples."""
    out, seen = [], 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise GhostifyError(f"calibration data must yield tensors or (x, y) pairs, got {type(x).__name__}")
        if limit is not None and seen + len(x) > limit:
            x = x[: limit - seen]
        if len(x):
            out.append(x)
            seen += len(x)
        if limit is not None and seen >= limit:
            break
    if not out:
        raise GhostifyError("calibration data is empty; pass calib_data= a DataLoader or iterable of input batches")
    return out


def calibration_batches(data: Iterable, limit: int | None = None, augment: int = 0,
                        seed: int = 0) -> list[torch.Tensor]:
    """The input tensors of ``data`` (up to ``limit`` examples) and ``augment`` augmented views of them, their
    batches interleaved evenly (the held-out share of the batches then holds both)."""
    batches = as_input_batches(data, limit)
    if not augment:
        return batches
    if any(b.dim() != 4 for b in batches):
        raise GhostifyError(f"calib_augment varies images, (N, C, H, W) batches; this calibration data has "
                            f"{tuple(batches[0].shape)}: leave calib_augment at 0")
    views = augmented_views(batches, augment, seed=seed, batch_size=len(batches[0]))
    order = sorted([((i + 0.5) / len(batches), 0, b) for i, b in enumerate(batches)]
                   + [((i + 0.5) / len(views), 1, v) for i, v in enumerate(views)], key=lambda t: t[:2])
    return [b for *_, b in order]


def _capture(model: nn.Module, module: nn.Module, batches, what: str) -> list[torch.Tensor]:
    """``module``'s input (``what="input"``) or output on each batch; each forward stops right after."""
    got = [capture(model, {"m": module}, x, what=what, stop=True).get("m") for x in batches]
    if any(g is None for g in got):
        raise GhostifyError("a converted layer was not reached by the forward pass; calibration needs every "
                            "converted conv to run on the calibration inputs")
    return got


@register_init("calib")
@torch.no_grad()
def init_calib(original: nn.Module, converted: nn.Module, layers: list[Layer], *, calib_data=None,
               calib_size: int | None = None, calib_augment: int = 0, sequential: bool = True,
               refit_intrinsic: bool = True, positions: int = 256, ridge: float = 1e-6, holdout: float = 0.2,
               max_layer_error: float | None = None, weighting: str = "bn", channel_weights: dict | None = None,
               seed: int = 0, **_) -> dict:
    """Fit every layer in ``layers`` to the original model's outputs on ``calib_data`` (see the module doc).

    Args:
        calib_data: an iterable of input batches (tensors or ``(x, y)`` pairs), e.g. a DataLoader.
        calib_size: use at most this many examples.
        calib_augment: fit on this many augmented views of the examples too (random crops, flips, colour
            jitter, mixing; :func:`~ghostify.augment.augmented_views`), interleaved with them. With few images
            the fit otherwise matches the original on them far better than on other images.
        sequential: take each layer's input from the partially converted model (default) or,
            if False, from the original model (each layer fitted alone).
        refit_intrinsic: refit the intrinsic filters by least squares (else copy them).
        positions: output positions sampled per image for the statistics.
        ridge: ridge strength, relative to the mean diagonal of the normal matrix.
        holdout: fraction of the batches kept out of fitting to measure each layer's error.
        max_layer_error: keep a layer as its original conv when its held-out relative error exceeds this.
        weighting: ``"bn"`` (default) measures and fits each output channel as the BatchNorm that
            reads it will see it, scaled by ``|gamma| / sqrt(var + eps)``; ``"none"`` uses the raw
            conv outputs. Without it a channel of tiny raw variance that BN blows up to unit scale
            is neglected by the channel choice and the errors.
        channel_weights: ``{layer name: (out_channels,) tensor}`` used instead of reading the BN
            (for layers fitted outside their model, e.g. by :func:`ghostify.sensitivity`).

    Layers planned with ``cheap="auto"`` are fitted twice, with the planned depthwise op and
    with ``mix`` (1x1 from the intrinsic maps, no depthwise after it); the one with the lower
    held-out error times MACs is kept, and ``"cheap"`` in its record says which.

    Returns ``{name: {"heldout_error", "calib_error", "kept_conv"[, "cheap"]}}``.

    Example:
        >>> import torch, torchvision, ghostify
        >>> model = torchvision.models.resnet18().eval()
        >>> data = [torch.randn(8, 3, 64, 64) for _ in range(3)]
        >>> ghost = ghostify.convert(model, init="calib", calib_data=data)
        >>> sorted(ghost.ghostify_info.layer_info["layer1.0.conv1"])
        ['calib_error', 'heldout_error', 'kept_conv']
    """
    if calib_data is None:
        raise GhostifyError("init='calib' needs calibration data: convert(..., init='calib', calib_data=loader) "
                            "or --calib-data on the command line")
    if any(original.get_submodule(l.name) is l.ghost for l in layers):
        raise GhostifyError("init='calib' needs the unmodified original model; convert with inplace=False")
    if weighting not in ("bn", "none"):
        raise GhostifyError(f"weighting={weighting!r} is not known; use 'bn' or 'none'")
    batches = calibration_batches(calib_data, calib_size, calib_augment, seed)
    dev = next(iter(converted.parameters())).device
    # channels-last activations: the CPU convs run about 1.3x faster on them (the weights are left as they are)
    batches = [b.to(dev).contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b.to(dev)
               for b in batches]
    n_hold = min(len(batches) - 1, max(1, round(holdout * len(batches)))) if holdout > 0 and len(batches) > 1 else 0
    gen = torch.Generator().manual_seed(seed)
    n_fit = len(batches) - n_hold

    scales = bn_output_scales(converted, layers) if weighting == "bn" else {}
    scales.update(channel_weights or {})
    ridges: dict = {}  # the cross-validated ridge of each layer shape: chosen once, for its first layer

    def fit(layer: Layer, xs: list, ys: list) -> tuple[dict, list]:
        """Fit ``layer`` on batches ``[:n_fit]``, measure on the rest; returns its record and its outputs."""
        scale = scales.get(layer.name, torch.ones(layer.conv.out_channels, dtype=torch.float64))
        rec, outs = _calibrate_layer(layer, xs[:n_fit], ys[:n_fit], xs[n_fit:], ys[n_fit:], positions, ridge,
                                     refit_intrinsic, gen, scale, ridges)
        rec["kept_conv"] = bool(max_layer_error is not None
                                and rec.get("heldout_error", rec["calib_error"]) > max_layer_error)
        if rec["kept_conv"]:  # the conv's own outputs (on the converted model's inputs when sequential)
            outs = [layer.conv(x) for x in xs] if sequential else ys
        converted.set_submodule(layer.name, layer.conv if rec["kept_conv"] else layer.ghost)
        return rec, outs

    if isinstance(converted, fx.GraphModule) and _single_input(converted.graph):
        check_memory(original, batches, [layer.name for layer in layers])
        return Lockstep(original, converted, layers, batches, sequential, fit).fit_all()
    info = {}
    for layer in layers:  # untraced models: two partial forward passes per layer (hooks)
        src = converted if sequential else original
        src_mod = layer.ghost if sequential else original.get_submodule(layer.name)
        info[layer.name] = fit(layer, _capture(src, src_mod, batches, "input"),
                               _capture(original, original.get_submodule(layer.name), batches, "output"))[0]
    return info


def _single_input(graph: fx.Graph) -> bool:
    return sum(n.op == "placeholder" for n in graph.nodes) == 1


def _calibrate_layer(layer: Layer, xs, ys, hx, hy, positions, ridge, refit, gen, scale,
                     ridges: dict | None = None) -> tuple[dict, list]:
    """Fit ``layer.ghost`` (and, for ``cheap="auto"``, a ``mix`` candidate that may replace it) on ``xs -> ys``.

    Returns the record and the chosen layer's outputs on ``xs + hx``.
    """
    candidates = [layer.ghost]
    if layer.cheap_auto and layer.ghost.cheap is not None:
        mix = GhostConv2d.from_conv(layer.conv, layer.ghost.ratio, 1, "mix", cheap_bias=True)
        if _cost(layer.conv, mix) <= layer.conv.weight.numel():  # not where mixing costs more than the conv
            candidates.append(mix)
    scored = []
    for ghost in candidates:
        fit_layer(layer.conv, ghost, xs, ys, positions, ridge, refit, gen, layer.fixed_order, scale, ridges)
        outs = [ghost(x) for x in xs + hx]
        rec = {"calib_error": _rel_error(outs[:len(xs)], ys, scale)}
        if hx:
            rec["heldout_error"] = _rel_error(outs[len(xs):], hy, scale)
        scored.append((rec.get("heldout_error", rec["calib_error"]) * _cost(layer.conv, ghost), ghost, rec, outs))
    _, ghost, rec, outs = min(scored, key=lambda t: t[0])
    if layer.cheap_auto:
        rec["cheap"] = {"cheap": ghost.cheap_kind, "dw_size": ghost.dw_size,
                        "scores": {g.cheap_kind: s for s, g, *_ in scored}}
    layer.ghost = ghost
    return rec, outs


def _cost(conv: nn.Conv2d, ghost: GhostConv2d) -> int:
    """Multiply-adds per output position of ``ghost`` (the plan's formula, so both agree)."""
    return ghost_macs_per_position(conv.in_channels, conv.out_channels, conv.kernel_size, ghost.ratio,
                                   ghost.dw_size, ghost.cheap_kind)[0]


init_calib.cheap_bias = True  # the ghosts' fitted intercepts need a bias in the cheap op
init_calib.chooses_cheap = True  # supports cheap="auto"


def _rel_error(outs, ys, scale: torch.Tensor) -> float:
    """``||outs - ys|| / ||ys||`` with each channel weighted by ``scale``."""
    w = scale.double().to(ys[0].device) ** 2
    num = sum(_channel_energy(o - y) @ w for o, y in zip(outs, ys)).item()
    den = sum(_channel_energy(y) @ w for y in ys).item()
    return math.sqrt(num / den) if den > 0 else 0.0


def _channel_energy(y: torch.Tensor) -> torch.Tensor:
    """Sum of squares per channel of ``(N, C, H, W)`` ``y``, in float64 (summed in ``y``'s precision)."""
    if y.is_contiguous(memory_format=torch.channels_last):  # channels innermost: column sums, 3x faster
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).square().sum(0).double()
    return torch.linalg.vector_norm(y, dim=(0, 2, 3)).double() ** 2


RIDGE_MEMO_SIZE = 1024  # layers with at least this many unknowns per output reuse the ridge of their shape


def fit_layer(conv: nn.Conv2d, ghost: GhostConv2d, xs, ys, positions: int = 256, ridge: float = 1e-6,
              refit: bool = True, gen: torch.Generator | None = None, fixed_order: bool = False,
              scale: torch.Tensor | None = None, ridges: dict | None = None) -> None:
    """Fit ``ghost`` (made from ``conv`` by ``GhostConv2d.from_conv``) so that it maps the inputs ``xs`` to
    ``conv``'s outputs ``ys`` (lists of batches), in place.

    Steps 1-4 of the module doc for one layer: normal equations from ``positions`` sampled output
    positions per image (``gen`` draws them), the intrinsic channels chosen on the output
    covariance (weighted per channel by ``scale``, as the next BN sees them), the intrinsic
    filters refit by ridge least squares (``refit``; the ridge chosen by cross-validation over
    the two halves of the images when rows are few; ``ridges``, a dict shared by the layers of one
    model, keeps the choice per layer shape, so that the large layers (:data:`RIDGE_MEMO_SIZE`
    unknowns or more, where the factorisations cost most) of the same shape on the same data reuse
    the first one's), then the cheap op fitted in closed form.
    ``fixed_order`` keeps intrinsic channels ``0..m-1`` (the identity layout of
    :class:`~ghostify.init.registry.Layer`). A ghost without a cheap op (ratio 1) is copied.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ghostify import GhostConv2d
        >>> conv = nn.Conv2d(4, 8, 3, padding=1)
        >>> ghost = GhostConv2d.from_conv(conv, 2, 1, "mix", cheap_bias=True)
        >>> xs = [torch.randn(2, 4, 8, 8)]
        >>> with torch.no_grad():
        ...     fit_layer(conv, ghost, xs, [conv(x) for x in xs])
        >>> ghost(xs[0]).shape
        torch.Size([2, 8, 8, 8])
    """
    n, m = ghost.out_channels, ghost.intrinsic_channels
    if ghost.cheap is None:
        copy_layer(conv, ghost, fixed_order)
        return
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    a, b, yy, ysum, count, pos_per_batch = normal_equations(conv, xs, ys, positions, gen)
    mean = ysum / count
    scale = torch.ones(n, dtype=torch.float64) if scale is None else scale.double()
    scale = scale.to(a.device)
    cov = (yy / count - torch.outer(mean, mean)) * torch.outer(scale, scale)  # as the next BN sees it
    has_bias = conv.bias is not None
    a_full, b_full = a.sum(0), b.sum(0)  # with the intercept column, for the mix
    if not has_bias:  # no bias in the layer: fit without the intercept column
        a, b = a[:, :-1, :-1], b[:, :-1]
    dw_ridge = ridge  # a d x d kernel has few unknowns; the chosen ridge is for the filters and the mix
    if refit and count < CV_ROWS * len(a[0]):  # few rows per unknown: choose the ridge on the other half
        memo = {} if ridges is None or len(a[0]) < RIDGE_MEMO_SIZE else ridges
        key = (tuple(a.shape), tuple(b.shape), count, ghost.cheap_kind, m, ridge)
        if key not in memo:
            memo[key] = choose_ridge(a, b, scale, ridge)
        ridge = memo[key]
    a, b = a.sum(0), b.sum(0)
    if refit and ghost.cheap_kind == "mix" and ghost.cheap.mix.groups == 1:  # the best rank-m map
        w_i, intrinsic = reduced_rank(a, b, m, scale, ridge, count, has_bias, fixed_order)
    else:
        if fixed_order:
            intrinsic = list(range(m))
        elif ghost.cheap_kind == "mix":
            intrinsic = pivoted_cholesky(cov, m)
        else:
            intrinsic = select_intrinsic(cov.float().cpu(), m)
        if refit:  # only the intrinsic filters are refit
            w_i = ridge_solve(a, b[:, intrinsic], ridge)
        else:
            w_i = conv.weight.detach().reshape(n, -1).T.double()[:, intrinsic]
            if has_bias:
                w_i = torch.cat([w_i, conv.bias.detach().double()[None, intrinsic]])
    if not has_bias:
        w_i = torch.cat([w_i, a.new_zeros(1, m)])
    slots = sorted(set(range(n)) - set(intrinsic))
    if ghost.cheap_kind != "mix" and not fixed_order:
        order, slots = pair_ghosts(cov.float().cpu(), intrinsic, slots, ghost.cheap.per_parent)
        w_i = w_i[:, [intrinsic.index(c) for c in order]]
        intrinsic = order
    prim = ghost.primary
    prim.weight.copy_(w_i[:-1].T.reshape(prim.weight.shape).to(prim.weight.dtype))
    if prim.bias is not None:
        prim.bias.copy_(w_i[-1].to(prim.bias.dtype))
    if ghost.cheap_kind == "mix":
        _fit_mix(ghost, a_full, b_full, w_i, slots, ridge)
    else:
        _fit_dw(ghost, prim, xs, ys, pos_per_batch, intrinsic, slots, dw_ridge)
    ghost.set_channel_map(torch.as_tensor(intrinsic + slots))


def _fit_dw(ghost, prim, xs, ys, pos_per_batch, intrinsic, slots, ridge) -> None:
    """Per ghost slot ``k`` (parent ``p``): ``y_slot ~ K_k * z_p + c_k`` over d x d patches of the intrinsic map."""
    d = ghost.dw_size
    parents = ghost.cheap.parents()
    g = len(slots)
    q = d * d + 1
    a = torch.zeros(g, q, q, dtype=torch.float64, device=prim.weight.device)
    b = torch.zeros(g, q, 1, dtype=torch.float64, device=prim.weight.device)
    for x, y, pos in zip(xs, ys, pos_per_batch):
        z = F.pad(prim(x)[:, parents], (d // 2,) * 4)
        zc = windows(z, (d, d), (1, 1), (1, 1), pos, z.shape[3] - d + 1, channels_first=True)  # (g, N, P, d, d)
        accumulate(a, b, zc.reshape(g, -1, d * d).float(), output_rows(y, pos, channels=slots).T[..., None])
    lam = ridge * a.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    a.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    sol = torch.linalg.solve(a, b)[..., 0]
    dw = ghost.cheap.conv
    dw.weight.zero_()
    dw.weight[:g, 0] = sol[:, :-1].reshape(g, d, d).to(dw.weight.dtype)
    _set_ghost_bias(ghost, dw, sol[:, -1], g)


def _fit_mix(ghost, a: torch.Tensor, b: torch.Tensor, w_i: torch.Tensor, slots, ridge) -> None:
    """``y_ghosts ~ M z + c`` over the intrinsic maps ``z = [p 1] w_i`` at the sampled positions (ridge least
    squares), from the layer's normal equations ``a``, ``b`` (patches with their trailing 1): the intrinsic
    maps' own equations are ``T^T a T`` and ``T^T b`` with ``T = [w_i e]`` (``e`` picks the trailing 1),
    so no forward pass is needed and the sums are the float64 ones of the patches."""
    t = torch.cat([w_i, torch.zeros_like(w_i[:, :1])], 1)
    t[-1, -1] = 1
    sol = ridge_solve(t.T @ a @ t, t.T @ b[:, slots], ridge)
    ghost.cheap.load_mix(sol[:-1].T)
    _set_ghost_bias(ghost, ghost.cheap.mix, sol[-1], len(slots))


def _set_ghost_bias(ghost: GhostConv2d, conv: nn.Conv2d, bias: torch.Tensor, g: int) -> None:
    conv.bias.data.zero_()  # calib layers are built with a cheap-op bias (init_calib.cheap_bias)
    conv.bias.data[:g] = bias.to(conv.bias.dtype)
