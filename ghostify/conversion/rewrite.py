"""The conversion pass: execute a plan on a model and return the converted model.

trace -> plan -> rewrite (fx, or submodule swap when the model cannot be traced)
-> initialise (registered strategies) -> fold channel orders into consumers.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn

from .._util import eval_mode
from ..config import GhostConfig, build_config
from ..errors import GhostifyError
from ..init import INITS, Layer
from ..layers import GhostConv2d, ghost_macs_per_position
from . import tracing
from .fold import fold_channel_order, foldable_layers
from .plan import Plan, make_plan

__all__ = ["convert", "ConversionInfo", "conversion_info"]


@dataclass
class ConversionInfo:
    """What a conversion did; attached to the converted model as ``model.ghostify_info``."""

    plan: Plan
    mode: str  # "fx" or "swap"
    folded: list[str] = field(default_factory=list)
    layer_info: dict[str, dict] = field(default_factory=dict)
    arch: dict | None = None
    source: tuple | None = field(default=None, repr=False)  # (class, state-dict signature) of the input model
    fold: bool = False  # the orders were folded (``folded`` then lists every layer that could fold)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "folded": list(self.folded), "arch": self.arch,
                "plan": self.plan.to_dict(), "layer_info": self.layer_info}


def convert(model: nn.Module, ratio: int = 2, dw_size: int | None = None, *, init: str = "copy",
            cheap: str | None = None, include: Iterable[str] = (), exclude: Iterable[str] = (),
            overrides: dict | None = None, config: GhostConfig | None = None, plan: Plan | None = None,
            inplace: bool = False, fold: bool = True, scatter: bool = False, leaf_modules: Iterable[type | str] = (),
            initialize: bool = True, round_to: int = 1, **init_options) -> nn.Module:
    """Replace the selected ``nn.Conv2d`` layers of ``model`` with :class:`GhostConv2d` and carry the weights over.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        ratio, dw_size, init, cheap, round_to: the global layer settings (see :class:`LayerSpec`). Without
            ``cheap``/``dw_size``: ``init="calib"`` fits a 1x1 ``mix``, other inits the paper's
            depthwise 3x3 ``dw`` (:func:`ghostify.config.default_cheap`).
        include, exclude: glob patterns on module names.
        overrides: ``{type | glob | name: {"ratio": 4, ...} | None}``; priority
            global < type < glob < exact name, ``None`` keeps the conv.
        config: a ready :class:`GhostConfig` (the keyword settings above are added to a copy).
        plan: a ready :class:`Plan` (from :func:`make_plan` or a saved model) to execute as is.
        fold: permute the consumers (BN, next conv) instead of reordering channels at run time.
        scatter: where the order cannot be folded (the output meets a residual add, a concat or
            the model output, or the model did not trace), still choose the intrinsic channels
            freely and scatter the channels into place at run time (a better fit, a slower
            layer). By default such layers keep intrinsic channels ``0..m-1`` and run as a
            plain ``cat``. With ``fold=False`` the foldable layers scatter too (same outputs).
        leaf_modules: module types or names the tracer must not trace through.
        initialize: run the init strategies (False: new layers stay uninitialised, for loading weights).
        **init_options: passed to the init strategies (e.g. ``calib_data`` for ``init="calib"``).

    Returns:
        A ``torch.fx.GraphModule`` when the model traces, else a copy of ``model`` with its
        convs swapped; ``result.ghostify_info`` records the plan and what was done.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> ghost = convert(model, ratio=2)
        >>> ghost(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    if conversion_info(model) is not None:
        raise GhostifyError(f"the model is already converted by ghostify ({len(conversion_info(model).plan.converted)} "
                            "Ghost layers); converting it again would give a model ghostify cannot save and load: "
                            "convert the original model instead (with overrides for the layers you want)")
    was_training = model.training
    source = (type(model), [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    cfg = build_config(ratio, dw_size, init, cheap, include, exclude, overrides, config, round_to=round_to)
    if initialize:  # before the copy, so that a model with broken weights fails at once
        _check_weights(model, plan, cfg, leaf_modules)
    work = model if inplace else copy.deepcopy(model)
    traced = tracing.trace(work, leaf_modules)
    plan = copy.deepcopy(plan) if plan is not None else make_plan(work, cfg, traced=traced)
    for e in plan.converted:
        e.spec = e.spec.resolved()
    layers = _swap_in(work, plan)
    if traced.graph_module is not None:
        result = _over_swapped(work, traced.graph_module.graph)
        mode = "fx"
    else:
        result, mode = work, "swap"
    foldable = foldable_layers(result) if mode == "fx" else set()
    for layer in layers:
        layer.fixed_order = not scatter and layer.name not in foldable

    info = ConversionInfo(plan, mode, arch=getattr(model, "ghostify_arch", None),
                          source=source)
    by_init: dict[str, list[Layer]] = {}
    for e, layer in zip(plan.converted, layers):
        by_init.setdefault(e.spec.init, []).append(layer)
    with eval_mode(result, model):
        for name, group in (by_init.items() if initialize else ()):
            info.layer_info.update(INITS[name](model, result, group, **init_options) or {})
    _record_choices(plan, info.layer_info)
    if fold and mode == "fx":
        info.folded, info.fold = fold_channel_order(result), True
    result.train(was_training)
    model.train(was_training)
    result.ghostify_info = info
    if isinstance(result, fx.GraphModule):
        result.meta["ghostify_info"] = info  # GraphModule's deepcopy keeps .meta, not other attributes
    if info.arch is not None:
        result.ghostify_arch = info.arch
    return result


def _check_weights(model: nn.Module, plan: Plan | None, cfg: GhostConfig, leaf_modules) -> None:
    """Refuse a model whose planned convs hold weights that cannot be carried over (see :func:`_weight_problem`)."""
    broken = {n: why for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and (why := _weight_problem(m))}
    planned = (plan or make_plan(model, cfg, leaf_modules=leaf_modules)).converted if broken else []
    for e in planned:
        if e.name in broken:
            raise GhostifyError(f"layer '{e.name}': {broken[e.name]} or keep the conv with --exclude '{e.name}'")


def _swap_in(work: nn.Module, plan: Plan) -> list[Layer]:
    """Check every planned conv of ``work``, then put a new :class:`GhostConv2d` in its place
    (``set_submodule``); returns the :class:`Layer` records the init strategies fill."""
    originals = {}
    for e in plan.converted:
        try:
            originals[e.name] = work.get_submodule(e.name)
        except AttributeError:
            raise GhostifyError(f"layer '{e.name}': the plan converts it but the model has no such module; "
                                "make the plan from this model (ghostify.make_plan)") from None
    for e in plan.converted:  # every layer is checked before any work
        if not isinstance(originals[e.name], nn.Conv2d):
            raise GhostifyError(f"layer '{e.name}': the plan converts it but the model holds "
                                f"{type(originals[e.name]).__name__} there; make the plan from this model")
        _check_layer(e, originals[e.name])
    layers = []
    for e in plan.converted:
        conv = originals[e.name]
        try:
            ghost = GhostConv2d.from_conv(conv, e.spec.ratio, e.spec.dw_size,
                                          "dw" if e.spec.cheap == "auto" else e.spec.cheap,
                                          cheap_bias=getattr(INITS[e.spec.init], "cheap_bias", None))
        except ValueError as exc:
            raise GhostifyError(f"layer '{e.name}': {exc}; exclude it with --exclude '{e.name}'") from None
        work.set_submodule(e.name, ghost)
        layers.append(Layer(e.name, conv, ghost, cheap_auto=e.spec.cheap == "auto"))
    return layers


def _record_choices(plan: Plan, layer_info: dict) -> None:
    """Write into ``plan`` what the init strategies decided: the cheap op chosen for ``cheap="auto"``, and the
    layers kept as convs (``max_layer_error``)."""
    for e in plan.converted:
        chosen = layer_info.get(e.name, {}).get("cheap")
        if e.spec.cheap == "auto" and chosen:
            e.spec = dataclasses.replace(e.spec, cheap=chosen["cheap"], dw_size=chosen["dw_size"])
        if layer_info.get(e.name, {}).get("kept_conv"):
            e.action, e.reason = "skip", (f"kept as conv: held-out error "
                                          f"{layer_info[e.name].get('heldout_error', float('nan')):.3f} "
                                          "> --max-layer-error")


def _weight_problem(conv: nn.Conv2d) -> str | None:
    """What makes ``conv``'s weights unfit to carry over (NaN, Inf, or squares that overflow), or None."""
    for pname, p in (("weight", conv.weight), ("bias", conv.bias)):
        lo, hi = torch.aminmax(p.detach()) if p is not None and p.numel() else (torch.zeros(()),) * 2
        largest = max(-lo.item(), hi.item())  # NaN when any value is NaN
        if not math.isfinite(largest):
            return f"its {pname} holds NaN or Inf values; fix the model (a diverged training?)"
        if largest > 1e150:  # the fits' float64 sums of squares would overflow
            return f"its {pname} values are too large to fit (up to {largest:.3g}); rescale the model"
    return None


def _check_layer(e, conv: nn.Conv2d) -> None:
    """Refuse what a Ghost layer cannot carry over or what would make the conversion run away:
    a plan entry made for another conv, hooks or parametrizations on the conv."""
    from torch.nn.utils import parametrize

    geometry = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), conv.groups)
    planned = (e.in_channels, e.out_channels, tuple(e.kernel_size), tuple(e.stride), e.groups)
    if planned != geometry:
        raise GhostifyError(f"layer '{e.name}': the plan was made for a conv {planned[0]}->{planned[1]} "
                            f"k{planned[2]} s{planned[3]}, the model has {geometry[0]}->{geometry[1]} k{geometry[2]} "
                            f"s{geometry[3]}; the plan belongs to another model (make it with ghostify.make_plan)")
    ghost_size, conv_size = ghost_macs_per_position(conv.in_channels, conv.out_channels, conv.kernel_size,
                                                    e.spec.ratio, e.spec.dw_size,
                                                    "dw" if e.spec.cheap == "auto" else e.spec.cheap)
    if ghost_size > 8 * conv_size + 2**20:
        raise GhostifyError(f"layer '{e.name}': the plan asks for a Ghost layer of {ghost_size} weights (ratio "
                            f"{e.spec.ratio}, dw_size {e.spec.dw_size}) for a conv of {conv_size}; the plan is corrupt "
                            "or not meant for this model")
    hooks = [kind for kind, d in (("forward", conv._forward_hooks), ("forward pre-", conv._forward_pre_hooks),
                                  ("backward", conv._backward_hooks)) if d]
    if parametrize.is_parametrized(conv) or hooks:
        what = "a parametrization (e.g. spectral_norm)" if parametrize.is_parametrized(conv) else \
            f"{' and '.join(hooks)} hooks (e.g. spectral_norm, weight_norm or a feature hook)"
        raise GhostifyError(f"layer '{e.name}' has {what}, which a Ghost layer would silently drop; remove it "
                            f"before converting (torch.nn.utils.parametrize.remove_parametrizations, handle.remove()) "
                            f"or keep the conv with --exclude '{e.name}'")


def conversion_info(model: nn.Module) -> ConversionInfo | None:
    """The :class:`ConversionInfo` of a model made by :func:`convert` (also after ``copy.deepcopy``), or None."""
    info = getattr(model, "ghostify_info", None)
    if info is None and isinstance(getattr(model, "meta", None), dict):
        info = model.meta.get("ghostify_info")
        if info is not None:
            model.ghostify_info = info
    return info


def _over_swapped(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A ``GraphModule`` that runs the traced ``graph`` over ``root``, whose converted convs were swapped in place
    (``set_submodule``): the graph calls modules by name, so its nodes stay as they are; lint and recompile."""
    graph = copy.deepcopy(graph)  # the traced graph belongs to the GraphModule that tracing made
    graph.lint()
    gm = fx.GraphModule(root, graph, type(root).__name__)
    gm.recompile()
    return gm
