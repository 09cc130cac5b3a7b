"""GhostConv2d / DepthwiseCheap / GhostModule: shapes, copy init, channel order."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ghostify import CHEAP_OPS, DepthwiseCheap, GhostConv2d, GhostModule, register_cheap_op
from ghostify.layers import ghost_macs_per_position
from ghostify.init.transfer import copy_layer as _copy_layer


def copy_layer(conv, ghost):
    # init_copy runs copy_layer under no_grad; test_copy_layer_needs_no_no_grad covers calling it bare
    with torch.no_grad():
        return _copy_layer(conv, ghost)

# -- the geometry grid ---------------------------------------------------------------------------
# kernel x stride x padding x dilation, minus padding='same' with stride 2 (nn.Conv2d refuses it):
# 4*2*4*2 = 64 geometries - 4 kernels*2 dilations = 56. Crossed with out_channels (odd/even) and
# ratio 2..5 that is 56*2*4 = 448 cases; bias and dw_size are rotated over the cases so that every
# value meets every geometry without multiplying the count by another 2*3.
KERNELS = [1, 3, 5, (1, 3)]
STRIDES = [1, 2]
PADDINGS = [0, 1, "same", (0, 1)]
DILATIONS = [1, 2]
GEOMETRIES = [g for g in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS)
              if not (g[2] == "same" and g[1] != 1)]
assert len(GEOMETRIES) == 56

def _fmt(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


GRID = []
for i, ((k, s, p, d), n, r) in enumerate(itertools.product(GEOMETRIES, [7, 8], [2, 3, 4, 5])):
    bias = (i // 3) % 2 == 0
    dw = (1, 3, 5)[i % 3]
    GRID.append(pytest.param(k, s, p, d, bias, n, r, dw,
                             id=f"k{_fmt(k)}-s{s}-p{_fmt(p)}-d{d}-b{int(bias)}-n{n}-r{r}-dw{dw}"))

IN_CH, SIZE = 3, 11  # a 5x5 kernel with dilation 2 spans 9 pixels: 11x11 keeps every output non-empty


def _conv(k, s, p, d, bias, n, dtype=torch.float32):
    return nn.Conv2d(IN_CH, n, k, stride=s, padding=p, dilation=d, bias=bias, dtype=dtype)


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias,out_channels,ratio,dw_size", GRID)
def test_grid_shape_and_copy_init(kernel, stride, padding, dilation, bias, out_channels, ratio, dw_size):
    conv = _conv(kernel, stride, padding, dilation, bias, out_channels)
    x = torch.randn(2, IN_CH, SIZE, SIZE)
    ghost = GhostConv2d.from_conv(conv, ratio=ratio, dw_size=dw_size)
    ref = conv(x)

    m = math.ceil(out_channels / ratio)
    assert ghost.intrinsic_channels == ghost.primary.out_channels == m
    # the cheap op computes m*(ratio-1) maps (some dropped when ratio does not divide n), depthwise
    assert ghost.cheap.conv.out_channels == m * (ratio - 1) >= out_channels - m
    assert ghost.cheap.conv.groups == m and ghost.cheap.conv.kernel_size == (dw_size, dw_size)
    assert ghost(x).shape == ref.shape  # before init

    residual = copy_layer(conv, ghost)
    assert 0.0 <= residual <= 1.0 + 1e-6  # least squares is never worse than the zero kernel
    cmap = ghost.channel_map
    assert sorted(cmap.tolist()) == list(range(out_channels))
    intrinsic = cmap[:m]
    assert torch.equal(ghost.primary.weight, conv.weight[intrinsic])  # copied bit-exactly
    if bias:
        assert torch.equal(ghost.primary.bias, conv.bias[intrinsic])

    out = ghost(x)
    assert out.shape == ref.shape
    assert_close(out[:, intrinsic], ref[:, intrinsic])


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES,
                         ids=[f"k{_fmt(k)}-s{s}-p{_fmt(p)}-d{d}" for k, s, p, d in GEOMETRIES])
@pytest.mark.parametrize("bias", [True, False])
def test_ratio_one_reproduces_conv(kernel, stride, padding, dilation, bias):
    conv = _conv(kernel, stride, padding, dilation, bias, 6)
    ghost = GhostConv2d.from_conv(conv, ratio=1)
    assert ghost.cheap is None and ghost.intrinsic_channels == 6
    assert copy_layer(conv, ghost) == 0.0
    assert torch.equal(ghost.channel_map, torch.arange(6))
    x = torch.randn(2, IN_CH, SIZE, SIZE)
    assert_close(ghost(x), conv(x))
    assert sum(p.numel() for p in ghost.parameters()) == sum(p.numel() for p in conv.parameters())


def test_from_conv_keeps_dtype_and_copy_is_exact_in_double():
    conv = _conv(3, 1, 1, 1, True, 10, dtype=torch.float64)
    ghost = GhostConv2d.from_conv(conv, ratio=3, dw_size=3)
    assert all(p.dtype == torch.float64 for p in ghost.parameters())
    copy_layer(conv, ghost)
    x = torch.randn(1, IN_CH, 8, 8, dtype=torch.float64)
    idx = ghost.channel_map[: ghost.intrinsic_channels]
    assert_close(ghost(x)[:, idx], conv(x)[:, idx], rtol=1e-12, atol=1e-12)


def test_copy_layer_needs_no_no_grad():
    """copy_layer is the public one-layer copy init: it must work on ordinary (requires_grad) modules."""
    conv = _conv(3, 1, 1, 1, True, 8)
    ghost = GhostConv2d.from_conv(conv, ratio=2)
    _copy_layer(conv, ghost)  # not wrapped in torch.no_grad()
    assert ghost.primary.weight.requires_grad and ghost.primary.weight.grad_fn is None
    x = torch.randn(1, IN_CH, 6, 6)
    idx = ghost.channel_map[:4]
    assert_close(ghost(x)[:, idx], conv(x)[:, idx])


# -- planted: ghosts that are exact scalar multiples of intrinsic filters -----------------------


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("dw_size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_planted_scalar_multiples_are_reproduced_exactly(ratio, dw_size, stride):
    families, cin = 4, 5
    base = torch.randn(families, cin, 3, 3)
    scales = torch.tensor([1.0, -0.5, 2.5])[:ratio]
    # filter f*ratio + j is scales[j] times base filter f; shuffle so families are not contiguous
    w = (base[:, None] * scales[None, :, None, None, None]).reshape(families * ratio, cin, 3, 3)
    perm = torch.randperm(families * ratio)
    conv = nn.Conv2d(cin, families * ratio, 3, stride=stride, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w[perm])
        conv.bias.uniform_(-1, 1)
    ghost = GhostConv2d.from_conv(conv, ratio=ratio, dw_size=dw_size)
    residual = copy_layer(conv, ghost)
    assert residual < 1e-5
    x = torch.randn(2, cin, 9, 9)
    # every channel, borders included: the fitted kernel is a centre tap, so zero padding agrees
    assert_close(ghost(x), conv(x), rtol=1e-4, atol=1e-5)


# -- channel order -------------------------------------------------------------------------------


def _internal(ghost: GhostConv2d, x: torch.Tensor) -> torch.Tensor:
    y = ghost.primary(x)
    return y if ghost.cheap is None else torch.cat([y, ghost.cheap(y)], 1)


@pytest.mark.parametrize("out_channels,ratio", [(10, 3), (9, 2), (6, 1)])
def test_channel_map_scatters_internal_channels(out_channels, ratio):
    ghost = GhostConv2d(4, out_channels, 3, padding=1, ratio=ratio)
    perm = torch.randperm(out_channels)
    assert not torch.equal(perm, torch.arange(out_channels))
    ghost.set_channel_map(perm)
    x = torch.randn(2, 4, 6, 6)
    internal = _internal(ghost, x)
    out = ghost(x)
    for i in range(out_channels):
        assert torch.equal(out[:, perm[i]], internal[:, i])
    ghost.emit_internal_order = True
    assert torch.equal(ghost(x), internal)


def test_identity_channel_map_is_plain_concat():
    ghost = GhostConv2d(4, 8, 3, padding=1, ratio=2)
    ghost.set_channel_map(torch.randperm(8))
    ghost.set_channel_map(torch.arange(8))
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(ghost(x), _internal(ghost, x))


def test_set_channel_map_rejects_non_permutations():
    ghost = GhostConv2d(4, 6, 3, ratio=2)
    for bad in ([0, 1, 2, 3, 4, 4], [0, 1, 2], [1, 2, 3, 4, 5, 6]):
        with pytest.raises(ValueError, match="permutation"):
            ghost.set_channel_map(torch.tensor(bad))
    assert torch.equal(ghost.channel_map, torch.arange(6))


def test_state_dict_round_trip_restores_channel_order():
    ghost = GhostConv2d(4, 10, 3, padding=1, ratio=3)
    ghost.set_channel_map(torch.randperm(10))
    fresh = GhostConv2d(4, 10, 3, padding=1, ratio=3)
    fresh.load_state_dict(ghost.state_dict())
    assert torch.equal(fresh.channel_map, ghost.channel_map)
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(fresh(x), ghost(x))


# -- DepthwiseCheap ------------------------------------------------------------------------------


def test_depthwise_cheap_drops_surplus_slots():
    # 4 intrinsic maps, ratio 3 -> 2 slots per parent = 8 computed, 7 kept
    op = DepthwiseCheap(intrinsic=4, num_ghosts=7, ratio=3, dw_size=3)
    assert op.conv.out_channels == 8 and op.conv.groups == 4
    assert op.parents().tolist() == [0, 0, 1, 1, 2, 2, 3]
    x = torch.randn(1, 4, 6, 6)
    out = op(x)
    assert out.shape == (1, 7, 6, 6)
    assert torch.equal(out, op.conv(x)[:, :7])


@pytest.mark.parametrize("dw_size", [0, 2, 4, -1])
def test_depthwise_cheap_rejects_bad_sizes(dw_size):
    with pytest.raises(ValueError, match="odd"):
        DepthwiseCheap(4, 4, 2, dw_size=dw_size)


# -- construction errors and accounting ----------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, -1, 0.5, float("nan"), float("inf"), "2", True])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        GhostConv2d(4, 8, 3, ratio=ratio)


@pytest.mark.parametrize("cheap", ["dw", "mix"])
def test_fractional_ratio_shapes_and_macs(cheap):
    # n=12, s=1.5: m = ceil(12/1.5) = 8 intrinsic maps, 4 ghosts; dw: one slot per intrinsic map (8, 4 kept)
    g = GhostConv2d(5, 12, 3, padding=1, ratio=1.5, cheap=cheap, dw_size=3)
    assert g.intrinsic_channels == 8 and g.ratio == 1.5
    assert g(torch.randn(2, 5, 6, 6)).shape == (2, 12, 6, 6)
    ghost, conv = ghost_macs_per_position(5, 12, 3, 1.5, 3, cheap)
    assert conv == 12 * 5 * 9
    assert ghost == 8 * 5 * 9 + (8 * 1 * 9 if cheap == "dw" else 8 * 4 + 4 * 9)
    if cheap == "dw":
        assert g.cheap.conv.out_channels == 8 and g.cheap.parents().tolist() == [0, 1, 2, 3]
    assert GhostConv2d(5, 12, 3, ratio=2.0).ratio == 2 and isinstance(GhostConv2d(5, 12, 3, ratio=2.0).ratio, int)


def test_unknown_cheap_op():
    with pytest.raises(ValueError, match="unknown cheap op"):
        GhostConv2d(4, 8, 3, cheap="nope")


@pytest.mark.parametrize("conv,match", [(nn.Conv2d(4, 8, 3, groups=2), "groups"),
                                        (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), "padding_mode")])
def test_from_conv_refuses_unsupported(conv, match):
    with pytest.raises(ValueError, match=match):
        GhostConv2d.from_conv(conv)


def test_weight_ratio_by_hand():
    g = GhostConv2d(16, 32, 3, padding=1, ratio=2, dw_size=3)
    # primary: 16 filters x 16*3*3 + 16 bias = 2320; cheap: 16 depthwise 3x3 + 16 bias = 160
    # conv it replaces: 32 x 16*3*3 + 32 = 4640  ->  2480 / 4640
    assert sum(p.numel() for p in g.parameters()) == 2480
    assert g.weight_ratio() == pytest.approx(2480 / 4640)


def test_register_cheap_op():
    class Repeat(nn.Module):  # each ghost is its parent intrinsic map, unchanged
        def __init__(self, intrinsic, num_ghosts, ratio, dw_size, bias):
            super().__init__()
            self.idx = torch.arange(num_ghosts) // (ratio - 1)

        def forward(self, x):
            return x[:, self.idx]

    register_cheap_op("repeat-test", Repeat)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_cheap_op("repeat-test", Repeat)
        g = GhostConv2d(3, 7, 3, padding=1, ratio=3, cheap="repeat-test")
        x = torch.randn(1, 3, 5, 5)
        y = g.primary(x)  # 3 intrinsic maps, 4 ghosts with parents 0, 0, 1, 1
        assert torch.equal(g(x), torch.cat([y, y[:, [0, 0, 1, 1]]], 1))
    finally:
        del CHEAP_OPS["repeat-test"]
    with pytest.raises(ValueError, match="already registered"):
        register_cheap_op("dw", DepthwiseCheap)


# -- GhostModule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inp,oup,k,ratio,dw,stride,relu,expect", [
    (16, 32, 1, 2, 3, 1, True, (2, 32, 8, 8)),
    (16, 31, 3, 3, 3, 2, True, (2, 31, 4, 4)),
    (8, 10, 1, 4, 5, 1, False, (2, 10, 8, 8)),
])
def test_ghost_module_shape(inp, oup, k, ratio, dw, stride, relu, expect):
    mod = GhostModule(inp, oup, kernel_size=k, ratio=ratio, dw_size=dw, stride=stride, relu=relu).eval()
    init = math.ceil(oup / ratio)
    assert mod.primary_conv[0].out_channels == init
    assert mod.cheap_operation[0].out_channels == init * (ratio - 1)
    assert mod.cheap_operation[0].groups == init
    assert isinstance(mod.primary_conv[2], nn.ReLU if relu else nn.Identity)
    x = torch.randn(2, inp, 8, 8)
    out = mod(x)
    assert out.shape == expect
    # the first ``init`` channels are the primary branch's output
    assert_close(out[:, :init], mod.primary_conv(x))
