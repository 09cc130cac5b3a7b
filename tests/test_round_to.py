"""``round_to``: intrinsic counts kept at a multiple (for runtimes that slow down on other channel counts)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify import GhostifyError, LayerSpec
from ghostify.cli import cli
from ghostify.ratio import ratio_keeping, rounded_ratio
from ghostify.train.recipe import ghost_config, load_recipe

SIZE = (1, 3, 16, 16)


@pytest.mark.parametrize("n, ratio, q, m", [
    (160, 1.4742, 8, 112),  # ceil(160 / 1.4742) = 109: 112 is the nearest multiple of 8
    (96, 1.4742, 4, 68),    # 66 -> 68 (nearest multiple of 4, rounding half up)
    (96, 1.4742, 8, 64),    # 66 -> 64 (nearest multiple of 8; within 10 %)
    (64, 2, 8, 32),         # already a multiple: the ratio is returned as it is
    (24, 1.26, 8, 20),      # 20 -> 24 would keep every map: unrounded
    (40, 16, 8, 8),         # ceil(40 / 16) = 3 -> at least one multiple, 8
])
def test_rounded_ratio_gives_the_counts_worked_out_by_hand(n, ratio, q, m):
    s = rounded_ratio(n, ratio, q)
    assert math.ceil(n / s) == m
    assert s == ratio or m % q == 0


def test_ratio_keeping_keeps_exactly_the_count_asked_for():
    assert math.ceil(15 / (15 / 13)) == 14  # floating point: n / (n / m) rounds above m here
    assert math.ceil(15 / ratio_keeping(15, 13)) == 13 and ratio_keeping(15, 13) > 15 / 13
    assert ratio_keeping(64, 32) == 2
    for n in range(2, 200):
        for m in range(1, n):
            assert math.ceil(n / ratio_keeping(n, m)) == m


def test_every_rounded_count_is_a_multiple_below_n():
    for n in range(2, 1025):
        for q in (2, 4, 8, 16):
            for ratio in (1.05, 1.26, 1.4742, 2, 2.5, 3, 7.97):
                s = rounded_ratio(n, ratio, q)
                m = math.ceil(n / s)
                assert m < n or s == ratio
                assert m % q == 0 or s == ratio, (n, ratio, q)


def test_convert_rounds_each_layer_and_the_macs_follow(chain_net):
    """ChainNet: conv1 8->16 3x3, conv2 16->12 1x1 on 16x16 maps; ratio 3 gives m = 6 and 4."""
    g = ghostify.convert(chain_net, ratio=3, dw_size=1, init="copy", round_to=8).eval()
    plan = g.ghostify_info.plan
    assert [(e.name, e.intrinsic, e.spec.ratio, e.spec.round_to) for e in plan.converted] == [
        ("conv1", 8, 2, 8), ("conv2", 8, 1.5, 8)]
    assert g.get_submodule("conv1").primary.out_channels == 8 and g.get_submodule("conv2").primary.out_channels == 8
    # conv2 as a dw Ghost layer: primary 8 * 16 * 1 * 1 and cheap 8 x 1x1 (one ghost per intrinsic map, ceil(1.5 - 1))
    # per position, 256 positions (the conv: 16 * 12)
    assert ghostify.count(g, torch.zeros(SIZE)).macs_by_module["conv2"] == (8 * 16 + 8 * 1) * 256
    unrounded = ghostify.convert(chain_net, ratio=3, dw_size=1, init="copy").ghostify_info.plan
    assert [e.intrinsic for e in unrounded.converted] == [6, 4]


def test_rounded_model_saves_and_loads_with_the_same_outputs(tmp_path, chain_net):
    g = ghostify.convert(chain_net, ratio=3, dw_size=1, init="copy", round_to=8).eval()
    path = ghostify.save(g, tmp_path / "g.safetensors")
    back = ghostify.load(path, arch=type(chain_net)).eval()
    assert [e.intrinsic for e in back.ghostify_info.plan.converted] == [8, 8]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(back(x), g(x))


def test_calibrated_conversion_fits_the_rounded_layers(chain_net):
    data = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    g = ghostify.convert(chain_net.eval(), ratio=3, init="calib", calib_data=data, round_to=4).eval()
    assert [e.intrinsic for e in g.ghostify_info.plan.converted] == [8, 4]
    info = g.ghostify_info.layer_info
    assert set(info) == {"conv1", "conv2"} and all(math.isfinite(info[n]["heldout_error"]) for n in info)
    x = torch.randn(4, 3, 16, 16)
    assert g(x).shape == chain_net(x).shape


def test_bad_round_to_is_refused_with_the_fix():
    with pytest.raises(GhostifyError, match="round_to must be an integer >= 1.*--round-to 8"):
        LayerSpec(round_to=0)
    with pytest.raises(GhostifyError, match="round_to"):
        LayerSpec(round_to=2.5)
    r = CliRunner().invoke(cli, ["inspect", "conftest:ChainNet", "--weights", "none", "--round-to", "0"])
    assert r.exit_code != 0 and "--round-to" in r.output


def test_cli_round_to_and_the_override_reach_the_plan():
    args = ["inspect", "conftest:ChainNet", "--weights", "none", "--ratio", "3", "--dw-size", "1", "--json"]
    r = CliRunner().invoke(cli, [*args, "--round-to", "8"])
    assert r.exit_code == 0, r.output
    spec = {e["name"]: e["spec"] for e in json.loads(r.stdout)["entries"] if e["spec"]}
    assert (spec["conv1"]["ratio"], spec["conv2"]["ratio"], spec["conv2"]["round_to"]) == (2, 1.5, 8)
    r = CliRunner().invoke(cli, [*args, "--override", "conv2:round_to=8"])
    assert r.exit_code == 0, r.output
    spec = {e["name"]: e["spec"] for e in json.loads(r.stdout)["entries"] if e["spec"]}
    assert (spec["conv1"]["ratio"], spec["conv2"]["ratio"]) == (3, 1.5)


def test_recipe_conversion_takes_round_to(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("conversion: {ratio: 3, round_to: 8}\n")
    cfg = ghost_config(load_recipe(path).conversion)
    assert cfg.global_spec.round_to == 8 and cfg.global_spec.ratio == 3


def test_allocation_times_and_plans_the_rounded_layers(chain_net, monkeypatch):
    """A latency budget with ``round_to=8``: the layers are timed at the ratio they will get (conv1 16 maps at
    ratio 3 -> 8 intrinsic, ratio 2; conv2 12 -> 8, ratio 1.5), the result read back under the table's ratio 3,
    and the plan converts at the rounded ratio."""
    import ghostify.tradeoffs.allocation as alloc
    from ghostify.tradeoffs.sensitivity import LayerSensitivity, SensitivityTable

    timed = {}

    def fake_latency(model, specs, x, **kw):
        timed.update({n: [r for r, _, _ in s] for n, s in specs.items()})
        return {n: {"conv": 1.0, **{r: 0.5 for r, _, _ in s}} for n, s in specs.items()}

    monkeypatch.setattr(alloc, "layer_latency", fake_latency)
    monkeypatch.setattr(alloc, "measure_latency", lambda models, x, **kw: {"model": {"median_ms": 4.0}})
    total = ghostify.count(chain_net, torch.zeros(*SIZE)).macs
    table = SensitivityTable("kl", "alone", total, [LayerSensitivity(n, 3, 1000, 900, 0.1) for n in ("conv1", "conv2")],
                             input_size=SIZE)
    config = ghostify.GhostConfig(LayerSpec(ratio=3, dw_size=1, init="copy", round_to=8))
    a = alloc.allocate(chain_net, target_latency=0.8, table=table, ratios=(3,), config=config, input_size=SIZE,
                       progress=False, whole_model=False)
    assert timed == {"conv1": [2], "conv2": [1.5]}
    assert a.choices == {"conv1": 3, "conv2": 3}
    assert [(e.spec.ratio, e.intrinsic) for e in a.plan.converted] == [(2, 8), (1.5, 8)]
