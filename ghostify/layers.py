"""Ghost modules: the drop-in ``GhostConv2d`` and the paper-style ``GhostModule``.

A Ghost layer makes ``n`` output maps from a primary conv that computes only
``m = ceil(n / ratio)`` intrinsic maps; a cheap op turns the intrinsic maps into
the ``n - m`` remaining "ghost" maps (Han et al., GhostNet, CVPR 2020)::

    x ──primary conv (m filters)──► intrinsic ──┬──────────────► cat ─► [:n] ─► order ─► y
                                                 └─cheap op────► ghosts ┘

``GhostConv2d`` holds no BN or activation, so it replaces an ``nn.Conv2d`` in a
trained network: same input, same output shape, same output channel order.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .ratio import check_ratio, per_parent

__all__ = ["ghost_macs_per_position", "GhostConv2d", "GhostModule", "DepthwiseCheap", "MixCheap", "CHEAP_OPS", "register_cheap_op"]


class DepthwiseCheap(nn.Module):
    """The paper's cheap op: a ``dw_size x dw_size`` depthwise conv, ``ceil(ratio - 1)`` ghosts per intrinsic map.

    Ghost slot ``k`` is computed from intrinsic map ``k // ceil(ratio - 1)`` (see :meth:`parents`).
    Slots past ``num_ghosts`` are computed by the conv and dropped (with a fractional ratio
    below 2 only the first ``num_ghosts`` intrinsic maps have a ghost).

    Example:
        >>> op = DepthwiseCheap(intrinsic=4, num_ghosts=7, ratio=3, dw_size=3)
        >>> op(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 7, 8, 8])
    """

    def __init__(self, intrinsic: int, num_ghosts: int, ratio: float, dw_size: int = 3, bias: bool = False):
        super().__init__()
        if dw_size < 1 or dw_size % 2 == 0:
            raise ValueError(f"dw_size must be a positive odd number (got {dw_size}); use 1, 3 or 5")
        self.num_ghosts = num_ghosts
        self.per_parent = per_parent(ratio)
        self.conv = nn.Conv2d(intrinsic, intrinsic * self.per_parent, dw_size, padding=dw_size // 2,
                              groups=intrinsic, bias=bias)

    def parents(self) -> torch.Tensor:
        """Index of the intrinsic map each kept ghost is computed from."""
        return torch.arange(self.num_ghosts) // self.per_parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.shape[1] == self.num_ghosts else y[:, : self.num_ghosts]


class MixCheap(nn.Module):
    """A cheap op that mixes the intrinsic maps: a (grouped) 1x1 conv to the ghosts, optionally
    followed by a ``dw_size x dw_size`` depthwise conv on each ghost.

    Costs ``m * (n - m) / groups`` MACs per position (+ ``(n - m) * dw_size^2`` with the
    depthwise conv), against ``n * m * k^2``-ish for the primary conv.

    Example:
        >>> op = MixCheap(intrinsic=4, num_ghosts=6, dw_size=1)
        >>> op(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 6, 8, 8])
    """

    def __init__(self, intrinsic: int, num_ghosts: int, ratio: int = 2, dw_size: int = 1, bias: bool = False,
                 groups: int = 1):
        super().__init__()
        if intrinsic % groups or num_ghosts % groups:
            raise ValueError(f"mix groups={groups} must divide both {intrinsic} intrinsic and {num_ghosts} ghost maps")
        self.num_ghosts = num_ghosts
        self.mix = nn.Conv2d(intrinsic, num_ghosts, 1, groups=groups, bias=bias)
        self.dw = (nn.Conv2d(num_ghosts, num_ghosts, dw_size, padding=dw_size // 2, groups=num_ghosts, bias=False)
                   if dw_size > 1 else None)

    @torch.no_grad()
    def load_mix(self, matrix: torch.Tensor) -> None:
        """Set the 1x1 mixing weights from a ``(num_ghosts, intrinsic)`` matrix (block-diagonal when grouped);
        the depthwise conv, if any, becomes the identity."""
        g = self.mix.groups
        per_in, per_out = self.mix.in_channels // g, self.num_ghosts // g
        w = torch.stack([matrix[i * per_out:(i + 1) * per_out, i * per_in:(i + 1) * per_in] for i in range(g)])
        self.mix.weight.copy_(w.reshape(self.mix.weight.shape).to(self.mix.weight.dtype))
        if self.dw is not None:
            self.dw.weight.zero_()
            c = self.dw.kernel_size[0] // 2
            self.dw.weight[:, 0, c, c] = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(x)
        return y if self.dw is None else self.dw(y)


CHEAP_OPS: dict[str, Callable[..., nn.Module]] = {"dw": DepthwiseCheap, "mix": MixCheap}


def register_cheap_op(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register a cheap-op family under ``name`` (usable as a decorator).

    ``factory(intrinsic, num_ghosts, ratio, dw_size, bias)`` must return a module mapping
    ``(N, intrinsic, H, W)`` to ``(N, num_ghosts, H, W)``. Duplicate names are refused.
    """

    def add(f):
        if name in CHEAP_OPS:
            raise ValueError(f"cheap op {name!r} is already registered")
        CHEAP_OPS[name] = f
        return f

    return add(factory) if factory is not None else add


