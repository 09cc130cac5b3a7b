"""The deploy pass: an inference graph with BatchNorm folded away and every element-wise op fusable into a conv.

``fuse(model)`` returns a new ``fx.GraphModule`` (the input is untouched) that computes what
``model.eval()`` computes, up to float rounding. It runs a list of small passes; each one
rewrites one pattern, says where in a :class:`FuseReport`, and skips (with the reason) what
it cannot rewrite exactly. For a Ghost layer followed by BN and ReLU and a conv::

    x ─► primary ─► p ─┬─────────────────────► cat ─► BN ─► ReLU ─► conv ─► ...
                       └─► cheap ─► g ─────────┘
                                   ==>
    x ─► primary·a ─► p' ─┬─► shift+ReLU ────────────► conv[:, :m] ─┐
                          └─► cheap/a·a' + b' + ReLU ─► conv[:, m:] ─(+)─► ...

(the BN scale ``a`` moves into the primary conv, and out of the cheap op's input; the BN
shift of the intrinsic maps stays a per-channel op, because the cheap op's zero padding
must still read zeros; the ghost channels' BN folds into the cheap op; the cat disappears
into the consumer conv, split by input channels).

The passes claim ``preserves_computation = True``; the tests check each with ``assert_close``.
The result is for inference: BN uses its running statistics, so train-mode outputs differ.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import CHEAP_OPS, DepthwiseCheap, GhostConv2d, GhostifyError, GhostTracer
from ..errors import describe

__all__ = ["fuse", "FuseReport", "DEFAULT_PASSES", "InlineGhost", "FoldBatchNorm", "PushThroughCat",
           "ScaleIntoPrimary", "SplitConsumer", "ChannelAffine", "Pieces", "ghost_cat", "fold_bn_into_conv",
           "ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS"]

# activations (and other ops) that act on each channel alone and commute with a channel split
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout)
ACTIVATION_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.silu, F.hardswish, F.hardsigmoid, F.gelu, torch.sigmoid,
                  torch.tanh, F.leaky_relu, F.elu, F.hardtanh, F.dropout}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass
class FuseReport:
    """What :func:`fuse` did: ``applied`` ``(pass, place)`` pairs and ``skipped`` ``(pass, place, why)``."""

    applied: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    cats: list[tuple[str, list[int]]] = field(default_factory=list)  # Ghost cats left, with their piece sizes

    def unaligned_cats(self, block: int = 8) -> list[tuple[str, list[int]]]:
        """The cats left whose pieces are not all multiples of ``block`` channels: ONNX Runtime's blocked
        (NCHWc) layout keeps a concat in place only when they are (8 on AVX2, 16 on AVX-512), and
        otherwise converts to and from plain NCHW around it."""
        return [(layer, sizes) for layer, sizes in self.cats if any(s % block for s in sizes)]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, _ in self.applied:
            out[name] = out.get(name, 0) + 1
        return out

    def summary(self) -> str:
        done = ", ".join(f"{k} x{v}" for k, v in self.counts().items()) or "nothing"
        text = f"fused: {done}; {len(self.cats)} Ghost cats left"
        bad = self.unaligned_cats()
        if bad:
            text += f" ({len(bad)} with pieces not multiples of 8: " + ", ".join(f"{n} {s}" for n, s in bad[:3])
            text += ", ...)" if len(bad) > 3 else ")"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped (" + "; ".join(f"{p} at {w}: {why}" for p, w, why in
                                                               self.skipped[:5])
            text += ", ..." if len(self.skipped) > 5 else ""
            text += ")"
        return text

    def to_dict(self) -> dict:
        return {"applied": self.counts(), "skipped": [list(s) for s in self.skipped],
                "cats": [[n, list(s)] for n, s in self.cats]}


class ChannelAffine(nn.Conv2d):
    """``y[:, c] = scale[c] * x[:, c] + shift[c]``: an element-wise op in PyTorch, a depthwise 1x1 conv in ONNX.

    In ONNX it is a ``Conv`` so that ONNX Runtime fuses the activation or residual add after
    it (as it does for any conv); in PyTorch (eager, ``torch.compile``, ``torch.export``) it is
    one element-wise op, which is what those run fastest.

    Example:
        >>> a = ChannelAffine(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.0]))
        >>> a(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [2.5, 1.0]
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        c = scale.numel()
        super().__init__(c, c, 1, groups=c, bias=True, device=scale.device, dtype=scale.dtype)
        with torch.no_grad():
            self.weight.copy_(scale.reshape(c, 1, 1, 1))
            self.bias.copy_(shift)
        self.unit_scale = bool((scale == 1).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return super().forward(x)
        shift = self.bias.reshape(1, -1, 1, 1)
        if self.unit_scale:
            return x + shift
        return torch.addcmul(shift, x, self.weight.reshape(1, -1, 1, 1))


# -- graph helpers --------------------------------------------------------------------------------

def _mod(gm: fx.GraphModule, node, types=nn.Module):
    """The module ``node`` calls, if it is a ``call_module`` of one of ``types``."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, types):
            return mod
    return None


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.target] = out.get(n.target, 0) + 1
    return out


def _add_module(gm: fx.GraphModule, base: str, mod: nn.Module) -> str:
    name, k = f"{base}_deploy", 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            break
        k += 1
        name = f"{base}_deploy{k}"
    gm.add_submodule(name, mod)
    return name


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) = scale * x + shift`` in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _take(t: torch.Tensor, idx, dim: int = 0, fill: float = 0.0) -> torch.Tensor:
    """``t`` indexed along ``dim`` by ``idx`` (a slice or an index tensor whose ``-1`` entries,
    the padding channels of a :class:`Pieces`, give ``fill``)."""
    if isinstance(idx, slice):
        return t[(slice(None),) * dim + (idx,)].clone()
    idx = idx.to(t.device)
    out = t.index_select(dim, idx.clamp(min=0))
    pad = (idx < 0).nonzero().flatten()
    return out.index_fill(dim, pad, fill) if pad.numel() else out


def _slice_bn(bn: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    """A BatchNorm over the channels ``idx`` of ``bn`` (identity on padding channels)."""
    out = copy.deepcopy(bn)
    for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        t = getattr(bn, name)
        if t is not None:
            getattr(out, name).data = _take(t.data, idx, fill=fill)
    out.num_features = out.running_mean.numel()
    return out


def _is_channelwise(gm, node) -> bool:
    if node.op == "call_module":
        return _mod(gm, node, ACTIVATION_MODULES + _POOL_MODULES + (nn.BatchNorm2d,)) is not None
    return node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS


def _conv_input_scale(conv: nn.Conv2d, inv: torch.Tensor) -> None:
    """Multiply ``conv``'s weights for input channel ``c`` by ``inv[c]`` (any groups)."""
    out_per_group = conv.out_channels // conv.groups
    in_per_group = conv.in_channels // conv.groups
    group_of_row = torch.arange(conv.out_channels, device=inv.device) // out_per_group
    chans = group_of_row[:, None] * in_per_group + torch.arange(in_per_group, device=inv.device)[None, :]
    conv.weight.data = conv.weight.data * inv[chans][:, :, None, None].to(conv.weight.dtype)


def _erase_dead(graph: fx.Graph, nodes) -> None:
    for n in nodes:
        if not n.users and not n._erased:
            graph.erase_node(n)


@dataclass(frozen=True)
class Pieces:
    """Which channels of a Ghost layer's output each input of its cat holds (``index[i]``: piece ``i``'s).

    ``-1`` marks a padding channel: computed, read by nothing (zero weights in the convs that
    read the piece), dropped where the cat stays.
    """

    layer: str
    index: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, layer: str, index) -> "Pieces":
        return cls(layer, tuple(tuple(int(i) for i in idx) for idx in index))

    @property
    def sizes(self) -> list[int]:
        return [len(i) for i in self.index]

    @property
    def flat(self) -> list[int]:
        return [c for idx in self.index for c in idx]

    @property
    def in_order(self) -> bool:
        """The pieces, concatenated, are the channels in order (a plain cat)."""
        return self.flat == list(range(len(self.flat)))

    @property
    def channels(self) -> int:
        return sum(1 for c in self.flat if c >= 0)

    def tensor(self, i: int) -> torch.Tensor:
        return torch.tensor(self.index[i], dtype=torch.long)


def ghost_cat(pieces: list[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """The pieces of a Ghost layer's output, concatenated and gathered back into channel order."""
    return torch.cat(pieces, dim=1).index_select(1, order)


def _constant(gm: fx.GraphModule, base: str, value: torch.Tensor) -> fx.Node:
    name, k = base.replace(".", "_") + "_deploy", 1
    while hasattr(gm, name):
        k += 1
        name = base.replace(".", "_") + f"_deploy{k}"
    gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def _cat_node(gm: fx.GraphModule, nodes: list, pieces: Pieces) -> fx.Node:
    """A node holding the Ghost layer's output made of ``nodes`` (a cat, plus a gather when out of order)."""
    if pieces.in_order:
        out = gm.graph.call_function(torch.cat, (list(nodes),), {"dim": 1})
    else:
        flat = pieces.flat
        order = torch.tensor(sorted((q for q, c in enumerate(flat) if c >= 0), key=lambda q: flat[q]))
        out = gm.graph.call_function(ghost_cat, (list(nodes), _constant(gm, f"{pieces.layer}_cat_order", order)))
    out.meta["ghostify_cat"] = pieces
    return out


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
    A cheap op of a family other than ``dw``/``mix`` stays one opaque call. The cat node's ``meta["ghostify_cat"]`` says which channels each piece holds;
    a layer that scatters its channels keeps its permutation (``meta["ghostify_perm"]``).
    """

    name = "inline_ghost"
    preserves_computation = True

    def transform(self, gm: fx.GraphModule, report: FuseReport) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            ghost = _mod(gm, node, GhostConv2d)
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
            out = _cat_node(gm, p + g, Pieces.of(t, index))
        if ghost._identity_order or ghost.emit_internal_order:
            return out
        inv = torch.empty_like(ghost.channel_map)
        inv[ghost.channel_map] = torch.arange(ghost.out_channels, device=inv.device)
        perm = graph.call_function(torch.index_select, (out, 1, _constant(gm, f"{t}_order", inv)))
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
            parts = [(_add_module(gm, f"{t}.primary", _slice_conv(prim, rows=rows)), range(rows.start, rows.stop))
                     for rows in (slice(0, used), slice(used, m))]
        if k == 1 and used == m:
            return parts, [(f"{t}.cheap.conv", range(ng))]
        cheap_parts = []
        for j in range(k):  # conv j computes slot j of parents 0..used-1: ghost i*k + j (a dropped one pads)
            rows = torch.arange(used) * k + j
            conv = _slice_conv(dw, rows=rows, groups=True)
            cheap_parts.append((_add_module(gm, f"{t}.cheap.conv", conv), [int(r) if r < ng else -1 for r in rows]))
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
        calls = _calls(gm)
        for node in list(gm.graph.nodes):
            bn = _mod(gm, node, nn.BatchNorm2d)
            src = node.args[0] if node.args else None
            conv = _mod(gm, src, nn.Conv2d)
            if bn is None or conv is None or len(src.users) != 1 or calls[src.target] != 1:
                continue
            if bn.running_mean is None:
                report.skipped.append((self.name, node.target, "BatchNorm without running statistics"))
                continue
            fold_bn_into_conv(conv, bn)
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            report.applied.append((self.name, f"{node.target} -> {src.target}"))


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` becomes ``bn(conv(x))`` (eval mode), in place."""
    scale, shift = _bn_affine(bn)
    w = conv.weight.data
    bias = conv.bias.data if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter(w * scale.reshape(-1, 1, 1, 1).to(w.dtype))
    conv.bias = nn.Parameter((bias * scale + shift).to(w.dtype))


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
        calls = _calls(gm)
        for node in gm.graph.nodes:
            if "ghostify_perm" in node.meta and len(node.users) == 1:
                user = next(iter(node.users))
                if self._unary(gm, user, calls) and user.args[0] is node:
                    self._through_perm(gm, user, node)
                    report.applied.append((self.name, f"{user.name} through the order of {node.name}"))
                    return True
            if self.split_producers and _is_add(node) and any(_pieces(a) for a in node.args[:2]):
                a, b = node.args[:2]
                other = b if _pieces(a) else a
                if not _pieces(other) and self._split_producer(gm, other, _pieces(a) or _pieces(b), calls):
                    report.applied.append((self.name, f"split the producer of {other.name}"))
                    return True
            pieces = _pieces(node)
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
            _erase_dead(gm.graph, [node])
            return True
        return False

    def _kind(self, gm, user, cat, pieces, calls) -> str:
        if user.args and user.args[0] is cat and self._unary(gm, user, calls):
            return "unary"
        conv = _mod(gm, user, nn.Conv2d)
        if conv is not None and conv.groups == 1 and user.args[0] is cat and calls[user.target] == 1:
            return "split"
        a, b = (_pieces(x) for x in user.args[:2]) if _is_add(user) else (None, None)
        if self.adds and a and b and a.index == b.index:  # the same channels in each piece
            return "add"
        return "stuck"

    @staticmethod
    def _unary(gm, node, calls) -> bool:
        """A one-input op that acts on each channel alone (its parameters can be sliced per piece)."""
        if not node.args or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return False
        if _is_channelwise(gm, node) or node.op == "call_function" and node.target in _POOL_FUNCTIONS:
            return True
        conv = _mod(gm, node, nn.Conv2d)
        return conv is not None and conv.groups == conv.in_channels == conv.out_channels

    @staticmethod
    def _apply(gm, node, x, idx) -> fx.Node:
        """``node``'s op applied to ``x``, its parameters restricted to channels ``idx``."""
        mod = _mod(gm, node)
        if isinstance(mod, nn.BatchNorm2d):
            mod = _slice_bn(mod, idx)
        elif isinstance(mod, nn.Conv2d):  # depthwise
            mod = _slice_conv(mod, rows=idx, groups=True)
        elif getattr(mod, "inplace", False):
            mod.inplace = False  # the piece may still be read by the cheap op
        target = node.target
        if isinstance(mod, (nn.BatchNorm2d, nn.Conv2d)):
            target = _add_module(gm, node.target, mod)
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        return gm.graph.create_node(node.op, target, (x,) + tuple(node.args[1:]), kwargs)

    def _through_cat(self, gm, node, cat) -> None:
        pieces = cat.meta["ghostify_cat"]
        with gm.graph.inserting_before(node):
            new = [self._apply(gm, node, piece, pieces.tensor(i)) for i, piece in enumerate(cat.args[0])]
            out = _cat_node(gm, new, pieces)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)

    @staticmethod
    def _add(gm, node) -> None:
        a, b = node.args
        with gm.graph.inserting_before(node):
            sums = [gm.graph.call_function(operator.add, (p, q)) for p, q in zip(a.args[0], b.args[0])]
            out = _cat_node(gm, sums, a.meta["ghostify_cat"])
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        _erase_dead(gm.graph, [a, b] if a is not b else [a])

    def _through_perm(self, gm, node, perm) -> None:
        with gm.graph.inserting_before(node):
            inner = self._apply(gm, node, perm.args[0], perm.meta["ghostify_perm"])
            out = gm.graph.call_function(torch.index_select, (inner,) + tuple(perm.args[1:]))
        out.meta["ghostify_perm"] = perm.meta["ghostify_perm"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        _erase_dead(gm.graph, [perm])

    def _split_producer(self, gm, node, pieces: Pieces, calls) -> bool:
        """Make the groups=1 conv behind ``node`` (through channel-wise ops) hold its channels as ``pieces``."""
        while isinstance(node, fx.Node) and self._unary(gm, node, calls) and _mod(gm, node, nn.Conv2d) is None:
            node = node.args[0]
        conv = _mod(gm, node, nn.Conv2d)
        if conv is None or conv.groups != 1 or conv.out_channels != pieces.channels or calls[node.target] != 1:
            return False
        parts = []
        with gm.graph.inserting_after(node):
            for i in range(len(pieces.index)):
                part = _slice_conv(conv, rows=pieces.tensor(i))
                parts.append(gm.graph.call_module(_add_module(gm, node.target, part), node.args, node.kwargs))
        with gm.graph.inserting_after(parts[-1]):
            cat = _cat_node(gm, parts, Pieces(node.target, pieces.index))
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)
        return True


def _is_add(node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
            and not node.kwargs and len(node.args) == 2)


def _pieces(node) -> Pieces | None:
    """The :class:`Pieces` of a cat that :class:`InlineGhost` (or a pass after it) made."""
    return node.meta["ghostify_cat"] if isinstance(node, fx.Node) and "ghostify_cat" in node.meta else None


def _slice_conv(conv: nn.Conv2d, rows=None, cols=None, groups: bool = False) -> nn.Conv2d:
    """A copy of ``conv`` restricted to output channels ``rows`` / input channels ``cols`` (``groups``:
    a depthwise conv restricted to channels ``rows``)."""
    rows = slice(None) if rows is None else rows
    if isinstance(conv, ChannelAffine) and cols is None:
        return ChannelAffine(_take(conv.weight.data.reshape(-1), rows, fill=1.0), _take(conv.bias.data, rows))
    w = _take(conv.weight.data, rows)  # padding channels: zero filters / zero input columns
    w = _take(w, cols, dim=1) if cols is not None else w
    out_c, in_c = w.shape[0], (w.shape[0] if groups else w.shape[1] * conv.groups)
    part = nn.Conv2d(in_c, out_c, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups=out_c if groups else conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=w.device, dtype=w.dtype)
    part.weight.data = w.clone()
    if conv.bias is not None:
        part.bias.data = _take(conv.bias.data, rows)
    return part


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
        calls = _calls(gm)
        for node in list(gm.graph.nodes):
            prim = _mod(gm, node, nn.Conv2d)
            if prim is None or "ghostify_primary" not in node.meta or calls[node.target] != 1:
                continue
            bns = [u for u in node.users if _mod(gm, u, nn.BatchNorm2d) is not None]
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
            a, shift = _bn_affine(bn)
            s = torch.where(a == 0, torch.ones_like(a), a)
            prim.weight.data = prim.weight.data * s.reshape(-1, 1, 1, 1)
            if prim.bias is not None:
                prim.bias.data = prim.bias.data * s
            for r in readers:
                _conv_input_scale(gm.get_submodule(r.target), 1 / s)
            target = _add_module(gm, bns[0].target, ChannelAffine(a / s, shift))
            with gm.graph.inserting_before(bns[0]):
                aff = gm.graph.call_module(target, (node,))
            bns[0].replace_all_uses_with(aff)
            gm.graph.erase_node(bns[0])
            report.applied.append((self.name, node.target))

    @staticmethod
    def _blocker(gm, node, readers, calls) -> str | None:
        for r in readers:
            conv = _mod(gm, r, nn.Conv2d)
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
        calls = _calls(gm)
        for cat in list(gm.graph.nodes):
            if "ghostify_cat" not in cat.meta or not cat.users:
                continue
            users = list(cat.users)
            convs = [_mod(gm, u, nn.Conv2d) for u in users]
            if any(c is None or c.groups != 1 or u.args[0] is not cat or calls[u.target] != 1
                   for c, u in zip(convs, users)):
                continue
            pieces = cat.meta["ghostify_cat"]
            for u, conv in zip(users, convs):
                parts = []
                for i in range(len(pieces.index)):
                    part = _slice_conv(conv, cols=pieces.tensor(i))
                    if i != len(pieces.index) - 1:
                        part.bias = None
                    parts.append(_add_module(gm, u.target, part))
                # a residual add after the conv joins the chain, so that it fuses too:
                # conv(cat(p, g)) + r  ==>  conv_a(p) + (conv_b(g) + r)
                add = next(iter(u.users)) if len(u.users) == 1 else None
                if add is not None and _is_add(add) and add.args[0] is not add.args[1]:
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


DEFAULT_PASSES = (InlineGhost, FoldBatchNorm, PushThroughCat, ScaleIntoPrimary, FoldBatchNorm, SplitConsumer)


def fuse(model: nn.Module, *, passes=DEFAULT_PASSES, leaf_modules=()) -> fx.GraphModule:
    """An inference copy of ``model`` with BatchNorm folded and Ghost layers laid out for fused runtimes.

    Works on any model that traces with torch.fx (a model from :func:`ghostify.convert`, or
    an original, which gets the same BN folding for a fair comparison). The input model is
    not modified. The result is in eval mode; ``result.meta["ghostify_fuse"]`` is a
    :class:`FuseReport` of what each pass rewrote or skipped.

    Example:
        >>> import torch, torchvision, ghostify
        >>> ghost = ghostify.convert(torchvision.models.resnet18(), ratio=2).eval()
        >>> fused = ghostify.fuse(ghost)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.testing.assert_close(fused(x), ghost(x), rtol=1e-4, atol=1e-4)
    """
    work = copy.deepcopy(model).eval()
    if isinstance(work, fx.GraphModule):
        gm = work
    else:
        tracer = GhostTracer(leaf_modules)
        try:
            graph = tracer.trace(work)
        except Exception as exc:
            raise GhostifyError(f"fuse: the model does not trace with torch.fx ({describe(exc)}); "
                                "export it unfused (fuse=False / --no-fuse)") from None
        gm = fx.GraphModule(tracer.root, graph, type(work).__name__)
    report = FuseReport()
    with torch.no_grad():
        for p in passes:
            (p() if isinstance(p, type) else p).transform(gm, report)
    report.cats = [(n.meta["ghostify_cat"].layer, n.meta["ghostify_cat"].sizes) for n in gm.graph.nodes
                   if "ghostify_cat" in n.meta]
    for n in list(gm.graph.nodes):  # the orders of the cats that passes dissolved
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta["ghostify_fuse"] = report
    return gm.eval()
