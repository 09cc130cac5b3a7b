"""The peers of ``benchmarks/peers.py``, each with its own library: channel pruning (Torch-Pruning), low-rank
decomposition (tensorly), and what every method shares: BN recalibration, short distillation, ONNX export and
ONNX Runtime timing, matching a MACs target by bisection.

Needs the ``peers`` extra (``pip install -e '.[peers]'``: ``torch-pruning==1.6.1``, ``tensorly``) and
onnxruntime. Uses ghostify's public API, and where a peer must do as ghostify does, the module that does it
(``ghostify.conversion.tracing`` finds the stem low-rank leaves whole; ``ghostify.deploy.export``,
``ghostify.train.distill``).

- :func:`prune`: Torch-Pruning's ``BasePruner`` (``MetaPruner`` in its older docs) with one of its importances,
  layer-wise (every layer loses the same fraction of channels) or global, the given layers ignored.
- :func:`taylor_gradients`: the gradients ``TaylorImportance`` reads (CE on labels, CE on the original's own
  top-1 for unlabelled images, or the output energy of a feature trunk).
- :func:`bn_recalibrate`: BatchNorm statistics re-estimated on calibration images (no weight changes).
- :func:`lowrank`: Tucker-2 (``tensorly.decomposition.partial_tucker`` on the (out, in) modes) of each kxk conv
  and truncated SVD (``tensorly.tenalg.svd_interface``) of each 1x1 conv, as in jacobgil's
  pytorch-tensor-decompositions, every decomposed conv at the same fraction of its MACs; data-free. The stem
  (the convs on the input) stays whole, as ghostify and the pruners leave it.
- :func:`refit_last_factors`: a least-squares refit of each decomposition's last 1x1 factor (and bias) to the
  original conv's output on calibration images, layer after layer in the order they run.
- :func:`onnx_bytes` / :func:`ort_latency`: a local export + timing helper (TorchScript exporter, opset 17,
  ORT_ENABLE_ALL, fixed intra-op threads, models alternating, median); ``peers.py --export local`` uses it instead of ``ghostify.export``.
- :func:`kd_finetune`: one distillation recipe for every student (logit KD with ghostify's loss; the MNIST
  recipe, or ``ghostify.distill``'s optimiser, schedule and augmentation on photos).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import statistics
import time
import warnings
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["require_peers", "versions", "bisect", "prune", "taylor_gradients", "bn_recalibrate", "lowrank",
           "refit_last_factors", "onnx_bytes", "ort_latency", "kd_finetune", "has_bn"]


def require_peers():
    """``(torch_pruning, tensorly)``; one line naming the install command when they are missing."""
    try:
        import tensorly
        import torch_pruning
    except ImportError as exc:
        raise SystemExit(f"benchmarks/peers.py needs the peers extra ({exc.name} is missing): "
                         "pip install -e '.[peers]'") from None
    return torch_pruning, tensorly


def versions() -> dict[str, str]:
    """The exact versions that matter to the comparison."""
    from importlib.metadata import PackageNotFoundError, version

    import ghostify

    out = {}
    for dist in ("torch", "torchvision", "torch-pruning", "tensorly", "onnx", "onnxruntime", "fvcore", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    out["ghostify"] = ghostify.__version__
    return out


# -- matching a MACs target ------------------------------------------------------------------------


def bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, *, increasing: bool,
           tol: float = 0.004, steps: int = 12) -> tuple[float, float]:
    """``(x, fn(x))`` with ``fn(x)`` closest to ``target`` found by bisection of ``x`` in ``[lo, hi]``.

    ``fn`` is monotone (``increasing`` or not) but may be a step function (channel counts are
    integers); it stops once within ``tol`` of the target.

    Example:
        >>> x, y = bisect(lambda x: x * x, 0.25, 0.0, 1.0, increasing=True, tol=1e-3)
        >>> round(x, 2), abs(y - 0.25) <= 1e-3
        (0.5, True)
    """
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        value = fn(mid)
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (mid, value)
        if abs(value - target) <= tol:
            break
        if (value < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


# -- channel pruning: Torch-Pruning ----------------------------------------------------------------


def prune(model: nn.Module, example: torch.Tensor, *, importance: str, global_pruning: bool, ratio: float,
          ignored: Callable[[nn.Module], list[nn.Module]], grads: dict[str, torch.Tensor] | None = None,
          round_to: int | None = None) -> nn.Module:
    """A copy of ``model`` with Torch-Pruning's ``BasePruner`` applied once at ``pruning_ratio=ratio``.

    ``importance``: ``"l1"`` (``MagnitudeImportance(p=1)``), ``"taylor"`` (``TaylorImportance()``, reads
    ``grads``: parameter name -> gradient) or ``"bn"`` (``BNScaleImportance()``). ``ignored(copy)`` lists the
    layers to leave whole (the classifier, as Torch-Pruning's README does). ``round_to``: keep every pruned
    layer's channels a multiple of it (the README's recommendation "for acceleration"; default: none).
    Everything else is the library's default (one step, ``max_pruning_ratio=1``).
    """
    tp, _ = require_peers()
    imp = {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "taylor": tp.importance.TaylorImportance,
           "bn": tp.importance.BNScaleImportance}[importance]()
    work = copy.deepcopy(model).eval()
    if importance == "taylor":
        for name, p in work.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(work, example, importance=imp, global_pruning=global_pruning,
                                      pruning_ratio=ratio, ignored_layers=ignored(work), round_to=round_to)
        pruner.step()
    for p in work.parameters():
        p.grad = None
    return work


def taylor_gradients(model: nn.Module, batches: Iterable, loss: str) -> dict[str, torch.Tensor]:
    """Parameter gradients summed over ``batches`` for ``TaylorImportance``.

    ``loss``: ``"ce"`` (cross-entropy on the batches' labels), ``"pseudo"`` (cross-entropy on the model's own
    top-1: label-free; a KD loss against the unpruned original would have zero gradient) or ``"energy"`` (mean
    square of the output, for a feature trunk without logits).
    """
    work = copy.deepcopy(model).eval()
    work.zero_grad()
    for x, y in batches:
        out = work(x)
        if loss == "ce":
            value = F.cross_entropy(out, y)
        elif loss == "pseudo":
            value = F.cross_entropy(out, out.detach().argmax(1))
        else:
            value = out.pow(2).mean()
        value.backward()
    return {n: p.grad.detach().clone() for n, p in work.named_parameters() if p.grad is not None}


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def bn_recalibrate(model: nn.Module, batches: Iterable) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``batches`` (cumulative mean).

    Only the BN layers run in training mode (dropout and drop-connect stay off); no weight changes.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
        >>> new = bn_recalibrate(net, [(torch.ones(4, 1, 2, 2) * 3, None)])
        >>> new[1].running_mean.tolist() == net[0](torch.ones(1, 1, 1, 1) * 3).flatten().tolist()
        True
    """
    work = copy.deepcopy(model).eval()
    bns = [m for m in work.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for x, _ in batches:
        work(x)
    return work.eval()


# -- low-rank decomposition: tensorly --------------------------------------------------------------


def _conv_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """``{conv name: ((H_in, W_in), (H_out, W_out))}``, in the order the convs run."""
    shapes, hooks = {}, []

    def hook(name, inp, out):
        shapes.setdefault(name, (tuple(inp[0].shape[2:]), tuple(out.shape[2:])))

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: hook(name, inp, out)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _tucker_cost(conv: nn.Conv2d, r_in: int, r_out: int, hw_in, hw_out) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.in_channels * r_in * hw_in + r_in * r_out * k * hw_out + r_out * conv.out_channels * hw_out


def _plan_rank(conv: nn.Conv2d, fraction: float, hw_in: int, hw_out: int, round_to: int = 1) -> tuple[int, ...] | None:
    """The ranks keeping the decomposition at <= ``fraction`` of the conv's MACs, each a multiple of ``round_to``
    (rounded down), or None (no saving, or a rank below ``round_to``)."""
    n_out, n_in = conv.out_channels, conv.in_channels
    full = n_out * n_in * conv.kernel_size[0] * conv.kernel_size[1] * hw_out
    down = lambda r: int(r) // round_to * round_to  # noqa: E731
    if conv.kernel_size == (1, 1):  # SVD: (r x in) then (out x r), both at the output resolution
        r = down(math.floor(fraction * n_in * n_out / (n_in + n_out)))
        return (r,) if 1 <= r < min(n_in, n_out) else None
    best, lo, hi = None, 0.0, 1.0  # Tucker-2 with both ranks the same fraction a of their mode
    for _ in range(30):
        a = (lo + hi) / 2
        ranks = (down(max(1, round(a * n_in))), down(max(1, round(a * n_out))))
        if min(ranks) < 1:
            lo = a  # a rank below round_to: try larger ones
        elif _tucker_cost(conv, *ranks, hw_in, hw_out) <= fraction * full:
            best, lo = ranks, a
        else:
            hi = a
    if best is None or best[0] >= n_in and best[1] >= n_out:
        return None
    return best


def _shell(conv: nn.Conv2d, ranks: tuple[int, ...]) -> nn.Sequential:
    """The factor convs of a decomposition of ``conv`` at ``ranks``, weights not yet set."""
    bias = conv.bias is not None
    if len(ranks) == 1:
        return nn.Sequential(nn.Conv2d(conv.in_channels, ranks[0], 1, conv.stride, 0, bias=False),
                             nn.Conv2d(ranks[0], conv.out_channels, 1, bias=bias))
    return nn.Sequential(nn.Conv2d(conv.in_channels, ranks[0], 1, bias=False),
                         nn.Conv2d(ranks[0], ranks[1], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                   bias=False, padding_mode=conv.padding_mode),
                         nn.Conv2d(ranks[1], conv.out_channels, 1, bias=bias))


def _decompose(conv: nn.Conv2d, ranks: tuple[int, ...]) -> nn.Sequential:
    import tensorly as tl
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import svd_interface

    w = conv.weight.detach().double().numpy()
    layers = _shell(conv, ranks)
    if len(ranks) == 1:  # 1x1: W = U S V^T, the first conv gets S V^T (and the stride), the second U
        u, s, vt = svd_interface(w[:, :, 0, 0], n_eigenvecs=ranks[0])
        layers[0].weight.data = torch.from_numpy(s[:, None] * vt).float()[:, :, None, None]
        layers[1].weight.data = torch.from_numpy(u.copy()).float()[:, :, None, None]
    else:  # kxk: W ~ core x_0 U_out x_1 U_in; 1x1 (in -> r_in), kxk core (r_in -> r_out), 1x1 (r_out -> out)
        tl.set_backend("numpy")
        (core, (u_out, u_in)), _ = partial_tucker(w, rank=[ranks[1], ranks[0]], modes=[0, 1], init="svd")
        layers[0].weight.data = torch.from_numpy(u_in.T.copy()).float()[:, :, None, None]
        layers[1].weight.data = torch.from_numpy(core.copy()).float()
        layers[2].weight.data = torch.from_numpy(u_out.copy()).float()[:, :, None, None]
    if conv.bias is not None:
        layers[-1].bias.data = conv.bias.detach().clone()
    return layers


def _stems(model: nn.Module) -> set[str]:
    """The convs ghostify leaves as the stem: those applied to the input with no conv before them (the first
    conv when the model does not trace)."""
    from ghostify.conversion import tracing

    gm = tracing.trace(model).graph_module
    if gm is not None:
        return tracing.stem_nodes(gm)
    return {next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), "")}


