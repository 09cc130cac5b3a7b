"""Calibrated weight transfer (``init="calib"``): fit each Ghost layer to the original's outputs on data.

Sequential by default: layers are fitted in execution order; each layer's input comes
from the partially converted model (so it corrects the error of the layers before it)
and its target is the original conv's output on the original model. Per layer:

1. statistics, streamed over calibration batches at sub-sampled output positions:
   ``A = sum p p^T`` over input patches ``p`` (with a bias 1), ``B = sum p y^T``, and the
   output covariance ``C``;
2. the intrinsic channels and the intrinsic->ghost pairing are chosen on ``C`` (greedy
   facility location + Hungarian for the depthwise form); channels are weighted as the
   BatchNorm after the conv sees them (``weighting="bn"``);
3. the intrinsic filters and biases are refit by ridge least squares ``(A + lI) w = B``; for
   ``mix`` (free channel order) they are the best rank-``m`` map instead (reduced-rank
   regression, channels by pivoted Cholesky); with few rows per unknown the ridge ``l`` is
   chosen by two-fold cross-validation over images;
4. the cheap op is fitted in closed form on the refit intrinsic maps: per ghost a
   ``d x d`` kernel and bias for ``dw``, a linear map for ``mix``.

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

from .errors import GhostifyError
from .modules import GhostConv2d, ghost_macs_per_position
from .transfer import Layer, copy_layer, pair_ghosts, register_init, select_intrinsic

__all__ = ["init_calib", "as_input_batches"]


class _Stop(Exception):
    pass


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


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, batches, what: str) -> list[torch.Tensor]:
    """``module``'s input (``what="input"``) or output on each batch; the forward stops right after."""
    got = []

    def hook(mod, args, output=None):
        got.append((args[0] if what == "input" else output).detach())
        raise _Stop

    handle = (module.register_forward_pre_hook(hook) if what == "input"
              else module.register_forward_hook(hook))
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(got) != len(batches):
        raise GhostifyError("a converted layer was not reached by the forward pass; calibration needs every "
                            "converted conv to run on the calibration inputs")
    return got


def _pads(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) zero padding of ``conv``, 'same'/'valid' included."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size[::-1], conv.dilation[::-1]):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _patches(conv: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor, out_width: int) -> torch.Tensor:
    """Input patches of ``conv`` at output positions ``pos`` (per image), as rows with a trailing 1.

    Gathered tap by tap at the sampled positions only (``F.unfold`` would build every patch);
    the columns are ordered like ``conv.weight.reshape(n, -1)``: channel, then kernel row, column.
    """
    cols = _gather(F.pad(x, _pads(conv, x)), conv.kernel_size, conv.stride, conv.dilation, pos, out_width)
    cols = cols.permute(0, 2, 1).reshape(-1, cols.shape[1])
    return torch.cat([cols, cols.new_ones(len(cols), 1)], 1)


def _gather(xp: torch.Tensor, kernel, stride, dilation, pos: torch.Tensor, out_width: int) -> torch.Tensor:
    """``F.unfold(xp, ...)[:, :, pos]`` for an already padded ``xp``, computed only at ``pos``: ``(N, C*kh*kw, P)``."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    r0, c0 = (pos // out_width) * sh, (pos % out_width) * sw
    taps = [xp[:, :, r0 + i * dh, c0 + j * dw] for i in range(kh) for j in range(kw)]  # each (N, C, P)
    return torch.stack(taps, 2).reshape(len(xp), -1, len(pos))


def _positions(total: int, per_image: int, gen: torch.Generator) -> torch.Tensor:
    return torch.arange(total) if total <= per_image else torch.randperm(total, generator=gen)[:per_image]


def _ridge_solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(a + l I) w = b`` with ``l = ridge * mean(diag a)``; Cholesky (half the work of LU) when it succeeds."""
    reg = a + ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(len(a), dtype=a.dtype)
    chol, bad = torch.linalg.cholesky_ex(reg)
    return torch.linalg.solve(reg, b) if bad.item() else torch.cholesky_solve(b, chol)


