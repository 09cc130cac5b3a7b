"""make_plan / GhostConfig / LayerSpec: default skips, selection, priorities, serialisation."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify import GhostConfig, GhostifyError, LayerSpec, Plan, convert, make_plan


def actions(plan: Plan) -> dict[str, str]:
    return {e.name: e.action for e in plan.entries}


def specs(plan: Plan) -> dict[str, tuple[int, int] | None]:
    return {e.name: (e.spec.ratio, e.spec.dw_size) if e.spec else None for e in plan.entries}


# -- default skips -------------------------------------------------------------------------------


def test_default_skips(odd_net):
    plan = make_plan(odd_net)
    assert [e.name for e in plan.entries] == ["stem", "dw", "reflect", "ok", "small"]  # execution order
    assert actions(plan) == {"stem": "skip", "dw": "skip", "reflect": "skip", "ok": "convert", "small": "skip"}
    assert plan["stem"].reason.startswith("stem")
    assert plan["dw"].reason.startswith("groups=8")
    assert "padding_mode='reflect'" in plan["reflect"].reason
    assert "out_channels=3 is too few for ratio 2" in plan["small"].reason
    assert plan["ok"].spec == LayerSpec(2, 3, "copy", "dw") and plan["ok"].intrinsic == 4
    assert plan.traced and plan.trace_error is None
    assert [e.name for e in plan.converted] == ["ok"]
    assert len(plan.skipped) == 4


def test_cheap_op_defaults_follow_each_layers_init(chain_net):
    """No cheap=/dw_size=: calib fits a 1x1 mix, copy keeps the paper's depthwise 3x3; an explicit value wins."""
    def cheap(**kw):
        return {e.name: (e.spec.cheap, e.spec.dw_size) for e in make_plan(chain_net, ghostify.build_config(**kw)).converted}

    assert cheap() == {"conv1": ("dw", 3), "conv2": ("dw", 3)}
    assert cheap(init="calib") == {"conv1": ("mix", 1), "conv2": ("mix", 1)}
    assert cheap(init="calib", cheap="dw") == {"conv1": ("dw", 3), "conv2": ("dw", 3)}
    assert cheap(init="calib", dw_size=3) == {"conv1": ("mix", 3), "conv2": ("mix", 3)}
    assert cheap(init="copy", cheap="mix") == {"conv1": ("mix", 1), "conv2": ("mix", 1)}
    assert cheap(init="calib", cheap="auto") == {"conv1": ("auto", 3), "conv2": ("auto", 3)}
    # the default follows the layer's own init, whatever level set it
    assert cheap(init="calib", overrides={"conv2": {"init": "copy"}}) == {"conv1": ("mix", 1), "conv2": ("dw", 3)}
    assert cheap(overrides={"conv*": {"init": "calib"}, "conv1": {"cheap": "dw"}}) == {"conv1": ("dw", 3),
                                                                                       "conv2": ("mix", 1)}
    assert LayerSpec(init="calib").resolved() == LayerSpec(2, 1, "calib", "mix")
    assert ghostify.default_cheap("random") == ("dw", 3)


def test_small_out_channels_depends_on_ratio(odd_net):
    # small has 3 outputs: 3 >= 2*1 converts at ratio 1; ok has 8: 8 < 2*5 is skipped at ratio 5
    assert actions(make_plan(odd_net, GhostConfig(LayerSpec(ratio=1))))["small"] == "convert"
    plan = make_plan(odd_net, GhostConfig(LayerSpec(ratio=5)))
    assert plan["ok"].action == "skip" and "out_channels=8 is too few for ratio 5" in plan["ok"].reason


