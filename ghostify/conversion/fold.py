"""Fold each Ghost layer's channel order into its consumers, so that no reordering runs.

A :class:`GhostConv2d` computes its channels in an internal order (intrinsic maps, then
ghosts). Instead of scattering them back into the original order at run time, this pass
permutes what reads them::

    ghost ─► BN ─► ReLU ─► conv          ghost(internal) ─► BN[perm] ─► ReLU ─► conv[:, perm]
                                  ==>
    ghost ─► BN ─► (+) ◄─ identity       unchanged: the add needs the original order

Walking forward from the Ghost node, channel-wise ops (activations, pooling, dropout)
pass the order through; BN and depthwise convs are permuted and pass it through;
a ``groups=1`` conv (or Ghost layer), or a ``flatten`` followed by ``nn.Linear``,
absorbs it in its input weights. Anything else (residual add, concat, model output,
a module called from two places) stops the fold and the layer keeps its run-time order.
The pass preserves the computation exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import GhostConv2d

__all__ = ["fold_channel_order", "foldable_layers", "would_fold", "folded_inputs"]

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.Tanh,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Hardtanh)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu, F.elu,
                   F.hardtanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, torch.relu_}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clamp", "clamp_", "clamp_min", "clamp_min_"}


def _is_flatten(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if node.op == "call_function" and node.target is torch.flatten:
        return start == 1
    if node.op == "call_method" and node.target == "flatten":
        return start == 1
    return False


class _Fold:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    def plan(self, start: fx.Node) -> list[tuple[str, fx.Node]] | None:
        """The edits (kind, node) that absorb ``start``'s order, or None."""
        edits: list[tuple[str, fx.Node]] = []
        stack = [(u, start, 1) for u in start.users]
        seen = set()
        while stack:
            node, src, block = stack.pop()
            if (node, src) in seen:
                continue
            seen.add((node, src))
            if not node.args or node.args[0] is not src:
                return None  # the tensor enters as a non-first argument: unknown semantics
            nxt = self._step(node, block, edits)
            if nxt is None:
                return None
            if nxt is not False:
                stack.extend((u, node, nxt) for u in node.users)
        return edits

    def _step(self, node: fx.Node, block: int, edits: list) -> int | bool | None:
        """What flows on: 1 (channels) or 0 (flattened); False when the node absorbs the order; None when it cannot."""
        if node.op == "call_module":
            mod = self.mods[node.target]
            stateful = not isinstance(mod, _PASS_MODULES)
            if stateful and self.calls[node.target] > 1:
                return None
            if block == 1 and isinstance(mod, nn.BatchNorm2d):
                edits.append(("bn", node))
                return 1
            if block == 1 and isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros":
                edits.append(("conv_in", node))
                return False
            if block == 1 and isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels:
                edits.append(("depthwise", node))
                return 1
            if block == 1 and isinstance(mod, GhostConv2d):
                edits.append(("ghost_in", node))
                return False
            if isinstance(mod, nn.Flatten) and block == 1 and mod.start_dim == 1 and mod.end_dim == -1:
                return 0
            if isinstance(mod, nn.Linear) and block == 0:
                edits.append(("linear_in", node))
                return False
            if isinstance(mod, (nn.Dropout, nn.Identity)) or (block == 1 and not stateful):
                return block
            return None
        if node.op == "call_function" and node.target in _PASS_FUNCTIONS and block == 1:
            return block
        if node.op == "call_method" and node.target in _PASS_METHODS and block == 1:
            return block
        if (node.op == "call_method" and node.target in ("size", "dim")) or (
                node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device")):
            return False  # reads metadata only; the order does not matter there
        if block == 1 and _is_flatten(node):
            return 0  # flattened: the Linear's columns come in blocks of H*W per channel
        if node.op == "call_function" and node.target is F.dropout:
            return block
        return None

    def apply(self, ghost_node: fx.Node, edits) -> None:
        ghost: GhostConv2d = self.mods[ghost_node.target]
        perm = ghost.channel_map.clone()
        for kind, node in edits:
            mod = self.mods[node.target]
            if kind == "bn":
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(mod, name)
                    if t is not None:
                        t.data = t.data[perm].clone()
            elif kind == "depthwise":
                mod.weight.data = mod.weight.data[perm].clone()
                if mod.bias is not None:
                    mod.bias.data = mod.bias.data[perm].clone()
            elif kind == "conv_in":
                mod.weight.data = mod.weight.data[:, perm].clone()
            elif kind == "ghost_in":
                mod.primary.weight.data = mod.primary.weight.data[:, perm].clone()
            elif kind == "linear_in":  # flatten(start_dim=1): channel c owns columns c*b .. c*b+b-1
                b = mod.in_features // perm.numel()
                idx = (perm[:, None] * b + torch.arange(b, device=perm.device)).reshape(-1)
                mod.weight.data = mod.weight.data[:, idx].clone()
        ghost.emit_internal_order = True


def foldable_layers(gm: fx.GraphModule) -> set[str]:
    """Names of the Ghost layers of ``gm`` whose channel order the graph lets this pass fold."""
    f = _Fold(gm)
    out = set()
    for node in gm.graph.nodes:
        mod = f.mods.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, GhostConv2d) and f.calls[node.target] == 1:
            edits = f.plan(node)
            if edits is not None and not any(k == "linear_in" and f.mods[n.target].in_features % mod.out_channels
                                             for k, n in edits):
                out.add(node.target)
    return out