def _pivoted_cholesky(cov: torch.Tensor, m: int) -> list[int]:
    """Greedy column-subset selection: each step takes the channel with the largest unexplained variance."""
    n = len(cov)
    resid = cov.diagonal().clone()
    factors = cov.new_zeros(n, m)
    chosen: list[int] = []
    for i in range(m):
        r = resid.clone()
        r[chosen] = -math.inf
        j = int(torch.argmax(r))
        chosen.append(j)
        if resid[j] <= 1e-12 * cov.diagonal().max():
            continue
        col = (cov[:, j] - factors[:, :i] @ factors[j, :i]) / resid[j].sqrt()
        factors[:, i] = col
        resid = (resid - col**2).clamp_min(0)
    return chosen


@register_init("calib")
@torch.no_grad()
def init_calib(original: nn.Module, converted: nn.Module, layers: list[Layer], *, calib_data=None,
               calib_size: int | None = None, sequential: bool = True, refit_intrinsic: bool = True,
               positions: int = 256, ridge: float = 1e-6, holdout: float = 0.2, max_layer_error: float | None = None,
               weighting: str = "bn", channel_weights: dict | None = None, seed: int = 0, **_) -> dict:
    """Fit every layer in ``layers`` to the original model's outputs on ``calib_data`` (see the module doc).

    Args:
        calib_data: an iterable of input batches (tensors or ``(x, y)`` pairs), e.g. a DataLoader.
        calib_size: use at most this many examples.
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
    batches = as_input_batches(calib_data, calib_size)
    dev = next(iter(converted.parameters())).device
    batches = [b.to(dev) for b in batches]
    n_hold = min(len(batches) - 1, max(1, round(holdout * len(batches)))) if holdout > 0 and len(batches) > 1 else 0
    gen = torch.Generator().manual_seed(seed)
    n_fit = len(batches) - n_hold

    scales = _output_scales(converted, layers) if weighting == "bn" else {}
    scales.update(channel_weights or {})

    def fit(layer: Layer, xs: list, ys: list) -> tuple[dict, list]:
        """Fit ``layer`` on batches ``[:n_fit]``, measure on the rest; returns its record and its outputs."""
        scale = scales.get(layer.name, torch.ones(layer.conv.out_channels, dtype=torch.float64))
        rec, outs = _calibrate_layer(layer, xs[:n_fit], ys[:n_fit], xs[n_fit:], ys[n_fit:], positions, ridge,
                                     refit_intrinsic, gen, scale)
        rec["kept_conv"] = bool(max_layer_error is not None
                                and rec.get("heldout_error", rec["calib_error"]) > max_layer_error)
        if rec["kept_conv"]:  # the conv's own outputs (on the converted model's inputs when sequential)
            outs = [layer.conv(x) for x in xs] if sequential else ys
        converted.set_submodule(layer.name, layer.conv if rec["kept_conv"] else layer.ghost)
        return rec, outs

    if isinstance(converted, fx.GraphModule) and _single_input(converted.graph):
        return _lockstep(original, converted, layers, batches, sequential, fit)
    info = {}
    for layer in layers:  # untraced models: two partial forward passes per layer (hooks)
        src = converted if sequential else original
        src_mod = layer.ghost if sequential else original.get_submodule(layer.name)
        info[layer.name] = fit(layer, _capture(src, src_mod, batches, "input"),
                               _capture(original, original.get_submodule(layer.name), batches, "output"))[0]
    return info


def _output_scales(converted: nn.Module, layers) -> dict[str, torch.Tensor]:
    """``|gamma| / sqrt(var + eps)`` of the eval-mode BatchNorm that alone reads a layer's output, by layer name.

    ``layers``: :class:`Layer` objects or names. The scales are in the channel order the BN
    reads (a folded layer's internal order), normalised to mean 1.
    """
    if not isinstance(converted, fx.GraphModule):
        return {}
    names = {getattr(layer, "name", layer) for layer in layers}
    out = {}
    for node in converted.graph.nodes:
        if node.op != "call_module" or node.target not in names or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = converted.get_submodule(user.target) if user.op == "call_module" else None
        if (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
                and bn.running_var is not None and user.args[0] is node):
            gamma = bn.weight.detach().double() if bn.weight is not None else 1.0
            scale = (gamma / (bn.running_var.double() + bn.eps).sqrt()).abs().cpu()
            out[node.target] = scale / scale.mean().clamp_min(1e-30)  # only the channels' relative weights matter
    return out


def _single_input(graph: fx.Graph) -> bool:
    return sum(n.op == "placeholder" for n in graph.nodes) == 1


def _lockstep(original: nn.Module, converted: fx.GraphModule, layers: list[Layer], batches, sequential: bool,
              fit) -> dict:
    """One pass over the converted graph that computes every node for the original and the converted model.

    Each node's value is kept (per batch) for both models until its last user has run, so
    every layer is fitted as soon as its input exists: the cost is one forward of each model,
    not one partial forward per layer. Values of modules that were not converted are computed
    with the original's module for the original and the converted model's own for the other.
    """
    by_name = {layer.name: layer for layer in layers}
    nodes = list(converted.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    env_o: dict[fx.Node, list] = {}
    env_c: dict[fx.Node, list] = {}
    info = {}

    def run(node, env, root, b):
        args = fx.node.map_arg(node.args, lambda n: env[n][b])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][b])
        if node.op == "call_module":
            return root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise AssertionError(node.op)

    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            env_o[node], env_c[node] = list(batches), [b.clone() for b in batches]
        elif node.op == "get_attr":
            env_o[node] = [_fetch(original, node.target)] * len(batches)
            env_c[node] = [_fetch(converted, node.target)] * len(batches)
        elif node.op == "call_module" and node.target in by_name:
            layer = by_name[node.target]
            env_o[node] = [run(node, env_o, original, b) for b in range(len(batches))]
            xs = [fx.node.map_arg(node.args, lambda n: (env_c if sequential else env_o)[n][b])[0]
                  for b in range(len(batches))]
            info[layer.name], env_c[node] = fit(layer, xs, env_o[node])
        else:
            env_o[node] = [run(node, env_o, original, b) for b in range(len(batches))]
            env_c[node] = [run(node, env_c, converted, b) for b in range(len(batches))]
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i:
                del env_o[arg], env_c[arg]
    return info


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _calibrate_layer(layer: Layer, xs, ys, hx, hy, positions, ridge, refit, gen, scale) -> tuple[dict, list]:
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
        _fit_layer(layer.conv, ghost, xs, ys, positions, ridge, refit, gen, layer.fixed_order, scale)
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
    w = scale.float().to(ys[0].device)[None, :, None, None] ** 2
    num = sum((w * (o - y) ** 2).sum().item() for o, y in zip(outs, ys))
    den = sum((w * y**2).sum().item() for y in ys)
    return math.sqrt(num / den) if den > 0 else 0.0


def _fit_layer(conv: nn.Conv2d, ghost: GhostConv2d, xs, ys, positions: int, ridge: float, refit: bool,
               gen: torch.Generator, fixed_order: bool = False, scale: torch.Tensor | None = None) -> None:
    n, m = ghost.out_channels, ghost.intrinsic_channels
    if ghost.cheap is None:
        copy_layer(conv, ghost, fixed_order)
        return
    d_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    a = torch.zeros(2, d_in, d_in, dtype=torch.float64)  # two halves of the images, for choosing the ridge
    b = torch.zeros(2, d_in, n, dtype=torch.float64)
    yy = torch.zeros(n, n, dtype=torch.float64)
    ysum = torch.zeros(n, dtype=torch.float64)
    count = 0
    pos_per_batch = []
    for x, y in zip(xs, ys):
        pos = _positions(y.shape[2] * y.shape[3], positions, gen)
        pos_per_batch.append(pos)
        # products in float32 (the bulk of the time, 2x faster than float64), sums in float64
        p = _patches(conv, x.cpu().float(), pos, y.shape[3])
        t = y.flatten(2)[:, :, pos].permute(0, 2, 1).reshape(-1, n).cpu().float()
        half = (torch.arange(len(p)) // len(pos) + count // len(pos)) % 2  # rows are image-major
        for k in (0, 1):
            pk, tk = p[half == k], t[half == k]
            a[k] += (pk.T @ pk).double()
            b[k] += (pk.T @ tk).double()
        yy += (t.T @ t).double()
        ysum += t.double().sum(0)
        count += len(t)
    mean = ysum / count
    scale = torch.ones(n, dtype=torch.float64) if scale is None else scale.double()
    cov = (yy / count - torch.outer(mean, mean)) * torch.outer(scale, scale)  # as the next BN sees it
    has_bias = conv.bias is not None
    if not has_bias:  # no bias in the layer: fit without the intercept column
        a, b = a[:, :-1, :-1], b[:, :-1]
    dw_ridge = ridge  # a d x d kernel has few unknowns; the chosen ridge is for the filters and the mix
    if refit and count < _CV_ROWS * len(a[0]):  # few rows per unknown: choose the ridge on the other half
        ridge = _choose_ridge(a, b, scale, ridge)
    a, b = a.sum(0), b.sum(0)
    rank_reduced = refit and ghost.cheap_kind == "mix" and ghost.cheap.mix.groups == 1 and not fixed_order
    if rank_reduced:
        w_i, intrinsic = _reduced_rank(a, b, m, scale, ridge, count, has_bias)
    else:
        if fixed_order:
            intrinsic = list(range(m))
        elif ghost.cheap_kind == "mix":
            intrinsic = _pivoted_cholesky(cov, m)
        else:
            intrinsic = select_intrinsic(cov.float(), m)
        if refit:  # only the intrinsic filters are refit
            w_i = _ridge_solve(a, b[:, intrinsic], ridge)
        else:
            w_i = conv.weight.detach().reshape(n, -1).T.double()[:, intrinsic]
            if has_bias:
                w_i = torch.cat([w_i, conv.bias.detach().double()[None, intrinsic]])
    if not has_bias:
        w_i = torch.cat([w_i, a.new_zeros(1, m)])
    slots = sorted(set(range(n)) - set(intrinsic))
    if ghost.cheap_kind != "mix" and not fixed_order:
        order, slots = pair_ghosts(cov.float(), intrinsic, slots, ghost.cheap.per_parent)
        w_i = w_i[:, [intrinsic.index(c) for c in order]]
        intrinsic = order
    prim = ghost.primary
    prim.weight.copy_(w_i[:-1].T.reshape(prim.weight.shape).to(prim.weight.dtype))
    if prim.bias is not None:
        prim.bias.copy_(w_i[-1].to(prim.bias.dtype))
    if ghost.cheap_kind == "mix":
        _fit_mix(ghost, prim, xs, ys, pos_per_batch, intrinsic, slots, ridge)
    else:
        _fit_dw(ghost, prim, xs, ys, pos_per_batch, intrinsic, slots, dw_ridge)
    ghost.set_channel_map(torch.as_tensor(intrinsic + slots))


_CV_ROWS = 100  # below this many rows per unknown, the ridge is chosen by two-fold cross-validation
_RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def _choose_ridge(a, b, scale, ridge: float) -> float:
    """The ridge (from ``ridge`` and :data:`_RIDGES`) whose fit on one half of the images best predicts the other.

    ``a[k], b[k]`` are the normal equations of half ``k``; the error of a fit ``W`` on half ``o``
    is ``tr(W^T A_o W) - 2 tr(W^T B_o)`` (plus a constant), channels weighted by ``scale``.
    """
    w2 = (scale**2)[None, :]
    best = (math.inf, ridge)
    for lam in sorted({ridge, *_RIDGES}):
        err = 0.0
        for k in (0, 1):
            w = _ridge_solve(a[k], b[k], lam)
            o = 1 - k
            err += (((a[o] @ w) * w - 2 * b[o] * w) * w2).sum().item()
        best = min(best, (err, lam))
    return best[1]


def _reduced_rank(a, b, m: int, scale, ridge: float, count: int, centred: bool) -> tuple[torch.Tensor, list[int]]:
    """Intrinsic filters and channels for ``mix``: the best rank-``m`` linear map, in the BN-weighted metric.

    The full least-squares fit ``W`` predicts all ``n`` channels; the top ``m`` principal
    directions ``U`` of its weighted predictions (centred when the mix's bias can carry the
    mean) give the rank-``m`` map ``W S U U^T S^-1``, which any ``m`` channels whose rows of ``U``
    are independent can carry, the rest being linear mixes of them. The channels are chosen by
    pivoted Cholesky on ``U U^T`` (greedy maximal volume), which keeps the mixing weights small.
    """
    w = _ridge_solve(a, b, ridge)  # (d, n)
    ws = w * scale[None, :]
    second = a / count
    if centred:  # the last row of ``a`` sums the patches (their trailing 1)
        mu = a[-1] / count
        second = second - torch.outer(mu, mu)
    pred = ws.T @ second @ ws  # (n, n): covariance of the weighted predictions
    u = torch.linalg.eigh(pred)[1][:, -m:]
    intrinsic = _pivoted_cholesky(u @ u.T, m)
    proj = (scale[:, None] * u) @ (u.T / scale[None, :])  # S U U^T S^-1
    w_r = w @ proj
    if centred:  # project only the variation: (P w - mean) proj + mean
        w_r[-1] += mu @ w - (mu @ w) @ proj
    return w_r[:, intrinsic], intrinsic


def _fit_dw(ghost, prim, xs, ys, pos_per_batch, intrinsic, slots, ridge) -> None:
    """Per ghost slot ``k`` (parent ``p``): ``y_slot ~ K_k * z_p + c_k`` over d x d patches of the intrinsic map."""
    d = ghost.dw_size
    parents = ghost.cheap.parents()
    g = len(slots)
    q = d * d + 1
    a = torch.zeros(g, q, q, dtype=torch.float64)
    b = torch.zeros(g, q, dtype=torch.float64)
    for x, y, pos in zip(xs, ys, pos_per_batch):
        z = prim(x)
        zc = _gather(F.pad(z, (d // 2,) * 4), (d, d), (1, 1), (1, 1), pos, z.shape[3])  # (N, m*d*d, P)
        zc = zc.reshape(len(z), z.shape[1], d * d, -1)[:, parents]  # (N, g, d*d, P)
        zc = torch.cat([zc, zc.new_ones(zc.shape[0], g, 1, zc.shape[-1])], 2).float()
        t = y.flatten(2)[:, slots][:, :, pos].float()  # (N, g, P)
        a += torch.einsum("ngip,ngjp->gij", zc, zc).double()
        b += torch.einsum("ngip,ngp->gi", zc, t).double()
    lam = ridge * a.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    sol = torch.linalg.solve(a + lam[:, None, None] * torch.eye(q, dtype=a.dtype), b[..., None])[..., 0]
    dw = ghost.cheap.conv
    dw.weight.zero_()
    dw.weight[:g, 0] = sol[:, :-1].reshape(g, d, d).to(dw.weight.dtype)
    _set_ghost_bias(ghost, dw, sol[:, -1], g)


def _fit_mix(ghost, prim, xs, ys, pos_per_batch, intrinsic, slots, ridge) -> None:
    """``y_ghosts ~ M z + c`` over the intrinsic maps at sampled positions (ridge least squares)."""
    m = len(intrinsic)
    a = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    b = torch.zeros(m + 1, len(slots), dtype=torch.float64)
    for x, y, pos in zip(xs, ys, pos_per_batch):
        z = prim(x).flatten(2)[:, :, pos].permute(0, 2, 1).reshape(-1, m).float()
        z = torch.cat([z, z.new_ones(len(z), 1)], 1)
        t = y.flatten(2)[:, slots][:, :, pos].permute(0, 2, 1).reshape(-1, len(slots)).float()
        a += (z.T @ z).double()
        b += (z.T @ t).double()
    sol = _ridge_solve(a, b, ridge)
    ghost.cheap.load_mix(sol[:-1].T)
    _set_ghost_bias(ghost, ghost.cheap.mix, sol[-1], len(slots))


def _set_ghost_bias(ghost: GhostConv2d, conv: nn.Conv2d, bias: torch.Tensor, g: int) -> None:
    conv.bias.data.zero_()  # calib layers are built with a cheap-op bias (init_calib.cheap_bias)
    conv.bias.data[:g] = bias.to(conv.bias.dtype)
