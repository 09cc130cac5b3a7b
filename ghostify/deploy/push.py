"""The deploy pass that moves channel-wise ops and residual adds onto a Ghost layer's pieces (see :mod:`.fuse`)."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .graph import (FuseReport, POOL_FUNCTIONS, Pieces, add_module, call_counts, cat_node, erase_dead, is_add,
                    is_channelwise, module_of, pieces_of, slice_bn, slice_conv)

__all__ = ["PushThroughCat"]


class PushThroughCat:
    """Move channel-wise ops and residual adds from a Ghost layer's cat onto its pieces.

    ::

        p ─┐                           p ─► BN[:m] ─► ReLU ─┐
        g ─┴► cat ─► BN ─► ReLU   ==>  g ─► BN[m:] ─► ReLU ─┴► cat

        cat(p, g) + cat(q, h)     ==>  cat(p + q, g + h)

    A cat is dissolved only when every reader of it is a channel-wise op (BatchNorm,
    activation, pooling, depthwise conv), a ``groups=1`` conv (split later by
    :class:`SplitConsumer`), or an add with another cat of the same piece sizes; elsewhere
    (a DenseNet's feature cat, a flatten) the pieces would run as separate ops for nothing.
    When the other operand of an add is not a cat, the conv that makes it (through channel-wise
    ops) is split by output channels so that it becomes one (``conv -> cat(conv[:m], conv[m:])``).
    A scattering layer's permutation lets a channel-wise op through (``BN(perm(x)) = perm(BN[order](x))``)
    when the op is its only reader.
    """

    name = "push_through_cat"
    preserves_computation = True

    def __init__(self, adds: bool = True, split_producers: bool = True):
        self.adds, self.split_producers = adds, split_producers

    def transform(self, gm: fx.GraphModule, report: FuseReport) -> None:
        while self._step(gm, report):
            pass

    def _step(self, gm, report) -> bool:
        """One rewrite anywhere in the graph; False when none is left."""
        calls = call_counts(gm)
        for node in gm.graph.nodes:
            if "ghostify_perm" in node.meta and len(node.users) == 1:
                user = next(iter(node.users))
                if self._unary(gm, user, calls) and user.args[0] is node:
                    self._through_perm(gm, user, node)
                    report.applied.append((self.name, f"{user.name} through the order of {node.name}"))
                    return True
            if self.split_producers and is_add(node) and any(pieces_of(a) for a in node.args[:2]):
                a, b = node.args[:2]
                other = b if pieces_of(a) else a
                if not pieces_of(other) and self._split_producer(gm, other, pieces_of(a) or pieces_of(b), calls):
                    report.applied.append((self.name, f"split the producer of {other.name}"))
                    return True
            pieces = pieces_of(node)
            if not pieces or not node.users:
                continue
            kinds = [self._kind(gm, u, node, pieces, calls) for u in node.users]
            if "stuck" in kinds or all(k == "split" for k in kinds):
                continue
            for user, kind in zip(list(node.users), kinds):
                if kind == "unary":
                    self._through_cat(gm, user, node)
                elif kind == "add":
                    self._add(gm, user)
                report.applied.append((self.name, user.name))
            erase_dead(gm.graph, [node])
            return True
        return False

    def _kind(self, gm, user, cat, pieces, calls) -> str:
        if user.args and user.args[0] is cat and self._unary(gm, user, calls):
            return "unary"
        conv = module_of(gm, user, nn.Conv2d)
        if conv is not None and conv.groups == 1 and user.args[0] is cat and calls[user.target] == 1:
            return "split"
        a, b = (pieces_of(x) for x in user.args[:2]) if is_add(user) else (None, None)
        if self.adds and a and b and a.index == b.index:  # the same channels in each piece
            return "add"
        return "stuck"

    @staticmethod
    def _unary(gm, node, calls) -> bool:
        """A one-input op that acts on each channel alone (its parameters can be sliced per piece)."""
        if not node.args or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return False
        if is_channelwise(gm, node) or node.op == "call_function" and node.target in POOL_FUNCTIONS:
            return True
        conv = module_of(gm, node, nn.Conv2d)
        return conv is not None and conv.groups == conv.in_channels == conv.out_channels

    @staticmethod
    def _apply(gm, node, x, idx) -> fx.Node:
        """``node``'s op applied to ``x``, its parameters restricted to channels ``idx``."""
        mod = module_of(gm, node)
        if isinstance(mod, nn.BatchNorm2d):
            mod = slice_bn(mod, idx)
        elif isinstance(mod, nn.Conv2d):  # depthwise
            mod = slice_conv(mod, rows=idx, groups=True)
        elif getattr(mod, "inplace", False):
            mod.inplace = False  # the piece may still be read by the cheap op
        target = node.target
        if isinstance(mod, (nn.BatchNorm2d, nn.Conv2d)):
            target = add_module(gm, node.target, mod)
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        return gm.graph.create_node(node.op, target, (x,) + tuple(node.args[1:]), kwargs)

    def _through_cat(self, gm, node, cat) -> None:
        pieces = cat.meta["ghostify_cat"]
        with gm.graph.inserting_before(node):
            new = [self._apply(gm, node, piece, pieces.tensor(i)) for i, piece in enumerate(cat.args[0])]
            out = cat_node(gm, new, pieces)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)

    @staticmethod
    def _add(gm, node) -> None:
        a, b = node.args
        with gm.graph.inserting_before(node):
            sums = [gm.graph.call_function(operator.add, (p, q)) for p, q in zip(a.args[0], b.args[0])]
            out = cat_node(gm, sums, a.meta["ghostify_cat"])
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        erase_dead(gm.graph, [a, b] if a is not b else [a])

    def _through_perm(self, gm, node, perm) -> None:
        with gm.graph.inserting_before(node):
            inner = self._apply(gm, node, perm.args[0], perm.meta["ghostify_perm"])
            out = gm.graph.call_function(torch.index_select, (inner,) + tuple(perm.args[1:]))
        out.meta["ghostify_perm"] = perm.meta["ghostify_perm"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        erase_dead(gm.graph, [perm])

    def _split_producer(self, gm, node, pieces: Pieces, calls) -> bool:
        """Make the groups=1 conv behind ``node`` (through channel-wise ops) hold its channels as ``pieces``."""
        while isinstance(node, fx.Node) and self._unary(gm, node, calls) and module_of(gm, node, nn.Conv2d) is None:
            node = node.args[0]
        conv = module_of(gm, node, nn.Conv2d)
        if conv is None or conv.groups != 1 or conv.out_channels != pieces.channels or calls[node.target] != 1:
            return False
        parts = []
        with gm.graph.inserting_after(node):
            for i in range(len(pieces.index)):
                part = slice_conv(conv, rows=pieces.tensor(i))
                parts.append(gm.graph.call_module(add_module(gm, node.target, part), node.args, node.kwargs))
        with gm.graph.inserting_after(parts[-1]):
            cat = cat_node(gm, parts, Pieces(node.target, pieces.index))
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)
        return True