def folded_inputs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """``{name: order}`` for each Ghost layer of ``gm`` that reads a folded layer's output: its input is the
    original model's input at that point in ``order`` (``x[:, order]``, the folded layer's channel map),
    since the fold permuted its input weights to match.

    Example:
        >>> import torch, torchvision
        >>> from ghostify import convert
        >>> ghost = convert(torchvision.models.vgg11_bn(), ratio=2, scatter=True).eval()
        >>> orders = folded_inputs(ghost)
        >>> len(orders) > 0 and all(o.numel() == ghost.get_submodule(n).in_channels for n, o in orders.items())
        True
    """
    f = _Fold(gm)
    out = {}
    for node in gm.graph.nodes:
        mod = f.mods.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, GhostConv2d) and mod.emit_internal_order:
            for kind, consumer in f.plan(node) or []:
                if kind == "ghost_in":
                    out[consumer.target] = mod.channel_map
    return out


def would_fold(gm: fx.GraphModule) -> set[str]:
    """The layers :func:`fold_channel_order` folds in ``gm`` as its channel maps are now (before folding):
    the foldable ones whose order is not the identity. A saved model's ``folded`` list is this set or empty.
    """
    return {n for n in foldable_layers(gm) if not gm.get_submodule(n)._identity_order}


def fold_channel_order(gm: fx.GraphModule) -> list[str]:
    """Fold the channel order of every foldable Ghost layer of ``gm`` into its consumers.

    Returns the names of the folded layers; the others keep their run-time reordering.
    Outputs are unchanged (up to float rounding of nothing: only copies are permuted).

    Example:
        >>> import torch, torchvision
        >>> from ghostify import convert
        >>> ghost = convert(torchvision.models.vgg11_bn(), ratio=2, fold=False).eval()
        >>> x = torch.randn(1, 3, 64, 64); before = ghost(x)
        >>> folded = fold_channel_order(ghost)
        >>> torch.testing.assert_close(ghost(x), before)
    """
    f = _Fold(gm)
    folded = []
    for node in gm.graph.nodes:
        mod = f.mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(mod, GhostConv2d) or mod.emit_internal_order or f.calls[node.target] > 1:
            continue
        if mod._identity_order:
            continue
        edits = f.plan(node)
        if edits is None:
            continue
        if any(k == "linear_in" and f.mods[n.target].in_features % mod.out_channels for k, n in edits):
            continue
        f.apply(node, edits)
        folded.append(node.target)
    return folded