def lowrank(model: nn.Module, example: torch.Tensor, fraction: float, *, decompose: bool = True,
            keep: Callable[[str, nn.Conv2d], bool] = lambda name, conv: False, round_to: int = 1,
            keep_stem: bool = True) -> nn.Module:
    """A copy of ``model`` with every dense conv decomposed at ``fraction`` of its MACs (data-free).

    kxk convs: Tucker-2 on the output and input modes (``tensorly.decomposition.partial_tucker``, HOOI from
    the SVD), both ranks the same fraction of their mode; 1x1 convs: truncated SVD. Convs with groups,
    those a decomposition cannot make cheaper, those ``keep(name, conv)`` names and, with ``keep_stem``, the
    stem (the convs on the input, which ghostify and the pruners leave whole too) stay. The new model
    carries ``model.lowrank_layers = {name: ranks}``. ``decompose=False``: the factor convs' shapes only
    (weights unset), to count MACs. ``round_to``: every rank a multiple of it, rounded down (as pruning's
    ``round_to`` keeps channel counts; a conv whose rank would fall below it stays whole).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 32, 1))
        >>> lowrank(net, torch.randn(1, 16, 8, 8), 0.5).lowrank_layers     # conv '0' is the stem: it stays
        {'1': (5,)}
        >>> lowrank(net, torch.randn(1, 16, 8, 8), 0.5, keep_stem=False).lowrank_layers
        {'0': (9, 9), '1': (5,)}
        >>> lowrank(net, torch.randn(1, 16, 8, 8), 0.5, round_to=4, keep_stem=False).lowrank_layers
        {'0': (8, 8), '1': (4,)}
    """
    require_peers()
    work = copy.deepcopy(model).eval()
    shapes = _conv_shapes(work, example)
    stems = _stems(work) if keep_stem else set()
    done = {}
    for name, conv in list(work.named_modules()):
        if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or name not in shapes or name in stems
                or keep(name, conv)):
            continue
        (hi, wi), (ho, wo) = shapes[name]
        ranks = _plan_rank(conv, fraction, hi * wi, ho * wo, round_to)
        if ranks is not None:
            work.set_submodule(name, _decompose(conv, ranks) if decompose else _shell(conv, ranks))
            done[name] = ranks
    work.lowrank_layers = done
    return work