def ghost_macs_per_position(in_channels: int, out_channels: int, kernel_size, ratio: float, dw_size: int,
                            cheap: str) -> tuple[int, int]:
    """Multiply-adds per output position of a Ghost layer and of the conv it replaces: ``(ghost, conv)``.

    The primary conv costs ``m * in * kh * kw``; ``dw`` adds ``m * ceil(ratio - 1) * d^2`` (its conv
    computes every slot), ``mix`` adds ``m * (n - m)`` and ``(n - m) * d^2`` with a depthwise
    conv after it. Other families are counted like ``dw``.

    Example:
        >>> ghost_macs_per_position(64, 64, 3, 2, 3, "dw")
        (18720, 36864)
        >>> ghost_macs_per_position(24, 144, 1, 2, 1, "mix")  # mixing 72 maps costs more than the conv
        (6912, 3456)
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    m = math.ceil(out_channels / ratio)
    ghosts = out_channels - m
    cheap_cost = 0
    if ghosts:
        cheap_cost = (m * ghosts + (ghosts * dw_size * dw_size if dw_size > 1 else 0) if cheap == "mix"
                      else m * per_parent(ratio) * dw_size * dw_size)
    return m * in_channels * kh * kw + cheap_cost, out_channels * in_channels * kh * kw


class GhostConv2d(nn.Module):
    """Drop-in replacement for ``nn.Conv2d`` computed as a Ghost layer.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias:
            as ``nn.Conv2d`` (string and per-dimension padding included); ``groups`` is 1.
        ratio: ``s``; the primary conv computes ``m = ceil(out_channels / s)`` maps (an integer
            >= 1 or a fraction > 1: ``s = 4/3`` keeps three quarters of the filters).
        dw_size: kernel size of the cheap op (odd).
        cheap: name of a cheap-op family in :data:`CHEAP_OPS`.

    The buffer ``channel_map`` says which original output channel each internal channel
    is: internal channel ``i`` (intrinsic maps first, then ghosts) is output channel
    ``channel_map[i]``. The module scatters its maps into that order in a single copy,
    like ``torch.cat`` (``emit_internal_order=True`` skips it when the consumers were
    permuted instead; see :func:`ghostify.fold_channel_order`).

    Example:
        >>> g = GhostConv2d(16, 32, 3, padding=1, ratio=2)
        >>> g(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
        >>> g.intrinsic_channels, round(g.weight_ratio(), 2)
        (16, 0.53)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, ratio: float = 2, dw_size: int = 3, cheap: str = "dw",
                 cheap_bias: bool | None = None, device=None, dtype=None):
        super().__init__()
        if cheap not in CHEAP_OPS:
            raise ValueError(f"unknown cheap op {cheap!r}; choose one of {sorted(CHEAP_OPS)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.ratio, self.dw_size, self.cheap_kind = check_ratio(ratio), dw_size, cheap
        m = math.ceil(out_channels / self.ratio)
        self.primary = nn.Conv2d(in_channels, m, kernel_size, stride, padding, dilation, bias=bias,
                                 device=device, dtype=dtype)
        ghosts = out_channels - m
        cheap_bias = bias if cheap_bias is None else cheap_bias
        self.cheap = (CHEAP_OPS[cheap](m, ghosts, self.ratio, dw_size, cheap_bias).to(device=device, dtype=dtype)
                      if ghosts > 0 else None)
        self.register_buffer("channel_map", torch.arange(out_channels, device=device))
        self.emit_internal_order = False
        self._identity_order = True

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ratio: float = 2, dw_size: int = 3, cheap: str = "dw",
                  cheap_bias: bool | None = None) -> "GhostConv2d":
        """An uninitialised ``GhostConv2d`` with the geometry of ``conv`` (same device and dtype).

        Its weights hold arbitrary values until an init strategy (``ghostify.transfer``) or
        ``load_state_dict`` sets them; the channel order starts as the identity.
        """
        if conv.groups != 1:
            raise ValueError(f"groups={conv.groups} is not supported; Ghost layers replace groups=1 convs")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; only 'zeros'")
        w = conv.weight
        ghost = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, ratio=ratio, dw_size=dw_size, cheap=cheap,
                    cheap_bias=cheap_bias, device="meta", dtype=w.dtype)
        ghost.to_empty(device=w.device)  # skips a random init that every strategy overwrites
        ghost.channel_map.copy_(torch.arange(conv.out_channels))
        return ghost

    # -- channel order ------------------------------------------------------------------------
    @property
    def intrinsic_channels(self) -> int:
        return self.primary.out_channels

    def set_channel_map(self, channel_map: torch.Tensor) -> None:
        """Set which original output channel each internal channel is (a permutation of ``range(n)``)."""
        channel_map = torch.as_tensor(channel_map, dtype=torch.long, device=self.channel_map.device)
        if sorted(channel_map.tolist()) != list(range(self.out_channels)):
            raise ValueError("channel_map must be a permutation of range(out_channels)")
        self.channel_map.copy_(channel_map)
        self._identity_order = bool((channel_map == torch.arange(self.out_channels,
                                                                 device=channel_map.device)).all())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.set_channel_map(self.channel_map.clone())

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        if self.cheap is None:
            return y if (self._identity_order or self.emit_internal_order) else y[:, inverse_permutation(self.channel_map)]
        g = self.cheap(y)
        if self._identity_order or self.emit_internal_order:
            return torch.cat([y, g], dim=1)
        # One scatter copy into the output, the same memory traffic as torch.cat.
        m = y.shape[1]
        out = y.new_empty((y.shape[0], self.out_channels) + tuple(y.shape[2:]))
        out.index_copy_(1, self.channel_map[:m], y)
        out.index_copy_(1, self.channel_map[m:], g)
        return out

    # -- accounting ---------------------------------------------------------------------------
    def weight_ratio(self) -> float:
        """Parameters of this layer divided by those of the ``nn.Conv2d`` it replaces."""
        kh, kw = self.primary.kernel_size
        conv = self.out_channels * self.in_channels * kh * kw + (self.out_channels if self.primary.bias is not None else 0)
        return sum(p.numel() for p in self.parameters()) / conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, ratio={self.ratio}, dw_size={self.dw_size}, "
                f"cheap={self.cheap_kind!r}" + (", emit_internal_order=True" if self.emit_internal_order else ""))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm`` (``x[:, perm][:, inverse_permutation(perm)] == x``)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class GhostModule(nn.Module):
    """The paper's Ghost module, with BN and (optional) ReLU inside both branches.

    For building Ghost networks from scratch, as in the official GhostNet code; use
    :class:`GhostConv2d` to replace a conv inside a trained network.

    Example:
        >>> GhostModule(16, 32, kernel_size=1, ratio=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
    """

    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, relu: bool = True):
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        act = (lambda: nn.ReLU(inplace=True)) if relu else nn.Identity
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels), act())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]
