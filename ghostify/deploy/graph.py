"""What the deploy passes share: the :class:`FuseReport` they write to, graph queries, per-channel
slicing of convs and BatchNorms, the :class:`Pieces` of a Ghost layer's cat, and :class:`ChannelAffine`."""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["FuseReport", "ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS", "POOL_MODULES", "POOL_FUNCTIONS",
           "ChannelAffine", "Pieces", "ghost_cat", "module_of", "call_counts", "add_module", "add_constant",
           "bn_affine", "take", "slice_bn", "slice_conv", "is_channelwise", "is_add", "pieces_of", "conv_input_scale",
           "erase_dead", "cat_node", "fold_bn_into_conv"]

# activations (and other ops) that act on each channel alone and commute with a channel split
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout)
ACTIVATION_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.silu, F.hardswish, F.hardsigmoid, F.gelu, torch.sigmoid,
                  torch.tanh, F.leaky_relu, F.elu, F.hardtanh, F.dropout}
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}

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

def module_of(gm: fx.GraphModule, node, types=nn.Module):
    """The module ``node`` calls, if it is a ``call_module`` of one of ``types``."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, types):
            return mod
    return None


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.target] = out.get(n.target, 0) + 1
    return out


def add_module(gm: fx.GraphModule, base: str, mod: nn.Module) -> str:
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


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) = scale * x + shift`` in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def take(t: torch.Tensor, idx, dim: int = 0, fill: float = 0.0) -> torch.Tensor:
    """``t`` indexed along ``dim`` by ``idx`` (a slice or an index tensor whose ``-1`` entries,
    the padding channels of a :class:`Pieces`, give ``fill``)."""
    if isinstance(idx, slice):
        return t[(slice(None),) * dim + (idx,)].clone()
    idx = idx.to(t.device)
    out = t.index_select(dim, idx.clamp(min=0))
    pad = (idx < 0).nonzero().flatten()
    return out.index_fill(dim, pad, fill) if pad.numel() else out


def slice_bn(bn: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    """A BatchNorm over the channels ``idx`` of ``bn`` (identity on padding channels)."""
    out = copy.deepcopy(bn)
    for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        t = getattr(bn, name)
        if t is not None:
            getattr(out, name).data = take(t.data, idx, fill=fill)
    out.num_features = out.running_mean.numel()
    return out


def is_channelwise(gm, node) -> bool:
    if node.op == "call_module":
        return module_of(gm, node, ACTIVATION_MODULES + POOL_MODULES + (nn.BatchNorm2d,)) is not None
    return node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS


def conv_input_scale(conv: nn.Conv2d, inv: torch.Tensor) -> None:
    """Multiply ``conv``'s weights for input channel ``c`` by ``inv[c]`` (any groups)."""
    out_per_group = conv.out_channels // conv.groups
    in_per_group = conv.in_channels // conv.groups
    group_of_row = torch.arange(conv.out_channels, device=inv.device) // out_per_group
    chans = group_of_row[:, None] * in_per_group + torch.arange(in_per_group, device=inv.device)[None, :]
    conv.weight.data = conv.weight.data * inv[chans][:, :, None, None].to(conv.weight.dtype)


def erase_dead(graph: fx.Graph, nodes) -> None:
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


def add_constant(gm: fx.GraphModule, base: str, value: torch.Tensor) -> fx.Node:
    name, k = base.replace(".", "_") + "_deploy", 1
    while hasattr(gm, name):
        k += 1
        name = base.replace(".", "_") + f"_deploy{k}"
    gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def cat_node(gm: fx.GraphModule, nodes: list, pieces: Pieces) -> fx.Node:
    """A node holding the Ghost layer's output made of ``nodes`` (a cat, plus a gather when out of order)."""
    if pieces.in_order:
        out = gm.graph.call_function(torch.cat, (list(nodes),), {"dim": 1})
    else:
        flat = pieces.flat
        order = torch.tensor(sorted((q for q, c in enumerate(flat) if c >= 0), key=lambda q: flat[q]))
        out = gm.graph.call_function(ghost_cat, (list(nodes), add_constant(gm, f"{pieces.layer}_cat_order", order)))
    out.meta["ghostify_cat"] = pieces
    return out

def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` becomes ``bn(conv(x))`` (eval mode), in place."""
    scale, shift = bn_affine(bn)
    w = conv.weight.data
    bias = conv.bias.data if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter(w * scale.reshape(-1, 1, 1, 1).to(w.dtype))
    conv.bias = nn.Parameter((bias * scale + shift).to(w.dtype))

def is_add(node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
            and not node.kwargs and len(node.args) == 2)


def pieces_of(node) -> Pieces | None:
    """The :class:`Pieces` of a cat that :class:`InlineGhost` (or a pass after it) made."""
    return node.meta["ghostify_cat"] if isinstance(node, fx.Node) and "ghostify_cat" in node.meta else None


def slice_conv(conv: nn.Conv2d, rows=None, cols=None, groups: bool = False) -> nn.Conv2d:
    """A copy of ``conv`` restricted to output channels ``rows`` / input channels ``cols`` (``groups``:
    a depthwise conv restricted to channels ``rows``)."""
    rows = slice(None) if rows is None else rows
    if isinstance(conv, ChannelAffine) and cols is None:
        return ChannelAffine(take(conv.weight.data.reshape(-1), rows, fill=1.0), take(conv.bias.data, rows))
    w = take(conv.weight.data, rows)  # padding channels: zero filters / zero input columns
    w = take(w, cols, dim=1) if cols is not None else w
    out_c, in_c = w.shape[0], (w.shape[0] if groups else w.shape[1] * conv.groups)
    part = nn.Conv2d(in_c, out_c, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups=out_c if groups else conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=w.device, dtype=w.dtype)
    part.weight.data = w.clone()
    if conv.bias is not None:
        part.bias.data = take(conv.bias.data, rows)
    return part