class _Stop(Exception):
    pass


def _capture(module: nn.Module, model: nn.Module, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """``module``'s output (or input) when ``model`` runs on ``x``; the forward stops right there."""
    got = []

    def hook(mod, inp, out=None):
        got.append(out if output else inp[0])
        raise _Stop

    h = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


@torch.no_grad()
def refit_last_factors(compressed: nn.Module, original: nn.Module, batches: Iterable, *,
                       ridge: float = 1e-4) -> nn.Module:
    """A copy of ``compressed`` (from :func:`lowrank`) whose last 1x1 factors are refit by least squares.

    Layer after layer, in the order the convs run, the last factor's weights and bias are chosen to
    minimise ``||last(z) - conv(x)||^2`` over all positions of the calibration ``batches``: ``z`` is the
    factor's input inside the compressed model (earlier layers already refit), ``conv(x)`` the original
    conv's output inside the original model, so each layer also absorbs the error reaching it. Ridge:
    ``ridge`` times the mean diagonal of the Gram matrix. Each capture stops the forward at the layer.
    """
    work = copy.deepcopy(compressed).eval()
    original = original.eval()
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    order = list(_conv_shapes(original, xs[0][:1]))
    for name in (n for n in order if n in work.lowrank_layers):
        last = work.get_submodule(name)[-1]
        conv = original.get_submodule(name)
        gram = cross = None
        for x in xs:
            z = _capture(last, work, x, output=False)
            y = _capture(conv, original, x, output=True)
            z = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), torch.ones(z.numel() // z.shape[1], 1)], 1)
            y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
            g, c = z.double().T @ z.double(), z.double().T @ y.double()
            gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=gram.dtype)
        reg[-1, -1] = 0  # no shrinkage of the bias
        sol = torch.linalg.solve(gram + reg, cross).float()
        last.weight.data = sol[:-1].T.reshape_as(last.weight).contiguous()
        if last.bias is None:
            last.bias = nn.Parameter(torch.zeros(last.out_channels))
        last.bias.data = sol[-1].clone()
    return work


