"""MAC and parameter counts (fvcore: one multiply-add = 1 MAC) worked out by hand, and the report."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from ghostify import GhostConv2d, GhostifyError, convert, count, report
from ghostify.measure.counting import format_size


def test_single_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    c = count(conv, torch.randn(1, 3, 4, 4))
    # 8 filters x (3*3*3 = 27 taps) x (4*4 = 16 positions) = 3456; 8*27 = 216 weights
    assert (c.macs, c.params) == (3456, 216)


def test_conv_bias_and_batch():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    c = count(conv, torch.randn(2, 3, 4, 4))
    # bias adds are not multiply-adds: 2 images x 3456 = 6912; params 216 + 8 bias = 224
    assert (c.macs, c.params) == (6912, 224)


def test_stride_and_padding_change_the_positions():
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=0, bias=False)
    c = count(conv, torch.randn(1, 2, 7, 7))
    # output 3x3 = 9 positions; 4 filters x 2*3*3 = 18 taps -> 4*18*9 = 648
    assert c.macs == 648 and c.params == 72


def test_small_sequential_net():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).train()
    c = count(net, torch.randn(1, 3, 4, 4))
    # conv: 4 x 27 x 16 = 1728
    # BN (counted in eval mode, affine): 2 per element, 4*4*4 = 64 elements -> 128
    # ReLU, Flatten: 0; adaptive avg pool: 1 per input element -> 64; Linear: 4*5 = 20
    assert c.macs_by_module["0"] == 1728
    assert c.macs_by_module["1"] == 128
    assert c.macs_by_module["3"] == 64
    assert c.macs_by_module["5"] == 20
    assert c.macs == 1728 + 128 + 64 + 20 == 1940
    # params: conv 108, BN weight+bias 8 (running stats are buffers), Linear 4*5+5 = 25
    assert c.params == 108 + 8 + 25 == 141
    assert net.training  # counted in eval, mode restored


@pytest.mark.parametrize("permute", [False, True])
def test_ghost_conv_counts(permute):
    g = GhostConv2d(4, 6, 3, padding=1, bias=False, ratio=4, dw_size=3)
    if permute:
        g.set_channel_map(torch.tensor([5, 3, 1, 0, 2, 4]))  # run-time scatter: data movement only
    c = count(g, torch.randn(1, 4, 5, 5))
    # m = ceil(6/4) = 2 intrinsic maps; 4 ghosts, but the depthwise op computes m*(4-1) = 6 maps
    # (2 dropped) - they are computed, so they are counted.
    # primary: 2 filters x 4*3*3 taps x 25 positions = 1800
    # cheap:   6 depthwise 3x3 filters x 9 taps x 25 positions = 1350
    assert c.macs_by_module["primary"] == 1800
    assert c.macs_by_module["cheap"] == 1350
    assert c.macs == 3150
    # params: primary 2*4*9 = 72, cheap 6*1*9 = 54
    assert c.params == 126
    assert c.uncounted == {}  # index_copy_/cat/slice are zero-MAC, not "uncounted"


def test_ghost_conv_ratio_divides():
    g = GhostConv2d(8, 16, 1, bias=True, ratio=2, dw_size=5)
    c = count(g, torch.randn(1, 8, 6, 6))
    # m = 8; primary 8 x 8 x 36 = 2304; cheap 8 depthwise 5x5 over 36 positions = 8*25*36 = 7200
    assert (c.macs_by_module["primary"], c.macs_by_module["cheap"]) == (2304, 7200)
    # params: primary 64 + 8 bias, cheap 8*25 + 8 bias
    assert c.params == 72 + 208


@pytest.mark.parametrize("fold", [True, False])
def test_converted_chain_net(chain_net, fold):
    x = torch.randn(1, 3, 8, 8)
    before = count(chain_net, x)
    # stem 8*27*64 = 13824, bn0 2*8*64 = 1024, conv1 16*72*64 = 73728, bn1 2*16*64 = 2048,
    # conv2 12*16*64 = 12288, bn2 2*12*64 = 1536, pool 12*64 = 768, fc 12*5 = 60
    assert before.macs == 13824 + 1024 + 73728 + 2048 + 12288 + 1536 + 768 + 60 == 105276
    ghost = convert(chain_net, fold=fold)
    after = count(ghost, x)
    # conv1 -> m = 8: primary 8*72*64 = 36864, cheap 8*9*64 = 4608  -> 41472
    # conv2 -> m = 6: primary 6*16*64 = 6144,  cheap 6*9*64 = 3456  -> 9600
    assert after.macs_by_module["conv1"] == 36864 + 4608
    assert after.macs_by_module["conv2"] == 6144 + 3456
    assert after.macs == 105276 - 73728 - 12288 + 41472 + 9600 == 70332
    # params: conv1 16*72 = 1152 -> 8*72 + 8*9 = 648; conv2 12*16+12 = 204 -> (6*16+6) + (6*9+6) = 162
    assert (before.params_by_module["conv1"], after.params_by_module["conv1"]) == (1152, 648)
    assert (before.params_by_module["conv2"], after.params_by_module["conv2"]) == (204, 162)
    assert after.params == before.params - 1152 - 204 + 648 + 162


def test_uncounted_ops_are_listed(residual_net):
    c = count(residual_net, torch.randn(1, 3, 8, 8))
    assert c.uncounted == {"aten::add": 1}  # the residual add: no multiply-adds, but reported


def test_resnet50_ratio2_macs():
    model = torchvision.models.resnet50().eval()
    ghost = convert(model, ratio=2, init="none")  # MACs do not depend on the weights
    after = count(ghost, torch.randn(1, 3, 224, 224))
    # ResNet-50 is ~4.1 GMACs; ratio 2 roughly halves every converted conv (the stem and fc stay)
    assert after.macs <= 2.2e9
    assert after.macs > 1.5e9


@pytest.mark.parametrize("x,text", [(999, "999"), (3456, "3.46K"), (70332, "70.3K"), (4.11e9, "4.11G"),
                                    (1.5e6, "1.5M"), (0, "0")])
def test_format_size(x, text):
    assert format_size(x) == text


# -- the report ----------------------------------------------------------------------------------


def test_report_figures_by_hand(chain_net):
    ghost = convert(chain_net)
    rep = report(chain_net, ghost, input_size=(1, 3, 8, 8))
    assert (rep.macs_before, rep.macs_after) == (105276, 70332)
    assert (rep.params_before, rep.params_after) == (1709, 1163)
    assert rep.mode == "fx" and rep.trace_error is None
    rows = {r.name: r for r in rep.layers}
    assert list(rows) == ["stem", "conv1", "conv2"]
    assert (rows["stem"].action, rows["stem"].macs_before, rows["stem"].macs_after) == ("skip", 13824, 13824)
    r = rows["conv1"]
    assert (r.action, r.ratio, r.dw_size, r.init, r.cheap) == ("convert", 2, 3, "copy", "dw")
    assert (r.macs_before, r.macs_after, r.params_before, r.params_after) == (73728, 41472, 1152, 648)
    assert r.folded == ("conv1" in ghost.ghostify_info.folded)
    assert 0 <= r.info["weight_residual"] <= 1
    assert [x.name for x in rep.converted] == ["conv1", "conv2"] and [x.name for x in rep.skipped] == ["stem"]

    d = json.loads(rep.to_json())
    assert d["macs_before"] == 105276 and d["macs_after"] == 70332
    assert d["macs_ratio"] == pytest.approx(70332 / 105276)
    assert d["params_ratio"] == pytest.approx(1163 / 1709)
    assert d["converted"] == ["conv1", "conv2"]
    assert d["skipped"][0]["name"] == "stem" and d["skipped"][0]["reason"].startswith("stem")
    assert d["input_size"] == [1, 3, 8, 8]

    table = rep.table()
    assert "2 convs converted, 1 kept, mode=fx" in table
    assert "105K" in table and "70.3K" in table and "0.668" in table
    for name in ("stem", "conv1", "conv2"):
        assert f"| {name} " in table


def test_report_on_swap_mode_notes_the_trace_error(untraceable_net):
    ghost = convert(untraceable_net)
    rep = report(untraceable_net, ghost, input_size=(1, 3, 8, 8))
    assert rep.mode == "swap" and rep.trace_error.startswith("TraceError")
    assert "could not be traced" in rep.table()
    assert rep.macs_after < rep.macs_before


def test_report_lists_uncounted_ops(residual_net):
    ghost = convert(residual_net)
    rep = report(residual_net, ghost, input_size=(1, 3, 8, 8))
    assert rep.uncounted_ops.get("aten::add") == 1
    assert "aten::add x1" in rep.table()


def test_report_with_latency(chain_net):
    ghost = convert(chain_net)
    rep = report(chain_net, ghost, input_size=(1, 3, 8, 8), latency=True, repeats=3, batch_sizes=(1, 2))
    assert set(rep.latency) == {"batch 1", "batch 2"}
    for lat in rep.latency.values():
        assert lat["before"]["repeats"] == lat["after"]["repeats"] == 3
        assert 0 < lat["before"]["min_ms"] <= lat["before"]["median_ms"] <= lat["before"]["max_ms"]
    assert "latency batch 1 (ms)" in rep.table()


def test_report_needs_a_converted_model(chain_net):
    with pytest.raises(GhostifyError, match="ghostify.convert"):
        report(chain_net, chain_net, input_size=(1, 3, 8, 8))
