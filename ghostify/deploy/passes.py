"""The deploy passes that inline Ghost layers, fold BatchNorm and remove Ghost cats (see :mod:`.fuse`)."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..layers import CHEAP_OPS, DepthwiseCheap, GhostConv2d
from .graph import (ChannelAffine, FuseReport, Pieces, add_constant, add_module, bn_affine, call_counts, cat_node,
                    conv_input_scale, fold_bn_into_conv, is_add, module_of, slice_conv)

__all__ = ["InlineGhost", "FoldBatchNorm", "ScaleIntoPrimary", "SplitConsumer"]


# -- the passes -----------------------------------------------------------------------------------

class InlineGhost:
    """Replace each Ghost layer by the convs it runs, so that the passes after it see them.

    ::

        x ─► GhostConv2d ─► y      ==>     x ─► primary ─► p ─┬──────────────► cat ─► [perm] ─► y
                                                              └─► cheap ─► g ──┘

    Slots that a depthwise cheap op computes and drops (``per_parent * m > n - m``) are not
    computed: the primary conv is split in the intrinsic maps that have ghosts and those that do
    not, and the cheap op runs on the first part only. A depthwise cheap op with ``k > 1`` ghosts
    per map (ratio > 2) becomes ``k`` depthwise convs (true depthwise convs run in ONNX Runtime's
    blocked layout, channel multipliers do not); its ghosts are then held by ``k`` pieces in a
    stride-``k`` order, which the passes after this one keep track of (a cat no pass dissolves
    gathers them back into order), and a slot dropped from the last map is a padding channel.
    A cheap op of a family other than ``dw``/``mix`` stays one opaque call. The cat node's
    ``meta["ghostify_cat"]`` says which channels each piece holds; a layer that scatters its
    channels keeps its permutation (``meta["ghostify_perm"]``).
    """

    name = "inline_ghost"
    preserves_computation = True

    def transform(self, gm: fx.GraphModule, report: FuseReport) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            ghost = module_of(gm, node, GhostConv2d)
            if ghost is None:
                continue
            with graph.inserting_before(node):
                out = self._inline(gm, node, ghost)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            report.applied.append((self.name, node.target))

    def _inline(self, gm, node, ghost: GhostConv2d) -> fx.Node:
        graph, t, x = gm.graph, node.target, node.args[0]
        m = ghost.intrinsic_channels
        if ghost.cheap is None:
            out = graph.call_module(f"{t}.primary", (x,))
        else:
            if isinstance(ghost.cheap, DepthwiseCheap):
                parts, cheap = self._depthwise(gm, ghost, t)
            else:
                parts, cheap = [(f"{t}.primary", range(m))], None
            p = [graph.call_module(name, (x,)) for name, _ in parts]
            for n in p:
                n.meta["ghostify_primary"] = t
            if cheap is not None:
                g = [graph.call_module(name, (p[0],)) for name, _ in cheap]
                index = [idx for _, idx in parts] + [[m + i if i >= 0 else -1 for i in idx] for _, idx in cheap]
            elif isinstance(ghost.cheap, CHEAP_OPS["mix"]):
                g = [graph.call_module(f"{t}.cheap.mix", (p[0],))]
                if ghost.cheap.dw is not None:
                    g = [graph.call_module(f"{t}.cheap.dw", (g[0],))]
                index = [range(m), range(m, ghost.out_channels)]
            else:
                g = [graph.call_module(f"{t}.cheap", (p[0],))]
                index = [range(m), range(m, ghost.out_channels)]
            out = cat_node(gm, p + g, Pieces.of(t, index))
        if ghost._identity_order or ghost.emit_internal_order:
            return out
        inv = torch.empty_like(ghost.channel_map)
        inv[ghost.channel_map] = torch.arange(ghost.out_channels, device=inv.device)
        perm = graph.call_function(torch.index_select, (out, 1, add_constant(gm, f"{t}_order", inv)))
        perm.meta["ghostify_perm"] = ghost.channel_map.clone()
        return perm

    @staticmethod
    def _depthwise(gm, ghost: GhostConv2d, t: str) -> tuple[list, list]:
        """``[(primary conv, its intrinsic maps)]`` (the parents first) and ``[(cheap conv j, its slots)]``."""
        cheap: DepthwiseCheap = ghost.cheap
        m, k, ng = ghost.intrinsic_channels, cheap.per_parent, cheap.num_ghosts
        used = -(-ng // k)  # intrinsic maps with at least one kept ghost
        prim, dw = ghost.primary, cheap.conv
        if used == m:
            parts = [(f"{t}.primary", range(m))]
        else:
            parts = [(add_module(gm, f"{t}.primary", slice_conv(prim, rows=rows)), range(rows.start, rows.stop))
                     for rows in (slice(0, used), slice(used, m))]
        if k == 1 and used == m:
            return parts, [(f"{t}.cheap.conv", range(ng))]
        cheap_parts = []
        for j in range(k):  # conv j computes slot j of parents 0..used-1: ghost i*k + j (a dropped one pads)
            rows = torch.arange(used) * k + j
            conv = slice_conv(dw, rows=rows, groups=True)
            cheap_parts.append((add_module(gm, f"{t}.cheap.conv", conv), [int(r) if r < ng else -1 for r in rows]))
        return parts, cheap_parts

class FoldBatchNorm:
    """Fold an eval-mode BatchNorm into the conv before it, when nothing else reads the conv's output.

    ::

        x ─► conv ─► BN ─► y      ==>     x ─► conv' ─► y      (w' = w * a, b' = b * a + shift)

    A BN with no running statistics (``track_running_stats=False``) is skipped.
    """

    name = "fold_bn"
    preserves_computation = True

    def transform(self, gm: fx.GraphModule, report: FuseReport) -> None:
        calls = call_counts(gm)
        for node in list(gm.graph.nodes):
            bn = module_of(gm, node, nn.BatchNorm2d)
            src = node.args[0] if node.args else None
            conv = module_of(gm, src, nn.Conv2d)
            if bn is None or conv is None or len(src.users) != 1 or calls[src.target] != 1:
                continue
            if bn.running_mean is None:
                report.skipped.append((self.name, node.target, "BatchNorm without running statistics"))
                continue
            fold_bn_into_conv(conv, bn)
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            report.applied.append((self.name, f"{node.target} -> {src.target}"))

class ScaleIntoPrimary:
    """Move the BN scale of a Ghost layer's intrinsic maps into its primary conv.

    ::

        x ─► primary ─┬─► BN[:m] ─► ...          x ─► primary·a ─┬─► (+shift) ─► ...
                      └─► cheap ─► ...    ==>                    └─► cheap·(1/a) ─► ...

    The primary conv's output is also the cheap op's input, so the BN cannot fold into it
    whole: its scale ``a`` can (every padding mode commutes with a per-channel scale: a
    zero-padded conv reads ``a * 0 = 0`` at the border, so the cheap op stays exact with
    ``1/a`` on its input channels), its shift cannot (a d x d cheap op's zero padding would
    read ``shift`` instead of zeros; only a 1x1 cheap op could absorb it, and it would pay
    nothing, since the primary conv's output still has two readers) and stays a :class:`ChannelAffine` with
    scale 1, which the runtime runs as one pass with the activation after it. Channels whose
    BN scale is zero keep scale 1 in the primary conv and their scale in the affine.
    """

    name = "scale_into_primary"
    preserves_computation = True

    def transform(self, gm: fx.GraphModule, report: FuseReport) -> None:
        calls = call_counts(gm)
        for node in list(gm.graph.nodes):
            prim = module_of(gm, node, nn.Conv2d)
            if prim is None or "ghostify_primary" not in node.meta or calls[node.target] != 1:
                continue
            bns = [u for u in node.users if module_of(gm, u, nn.BatchNorm2d) is not None]
            readers = [u for u in node.users if u not in bns]
            if len(bns) != 1 or not readers:
                continue
            why = self._blocker(gm, node, readers, calls)
            bn = gm.get_submodule(bns[0].target)
            if why is None and bn.running_mean is None:
                why = "BatchNorm without running statistics"
            if why:
                report.skipped.append((self.name, node.target, why))
                continue
            a, shift = bn_affine(bn)
            s = torch.where(a == 0, torch.ones_like(a), a)
            prim.weight.data = prim.weight.data * s.reshape(-1, 1, 1, 1)
            if prim.bias is not None:
                prim.bias.data = prim.bias.data * s
            for r in readers:
                conv_input_scale(gm.get_submodule(r.target), 1 / s)
            target = add_module(gm, bns[0].target, ChannelAffine(a / s, shift))
            with gm.graph.inserting_before(bns[0]):
                aff = gm.graph.call_module(target, (node,))
            bns[0].replace_all_uses_with(aff)
            gm.graph.erase_node(bns[0])
            report.applied.append((self.name, node.target))

    @staticmethod
    def _blocker(gm, node, readers, calls) -> str | None:
        for r in readers:
            conv = module_of(gm, r, nn.Conv2d)
            if conv is None or r.args[0] is not node or calls[r.target] != 1:
                return f"its output is also read by {r.name}, not a conv"
        return None

class SplitConsumer:
    """Remove a Ghost layer's cat by splitting the convs that read it by input channels.

    ::

        p ─┐                          p ─► conv[:, :m] ───┐
        g ─┴► cat ─► conv    ==>      g ─► conv[:, m:] ─► (+)

    The sum fuses into the second conv in the runtimes (ONNX Runtime's ``Sum`` input), so
    the cat's copy disappears. Every reader of the cat must be a ``groups=1`` conv.
    """

    name = "split_consumer"
    preserves_computation = True

    def transform(self, gm: fx.GraphModule, report: FuseReport) -> None:
        calls = call_counts(gm)
        for cat in list(gm.graph.nodes):
            if "ghostify_cat" not in cat.meta or not cat.users:
                continue
            users = list(cat.users)
            convs = [module_of(gm, u, nn.Conv2d) for u in users]
            if any(c is None or c.groups != 1 or u.args[0] is not cat or calls[u.target] != 1
                   for c, u in zip(convs, users)):
                continue
            pieces = cat.meta["ghostify_cat"]
            for u, conv in zip(users, convs):
                parts = []
                for i in range(len(pieces.index)):
                    part = slice_conv(conv, cols=pieces.tensor(i))
                    if i != len(pieces.index) - 1:
                        part.bias = None
                    parts.append(add_module(gm, u.target, part))
                # a residual add after the conv joins the chain, so that it fuses too:
                # conv(cat(p, g)) + r  ==>  conv_a(p) + (conv_b(g) + r)
                add = next(iter(u.users)) if len(u.users) == 1 else None
                if add is not None and is_add(add) and add.args[0] is not add.args[1]:
                    rest = add.args[1] if add.args[0] is u else add.args[0]
                else:
                    add, rest = None, None
                where = add if add is not None else u
                with gm.graph.inserting_before(where):
                    out = rest
                    for piece, target in reversed(list(zip(cat.args[0], parts))):
                        y = gm.graph.call_module(target, (piece,))
                        out = y if out is None else gm.graph.call_function(operator.add, (y, out))
                where.replace_all_uses_with(out)
                gm.graph.erase_node(where)
                if add is not None:
                    gm.graph.erase_node(u)
            gm.graph.erase_node(cat)
            report.applied.append((self.name, pieces.layer))