# -- BN fold, export (``--export local``) and ONNX Runtime timing ------------------------------------------


class Shift(nn.Module):
    """``x + shift`` per channel: what is left of a BatchNorm after its scale is folded into the layer before."""

    def __init__(self, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    return scale.detach(), shift.detach()


@torch.no_grad()
def _fold_into_ghost(ghost: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """Fold ``bn`` (which reads ``ghost``'s output alone) into ``ghost``; returns what replaces the BN.

    Internal channel ``i`` (intrinsic maps, then ghosts) is output channel ``channel_map[i]``. The BN
    scale ``a`` of the intrinsic maps goes into the primary conv and out of the cheap op's input (exact:
    a per-channel scale commutes with zero padding); the ghosts' scale and shift go into the cheap op's
    last conv. The intrinsic maps' shift ``b`` goes into the primary conv's bias only when the cheap op
    is 1x1 convs (its effect on the ghosts, ``cheap(b)``, is then a constant subtracted from their bias);
    otherwise it stays a per-channel ``Shift`` after the layer, because the cheap op's zero padding
    must keep reading zeros.
    """
    a, b = _bn_affine(bn)
    idx = (torch.arange(ghost.out_channels) if ghost.emit_internal_order or
           bool((ghost.channel_map == torch.arange(ghost.out_channels)).all()) else ghost.channel_map)
    a, b = a[idx], b[idx]
    prim, cheap, m = ghost.primary, ghost.cheap, ghost.intrinsic_channels
    ap, bp, ag, bg = a[:m], b[:m], a[m:], b[m:]
    prim.weight.mul_(ap.view(-1, 1, 1, 1))
    if prim.bias is None:
        prim.bias = nn.Parameter(torch.zeros(m))
    prim.bias.mul_(ap)
    if cheap is None:
        prim.bias.add_(bp)
        return nn.Identity()
    convs = [c for c in cheap.modules() if isinstance(c, nn.Conv2d)]
    first, last = convs[0], convs[-1]
    per_in = first.in_channels // first.groups
    src = (torch.arange(first.out_channels)[:, None] // (first.out_channels // first.groups)) * per_in \
        + torch.arange(per_in)[None, :]  # input channel of each (out, in-slot) weight
    first.weight.div_(ap[src][:, :, None, None])
    n_last = last.out_channels
    ag = torch.cat([ag, torch.ones(n_last - ag.numel())])  # slots dropped after the cheap op: any value
    bg = torch.cat([bg, torch.zeros(n_last - bg.numel())])
    last.weight.mul_(ag.view(-1, 1, 1, 1))
    if last.bias is None:
        last.bias = nn.Parameter(torch.zeros(n_last))
    last.bias.mul_(ag).add_(bg)
    if not all(c.kernel_size == (1, 1) for c in convs):
        return Shift(torch.cat([bp, torch.zeros(ghost.out_channels - m)])[_order(idx)])
    prim.bias.add_(bp)  # one 1x1 conv: it now reads p + b, so its bias loses its own image of b
    last.bias.sub_(F.conv2d(bp.view(1, -1, 1, 1), last.weight, groups=last.groups).flatten())
    return nn.Identity()


def _order(idx: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel())
    return inv


def fold_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """``(copy of model, number of BNs folded)``: each BatchNorm that alone reads a Ghost layer folded into it.

    A BN after a plain conv needs nothing here: the exporter (eval mode) and ONNX Runtime fold those for
    every model alike. ``model`` must be an ``fx.GraphModule`` (as ``ghostify.convert`` returns) for Ghost
    layers to be found; other models come back as a copy with 0 folds.

    Example:
        >>> import ghostify
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
        ...                     nn.BatchNorm2d(16)).eval()  # the first conv (on the input) stays a conv
        >>> _ = net[3].running_mean.uniform_(), net[3].running_var.uniform_(0.5, 2)
        >>> g = ghostify.convert(net, ratio=2, init="copy")
        >>> x = torch.randn(1, 3, 6, 6)
        >>> folded, n = fold_bn(g)
        >>> n, bool(torch.allclose(folded(x), g(x), atol=1e-5))
        (1, True)
    """
    work = copy.deepcopy(model).eval()
    graph = getattr(work, "graph", None)
    if graph is None:
        return work, 0
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    n = 0
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if (src is None or getattr(src, "op", None) != "call_module" or len(src.users) != 1
                or calls[node.target] != 1 or calls[src.target] != 1):
            continue
        bn, ghost = work.get_submodule(node.target), work.get_submodule(src.target)
        if isinstance(bn, nn.BatchNorm2d) and hasattr(ghost, "primary") and hasattr(ghost, "channel_map"):
            work.set_submodule(node.target, _fold_into_ghost(ghost, bn))
            n += 1
    return work, n



def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """``model`` exported to ONNX in memory: TorchScript exporter (``dynamo=False``), dynamic batch axis.

    The exporter folds each BatchNorm that directly follows a conv into it (eval mode); a BN after a
    Ghost layer's ``cat`` stays a separate node (ghostify's deploy pass folds those).
    """
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (example,), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


def ort_session(data: bytes, threads: int):
    """ghostify's timing session: ORT_ENABLE_ALL, sequential, spinning off (without it each session's idle
    workers busy-wait after a run and steal the cores from the one being timed: 5.9 ms -> 43 ms at batch 8)."""
    from ghostify.deploy.export import onnx_session

    return onnx_session(data, threads)


def ort_check(data: bytes, model: nn.Module, x: torch.Tensor) -> float:
    """Max relative error of the ONNX model against PyTorch on ``x`` (``max|a - b| / max|b|``; NaN compares false)."""
    with torch.no_grad():
        ref = model.eval()(x)
    got = torch.from_numpy(ort_session(data, 1).run(None, {"input": x.numpy()})[0])
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def ort_latency(models: dict[str, bytes], inputs: dict[int, torch.Tensor], *, threads: int = 2, warmup: int = 3,
                repeats: int = 10, progress: Callable[[str], None] | None = None) -> dict[str, dict[int, float]]:
    """Median ms per run of each ONNX model at each batch size, the models alternating run after run.

    ``inputs``: batch size -> input. Sessions: ONNX Runtime CPU, ``ORT_ENABLE_ALL``, ``threads``
    intra-op threads that do not spin-wait, sequential execution. Every repeat runs each model once, in turn, so that
    load from elsewhere hits all models alike.
    """
    sessions = {k: ort_session(v, threads) for k, v in models.items()}
    out: dict[str, dict[int, float]] = {k: {} for k in models}
    for bs, x in inputs.items():
        feed = {"input": x.numpy()}
        times = {k: [] for k in sessions}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feed)
        t_start = time.perf_counter()
        for _ in range(repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t0) * 1e3)
        for k, ts in times.items():
            out[k][bs] = statistics.median(ts)
        if progress:
            progress(f"batch {bs}: {len(sessions)} models x {repeats} repeats in {time.perf_counter() - t_start:.0f} s")
    return out


def ort_passes(models: dict[str, bytes], inputs: dict[int, torch.Tensor], *, threads: int = 2, repeats: int = 10,
               timings: int = 1, progress: Callable[[str], None] | None = None) -> list[dict[str, dict[int, float]]]:
    """``timings`` passes of :func:`ort_latency`, every model in every pass (each pass: model -> batch -> ms)."""
    return [ort_latency(models, inputs, threads=threads, repeats=repeats, progress=progress) for _ in range(timings)]


def pass_medians(passes: list[dict[str, dict[int, float]]], reference: str = "original"
                 ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, list[float]]]]:
    """``(ms, ratios)`` of :func:`ort_passes`' passes.

    ``ratios[model][bs]`` lists each pass's median against the ``reference`` model's in the same pass;
    ``ms[model][bs]`` is the reference's median over the passes times the median of the model's ratios, so that
    its ratio to the reference is the middle pass's, whatever the machine's speed did between passes.
    """
    sizes = passes[0][reference]
    ratios = {k: {bs: [p[k][bs] / p[reference][bs] for p in passes] for bs in sizes} for k in passes[0]}
    base = {bs: statistics.median(p[reference][bs] for p in passes) for bs in sizes}
    return {k: {bs: base[bs] * statistics.median(r[bs]) for bs in sizes} for k, r in ratios.items()}, ratios