def test_plan_does_not_touch_the_model(chain_net):
    before = {k: v.clone() for k, v in chain_net.state_dict().items()}
    types = [type(m) for m in chain_net.modules()]
    make_plan(chain_net)
    assert [type(m) for m in chain_net.modules()] == types
    after = chain_net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_every_conv_fed_only_by_the_input_is_a_stem():
    class TwoStems(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.c(self.a(x * 2) + self.b(x))

    plan = make_plan(TwoStems())
    assert actions(plan) == {"a": "skip", "b": "skip", "c": "convert"}
    assert plan["a"].reason.startswith("stem") and plan["b"].reason.startswith("stem")


def test_exact_name_override_converts_the_stem(chain_net):
    cfg = GhostConfig().set_name("stem", {})
    assert actions(make_plan(chain_net, cfg))["stem"] == "convert"
    # a glob matching the stem is not enough: only the exact name converts it
    cfg = GhostConfig().set_glob("st*", {"ratio": 2})
    assert actions(make_plan(chain_net, cfg))["stem"] == "skip"


def test_shared_module_is_skipped(shared_net):
    plan = make_plan(shared_net)
    assert actions(plan) == {"stem": "skip", "shared": "skip", "last": "convert"}
    assert "more than once" in plan["shared"].reason


def test_untraceable_model_plans_in_module_order(untraceable_net):
    plan = make_plan(untraceable_net)
    assert not plan.traced
    assert "TraceError" in plan.trace_error
    assert actions(plan) == {"stem": "skip", "conv1": "convert", "conv2": "convert"}
    assert "not traceable" in plan.table()


def test_resnet18_plan():
    plan = make_plan(torchvision.models.resnet18())
    # 1 stem + 8 blocks x 2 convs + 3 downsample 1x1 convs = 20; all but the stem convert
    assert len(plan.entries) == 20 and len(plan.converted) == 19
    assert plan.skipped[0].name == "conv1" and plan.skipped[0].reason.startswith("stem")
    assert plan["layer2.0.downsample.0"].action == "convert"
    assert plan["layer4.1.conv2"].intrinsic == 256


def test_converted_layers_are_not_planned_again(chain_net):
    ghost = convert(chain_net)
    plan = make_plan(ghost)
    assert [e.name for e in plan.entries] == ["stem"]  # conv1.primary, conv1.cheap.conv... are internal


# -- include / exclude ---------------------------------------------------------------------------


def test_include_globs(blocks_net):
    plan = make_plan(blocks_net, GhostConfig().include("body.*"))
    assert actions(plan) == {"stem": "skip", "body.0.conv": "convert", "body.1.conv": "convert",
                             "body.2.conv": "convert", "head": "skip"}
    assert plan["head"].reason == "not matched by --include body.*"


def test_exclude_globs(blocks_net):
    plan = make_plan(blocks_net, GhostConfig().exclude("body.[02].*", "he?d"))
    assert actions(plan) == {"stem": "skip", "body.0.conv": "skip", "body.1.conv": "convert",
                             "body.2.conv": "skip", "head": "skip"}
    assert plan["body.0.conv"].reason == "excluded by --exclude body.[02].*"
    assert plan["head"].reason == "excluded by --exclude he?d"


def test_include_and_exclude_together(blocks_net):
    plan = make_plan(blocks_net, GhostConfig().include("body.*", "head").exclude("*.1.*"))
    assert [e.name for e in plan.converted] == ["body.0.conv", "body.2.conv", "head"]


def test_globs_are_case_sensitive(blocks_net):
    plan = make_plan(blocks_net, GhostConfig().include("BODY.*"))
    assert plan.converted == []


# -- priorities ----------------------------------------------------------------------------------


def test_priority_global_type_glob_name(blocks_net, net_classes):
    Block = net_classes["Block"]
    cfg = (GhostConfig(LayerSpec(ratio=2, dw_size=3))
           .set_type(Block, {"ratio": 3, "dw_size": 5})     # body.*.conv, through their parent Block
           .set_glob("body.1.*", {"ratio": 4})              # merged over the type level: dw_size stays 5
           .set_glob("body.2.*", None)
           .set_name("body.2.conv", {"dw_size": 1}))        # exact name beats the glob's None
    plan = make_plan(blocks_net, cfg)
    assert specs(plan) == {"stem": None, "body.0.conv": (3, 5), "body.1.conv": (4, 5),
                           "body.2.conv": (2, 1), "head": (2, 3)}


def test_none_at_each_level_skips(blocks_net, net_classes):
    Block = net_classes["Block"]
    cfg = GhostConfig().set_type(Block, None)
    assert actions(make_plan(blocks_net, cfg)) == {"stem": "skip", "body.0.conv": "skip", "body.1.conv": "skip",
                                                   "body.2.conv": "skip", "head": "convert"}
    cfg = GhostConfig().set_type(Block, None).set_glob("body.1.*", {"ratio": 4})  # glob beats type
    plan = make_plan(blocks_net, cfg)
    assert actions(plan)["body.1.conv"] == "convert" and plan["body.1.conv"].spec.ratio == 4
    assert plan["body.0.conv"].reason == "set to None by an override"
    cfg = GhostConfig().set_glob("body.*", {"ratio": 4}).set_name("body.0.conv", None)  # name beats glob
    plan = make_plan(blocks_net, cfg)
    assert specs(plan) == {"stem": None, "body.0.conv": None, "body.1.conv": (4, 3), "body.2.conv": (4, 3),
                           "head": (2, 3)}
    cfg = GhostConfig().set_type(nn.Conv2d, None)  # the conv's own type
    assert make_plan(blocks_net, cfg).converted == []


def test_later_globs_win_over_earlier_ones():
    cfg = GhostConfig().set_glob("a.*", {"ratio": 3}).set_glob("a.b*", {"ratio": 4})
    assert cfg.resolve("a.b1").ratio == 4
    assert cfg.resolve("a.c").ratio == 3
    assert cfg.resolve("z").ratio == 2


def test_set_dispatches_on_glob_characters():
    cfg = GhostConfig().set("layer4.*", {"ratio": 4}).set("layer4.0.conv1", None).set("fc[12]", None)
    assert [p for p, _ in cfg.by_glob] == ["layer4.*", "fc[12]"]
    assert cfg.by_name == {"layer4.0.conv1": None}
    assert cfg.resolve("layer4.1.conv2").ratio == 4
    assert cfg.resolve("layer4.0.conv1") is None


def test_convert_overrides_keyword(blocks_net):
    ghost = convert(blocks_net, overrides={nn.Conv2d: {"ratio": 4}, "body.1.*": None, "head": {"dw_size": 5}})
    plan = ghost.ghostify_info.plan
    assert specs(plan) == {"stem": None, "body.0.conv": (4, 3), "body.1.conv": None, "body.2.conv": (4, 3),
                           "head": (4, 5)}
    assert isinstance(ghost.get_submodule("body.0.conv"), ghostify.GhostConv2d)
    assert ghost.get_submodule("body.0.conv").ratio == 4
    assert type(ghost.get_submodule("body.1.conv")) is nn.Conv2d


# -- LayerSpec validation ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0}, "ratio"), ({"ratio": 0.9}, "ratio"), ({"ratio": True}, "ratio"), ({"ratio": "2"}, "ratio"),
    ({"dw_size": 2}, "dw_size"), ({"dw_size": 0}, "dw_size"), ({"dw_size": 3.0}, "dw_size"),
    ({"init": "nope"}, "unknown init"), ({"cheap": "nope"}, "unknown cheap op"),
])
def test_layer_spec_validation(kwargs, match):
    with pytest.raises(GhostifyError, match=match):
        LayerSpec(**kwargs)