# -- short distillation ----------------------------------------------------------------------------


PHOTO_KD_T = 2.0  # the photos KD recipe's temperature


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = PHOTO_KD_T) -> float:
    """``sum`` over the batch of KL(teacher || student) of the softmaxes at ``temperature``."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    log_target=True, reduction="sum").item()


def photo_kd_batches(batches: list[torch.Tensor], seed: int = 0) -> Iterator[torch.Tensor]:
    """The photos KD recipe's batches, without end: 16 augmented examples of the current epoch at a time
    (``ghostify.train.distill.distill_dataset`` with the default ``AugmentConfig``; a new seeded permutation and
    augmentation epoch whenever fewer than 16 are left)."""
    from ghostify.augment import AugmentConfig
    from ghostify.train.distill import distill_dataset

    data = distill_dataset(torch.cat(batches), augment=AugmentConfig(), seed=seed)
    gen, idx, epoch = torch.Generator().manual_seed(seed), [], 0
    while True:
        if len(idx) < 16:
            idx = torch.randperm(len(data), generator=gen).tolist()
            data.set_epoch(epoch)
            epoch += 1
        yield torch.stack([data[idx.pop()][0] for _ in range(16)])


def kd_finetune(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], *, steps: int = 150,
                recipe: str = "mnist", seed: int = 0, lr: float | None = None, feature_weight: float = 0.0
                ) -> nn.Module:
    """A copy of ``student`` after ``steps`` steps of label-free KD toward ``teacher`` on ``batches``.

    The same recipe for every student, whatever made it, with ghostify's KD loss (``kd_loss(student,
    teacher, None)``, logits only unless ``feature_weight``: a pruned or decomposed model has no Ghost layers to
    compare features of):

    - ``"mnist"``: the shipped MNIST recipe's optimiser and schedule (``recipes/mnist_resnet20_r2.yaml``: SGD
      momentum 0.9, weight decay 5e-4, lr 0.005 with 20 warm-up steps then cosine, gradient clipping at 2,
      ``T = 4``); the batches drawn whole, in a seeded order.
    - ``"photos"``: ``ghostify.distill``'s defaults (AdamW lr 3e-5, no weight decay, 10 warm-up steps then cosine,
      ``T = 2``, BatchNorm statistics frozen, batches of 16 augmented images drawn from ``batches`` by
      ``ghostify.train.distill.distill_dataset`` with the default ``AugmentConfig``: crops, flips, jitter, mixing).
    - ``"trunk"``: the photos recipe for a model without logits (a backbone whose output is a feature map):
      the loss is the output's relative squared error to the teacher's, ``||s - t||^2 / ||t||^2`` over the batch.

    ``lr`` replaces the recipe's peak learning rate (``benchmarks/kd_lr.py`` sweeps it). ``feature_weight > 0``
    (a ghostify student only) adds ``ghostify.distill``'s per-Ghost-layer term: that weight times the mean over
    the student's Ghost layers of their output's relative squared error to the teacher's conv of the same name
    (``ghostify.train.loss.GhostLayerOutputs``, as the fine-tune recipes use it), on the same batches. Seeded
    throughout (dropout too), whatever ran before: one student and one ``seed`` give one result.
    """
    from ghostify import kd_loss  # the fine-tune recipes' loss
    from ghostify.train.loss import GhostLayerOutputs  # and their per-Ghost-layer term's hooks

    work = copy.deepcopy(student).train()
    teacher = teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    if recipe == "mnist":
        opt = torch.optim.SGD(work.parameters(), lr=0.005 if lr is None else lr, momentum=0.9, weight_decay=5e-4)
        warmup, temperature, clip = 20, 4.0, 2.0
        order: list[int] = []

        def draw() -> torch.Tensor:
            if not order:
                order.extend(torch.randperm(len(batches), generator=gen).tolist())
            return batches[order.pop()]
    elif recipe in ("photos", "trunk"):
        opt = torch.optim.AdamW(work.parameters(), lr=3e-5 if lr is None else lr, weight_decay=0.0)
        warmup, temperature, clip = 10, PHOTO_KD_T, None
        for m in work.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        draw = functools.partial(next, photo_kd_batches(batches, seed))
    else:
        raise ValueError(f"recipe {recipe!r}: 'mnist', 'photos' or 'trunk'")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    hooks = GhostLayerOutputs(work, teacher) if feature_weight > 0 else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), hooks as feats:  # dropout's global generator: seeded, then restored
        torch.manual_seed(seed)
        for _ in range(steps):
            x = draw()
            with torch.no_grad():
                t = teacher(x)
            if recipe == "trunk":
                loss = (work(x) - t).pow(2).sum() / t.pow(2).sum()
            else:
                loss, _ = kd_loss(work(x), t, None, temperature=temperature)
            if feats is not None:
                loss = loss + feature_weight * feats.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(work.parameters(), clip)
            opt.step()
            sched.step()
    return work.eval()