def test_unknown_override_key():
    cfg = GhostConfig().set_name("x", {"ratoi": 4})
    with pytest.raises(GhostifyError, match="ratoi"):
        cfg.resolve("x")


def test_bad_override_value_type():
    with pytest.raises(GhostifyError, match="dict, a LayerSpec or None"):
        GhostConfig().set_name("x", 4)


def test_layer_spec_as_override():
    cfg = GhostConfig().set_name("x", LayerSpec(ratio=3, dw_size=5))
    assert cfg.resolve("x") == LayerSpec(ratio=3, dw_size=5, cheap="dw")  # resolved: copy's cheap op


# -- serialisation and the table -----------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["odd_net", "untraceable_net", "blocks_net"])
def test_plan_json_round_trip(fixture, request):
    model = request.getfixturevalue(fixture)
    plan = make_plan(model, GhostConfig(LayerSpec(ratio=3, dw_size=5, init="random")).set_name("stem", {}))
    text = plan.to_json()
    again = Plan.from_dict(json.loads(text))
    assert again == plan
    assert again.to_json() == text
    assert all(isinstance(e.kernel_size, tuple) and isinstance(e.stride, tuple) for e in again.entries)
    assert again["stem"].spec == LayerSpec(ratio=3, dw_size=5, init="random", cheap="dw")  # concrete in the file
    assert '"cheap": "dw"' in text and '"cheap": null' not in text


def test_config_dict_round_trip():
    cfg = (GhostConfig(LayerSpec(ratio=3)).set_type(nn.Sequential, {"dw_size": 5}).set_glob("body.1.*", None)
           .set_name("head", {"ratio": 4}).include("body.*", "head").exclude("*.2.*"))
    d = json.loads(json.dumps(cfg.to_dict()))
    again = GhostConfig.from_dict(d)
    assert again.to_dict() == cfg.to_dict()
    assert again.by_type == [(nn.Sequential, {"dw_size": 5})]
    for name in ("stem", "body.0.conv", "body.1.conv", "body.2.conv", "head"):
        types = [nn.Conv2d, nn.Sequential]
        assert again.resolve(name, types) == cfg.resolve(name, types)
        assert again.selected(name) == cfg.selected(name)


def test_table_lists_every_layer(odd_net):
    plan = make_plan(odd_net)
    table = plan.table()
    lines = table.splitlines()
    assert lines[0] == "1 of 5 convs convert"
    assert lines[1].split() == ["layer", "shape", "action", "ratio", "dw", "init", "cheap", "reason"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == ["stem", "dw", "reflect", "ok", "small"]
    assert rows["ok"].split() == ["ok", "8->8", "3x3/1", "convert", "2", "3", "copy", "dw"]
    assert "skip" in rows["small"] and "too few for ratio" in rows["small"]


def test_layers_whose_ghost_form_costs_more_are_skipped():
    # 8 -> 8 1x1: conv 64 MACs per position; ratio 2 with a 3x3 depthwise: 4*8 + 4*9 = 68
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1))
    plan = make_plan(net)
    assert plan["2"].action == "skip" and "costs 68 MACs per position, the conv 64" in plan["2"].reason
    assert plan["4"].action == "skip"  # 8 -> 32: conv 256, ghost 16*8 + 16*9 = 272
    # a 1x1 depthwise op makes both pay (4*8 + 4 = 36 < 64); an exact-name override forces a layer
    assert make_plan(net, GhostConfig(LayerSpec(dw_size=1)))["2"].action == "convert"
    assert make_plan(net, GhostConfig().set("2", {"ratio": 2}))["2"].action == "convert"
