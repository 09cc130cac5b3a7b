"""ghostify.convert: torchvision models, input untouched, fx vs swap, folding, init, errors."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import fx, nn
from torch.testing import assert_close

import ghostify
import ghostify.conversion.tracing
from ghostify import GhostConv2d, GhostifyError, LayerSpec, convert, fold_channel_order, make_plan


def assert_close_scaled(actual, expected):
    """Equal up to float32 rounding: folding permutes a conv's input channels, which reorders its sums,
    so the absolute tolerance follows the output's scale (random-init logits can be large)."""
    scale = expected.abs().max().item()
    assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception: "init_weights will change" notice
        return torchvision.models.get_model(name, weights=None).eval()


def check_layers_replaced(ghost: nn.Module):
    plan = ghost.ghostify_info.plan
    for e in plan.converted:
        mod = ghost.get_submodule(e.name)
        assert isinstance(mod, GhostConv2d), e.name
        assert (mod.ratio, mod.dw_size, mod.cheap_kind) == (e.spec.ratio, e.spec.dw_size, e.spec.cheap)
    for e in plan.skipped:
        assert type(ghost.get_submodule(e.name)) is nn.Conv2d, e.name


def force_swap(monkeypatch):
    monkeypatch.setattr(ghostify.conversion.tracing, "trace",
                        lambda model, leaf_modules=(): ghostify.conversion.tracing.TraceResult(None, "forced"))


# -- torchvision subset --------------------------------------------------------------------------

FAST_MODELS = ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "googlenet", "regnet_x_400mf",
               "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", FAST_MODELS)
def test_torchvision_subset_converts_and_runs(name):
    model = build(name)
    ghost = convert(model)
    info = ghost.ghostify_info
    assert isinstance(ghost, fx.GraphModule) and info.mode == "fx"
    assert len(info.plan.converted) > 0
    assert set(info.folded) <= {e.name for e in info.plan.converted}
    check_layers_replaced(ghost)
    with torch.no_grad():
        out = ghost(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_ratio_one_reproduces_torchvision_model(name, bn_randomizer):
    # ratio 1: every Ghost layer is its conv (no cheap op), so the whole model's outputs are unchanged
    model = bn_randomizer(build(name))
    ghost = convert(model, ratio=1)
    assert len(ghost.ghostify_info.plan.converted) > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ghost(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_torchvision_sweep(name, bn_randomizer):
    model = bn_randomizer(build(name))
    size = 224 if name.startswith(("vit_", "swin", "maxvit")) else 96 if name == "inception_v3" else 64
    x = torch.randn(1, 3, size, size)
    ghost = convert(model, fold=False)
    check_layers_replaced(ghost)
    with torch.no_grad():
        unfolded = ghost(x)
        assert unfolded.shape == (1, 1000) and torch.isfinite(unfolded).all()
        if ghost.ghostify_info.mode == "fx":
            fold_channel_order(ghost)
            assert_close_scaled(ghost(x), unfolded)  # random-init inception_v3 has logits in the hundreds


# -- the input model -----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fixture", ["chain_net", "untraceable_net"])
def test_input_model_unchanged(fixture, training, request):
    model = request.getfixturevalue(fixture).train(training)
    before = snapshot(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    ghost = convert(model)
    assert model.training is training and ghost.training is training
    assert all(m.training is training for m in model.modules())
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert state_equal(before, model.state_dict())
    assert ghost is not model
    assert not any(p is q for p in model.parameters() for q in ghost.parameters())


def test_inplace_modifies_the_model(chain_net):
    ghost = convert(chain_net, inplace=True)
    assert isinstance(chain_net.conv1, GhostConv2d) and isinstance(chain_net.conv2, GhostConv2d)
    assert ghost.get_submodule("conv1") is chain_net.conv1
    assert type(chain_net.stem) is nn.Conv2d


def test_inplace_swap_mode_returns_the_model(untraceable_net):
    ghost = convert(untraceable_net, inplace=True)
    assert ghost is untraceable_net and ghost.ghostify_info.mode == "swap"
    assert isinstance(untraceable_net.conv1, GhostConv2d)


def test_result_keeps_training_flag_of_train_model(chain_net):
    chain_net.train()
    ghost = convert(chain_net)
    assert ghost.training and all(m.training for m in ghost.modules())


# -- fx path vs swap fallback --------------------------------------------------------------------


@pytest.mark.parametrize("fixture,size", [("chain_net", 16), ("residual_net", 16), ("resnet18", 32)])
def test_fx_and_swap_give_the_same_outputs(fixture, size, request, monkeypatch, bn_randomizer):
    model = build("resnet18") if fixture == "resnet18" else request.getfixturevalue(fixture)
    bn_randomizer(model)
    x = torch.randn(2, 3, size, size)
    # scatter=True: layers that cannot fold choose their intrinsic channels freely in both paths
    # (by default they keep the identity layout, and the swap path cannot fold any)
    fx_ghost = convert(model, scatter=True)
    force_swap(monkeypatch)
    swap_ghost = convert(model, scatter=True)
    assert fx_ghost.ghostify_info.mode == "fx" and swap_ghost.ghostify_info.mode == "swap"
    assert swap_ghost.ghostify_info.plan.trace_error == "forced"
    assert type(swap_ghost) is type(model) and swap_ghost.ghostify_info.folded == []
    assert [e.name for e in fx_ghost.ghostify_info.plan.converted] == \
        [e.name for e in swap_ghost.ghostify_info.plan.converted]
    assert len(fx_ghost.ghostify_info.folded) > 0
    with torch.no_grad():
        assert_close_scaled(fx_ghost(x), swap_ghost(x))


def test_untraceable_model_uses_swap_fallback(untraceable_net):
    ghost = convert(untraceable_net)
    info = ghost.ghostify_info
    assert info.mode == "swap" and type(ghost) is type(untraceable_net)
    assert not info.plan.traced and info.plan.trace_error.startswith("TraceError")
    assert [e.name for e in info.plan.converted] == ["conv1", "conv2"]
    assert info.folded == []
    check_layers_replaced(ghost)
    for sign in (1.0, -1.0):  # both branches of the data-dependent `if`
        x = sign * torch.rand(1, 3, 8, 8)
        with torch.no_grad():
            out = ghost(x)
        assert out.shape == (1, 12, 8, 8) and torch.isfinite(out).all()
    # the swapped model reorders at run time: channel maps are applied, intrinsic channels match
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        h = torch.relu(untraceable_net.stem(x))
        g1 = ghost.conv1
        idx = g1.channel_map[: g1.intrinsic_channels]
        assert_close(g1(h)[:, idx], untraceable_net.conv1(h)[:, idx])


class Gate(nn.Module):
    def forward(self, x):
        return x if x.mean() > 0 else -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = Gate()
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.out(self.gate(self.conv(self.stem(x))))


@pytest.mark.parametrize("leaf", ["gate", Gate])
def test_leaf_modules_make_a_model_traceable(leaf):
    model = GatedNet().eval()
    swapped = convert(model)
    assert swapped.ghostify_info.mode == "swap"
    ghost = convert(model, leaf_modules=[leaf])
    assert ghost.ghostify_info.mode == "fx" and ghost.ghostify_info.plan.traced
    assert [e.name for e in ghost.ghostify_info.plan.converted] == ["conv", "out"]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert_close_scaled(ghost(x), swapped(x))


# -- initialisation ------------------------------------------------------------------------------


def _capture(module: nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o.detach()))


@pytest.mark.parametrize("fold", [False, True])
def test_copy_init_keeps_intrinsic_channels_in_a_model(chain_net, bn_randomizer, fold):
    bn_randomizer(chain_net)
    ghost = convert(chain_net, fold=fold)
    g = ghost.get_submodule("conv1")
    m = g.intrinsic_channels
    seen = {}
    _capture(chain_net.conv1, seen, "conv")
    _capture(g, seen, "ghost")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        chain_net(x)
        ghost(x)
    idx = g.channel_map[:m]
    if fold:  # folded: the layer emits its internal order, intrinsic maps first
        assert "conv1" in ghost.ghostify_info.folded and g.emit_internal_order
        assert_close(seen["ghost"][:, :m], seen["conv"][:, idx])
    else:
        assert not g.emit_internal_order
        assert_close(seen["ghost"][:, idx], seen["conv"][:, idx])
    info = ghost.ghostify_info.layer_info
    assert set(info) == {"conv1", "conv2"}
    assert all(0.0 <= v["weight_residual"] <= 1.0 for v in info.values())


def test_random_and_none_init(chain_net):
    ghost = convert(chain_net, init="random", fold=False)
    assert ghost.ghostify_info.layer_info == {}
    g2 = ghost.get_submodule("conv2")
    assert torch.equal(g2.primary.bias, torch.zeros_like(g2.primary.bias))
    assert torch.equal(g2.cheap.conv.bias, torch.zeros_like(g2.cheap.conv.bias))
    g1 = ghost.get_submodule("conv1")
    assert torch.equal(g1.channel_map, torch.arange(16))  # nothing was paired: identity order
    w = chain_net.conv1.weight
    assert not any(torch.allclose(row, w[j]) for row in g1.primary.weight for j in range(16))
    # the plan's init is honoured per layer
    ghost = convert(chain_net, overrides={"conv2": {"init": "random"}})
    assert set(ghost.ghostify_info.layer_info) == {"conv1"}


# -- folding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2"])
def test_fold_preserves_outputs_torchvision(name, bn_randomizer):
    model = bn_randomizer(build(name))
    unfolded = convert(model, fold=False)
    assert unfolded.ghostify_info.folded == []
    assert not any(isinstance(m, GhostConv2d) and m.emit_internal_order for m in unfolded.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = unfolded(x)
        folded_model = copy.deepcopy(unfolded)
        names = fold_channel_order(folded_model)
        assert_close_scaled(folded_model(x), ref)
        ghost = convert(model)  # fold=True
        assert ghost.ghostify_info.folded == names
        assert_close_scaled(ghost(x), ref)
    assert len(names) > 0
    for e in ghost.ghostify_info.plan.converted:
        assert ghost.get_submodule(e.name).emit_internal_order is (e.name in names)
    if name == "resnet18":  # each block's conv1 folds into bn1/conv2; conv2 and downsample meet the add
        assert sorted(names) == sorted(f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2))
    if name == "vgg11_bn":  # a plain chain: every converted conv folds (the last one into the classifier)
        assert names == [e.name for e in ghost.ghostify_info.plan.converted]


@pytest.mark.parametrize("fixture,expect", [("chain_net", ["conv1", "conv2"]), ("residual_net", ["conv1"])])
def test_fold_on_tiny_nets(fixture, expect, request, bn_randomizer):
    model = bn_randomizer(request.getfixturevalue(fixture))
    x = torch.randn(2, 3, 8, 8)
    folded = convert(model)
    unfolded = convert(model, fold=False)
    assert folded.ghostify_info.folded == expect
    with torch.no_grad():
        assert_close_scaled(folded(x), unfolded(x))


def test_fold_is_idempotent(chain_net):
    ghost = convert(chain_net)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = ghost(x)
        assert fold_channel_order(ghost) == []
        assert_close(ghost(x), before)


def test_fold_leaves_train_mode_outputs_equal(chain_net, bn_randomizer):
    bn_randomizer(chain_net).train()
    folded = convert(chain_net)
    unfolded = convert(chain_net, fold=False)
    x = torch.randn(4, 3, 8, 8)
    assert_close_scaled(folded(x), unfolded(x))  # batch statistics, permuted consistently


# -- plans and errors ----------------------------------------------------------------------------


def test_convert_executes_a_given_plan(blocks_net):
    plan = make_plan(blocks_net, ghostify.GhostConfig(LayerSpec(ratio=4)).include("body.1.*"))
    text = plan.to_json()
    ghost = convert(blocks_net, ratio=2, plan=plan)  # the plan wins over the keywords
    assert ghost.ghostify_info.plan == plan
    assert plan.to_json() == text  # the caller's plan is not modified
    assert isinstance(ghost.get_submodule("body.1.conv"), GhostConv2d)
    assert ghost.get_submodule("body.1.conv").ratio == 4
    assert type(ghost.get_submodule("body.0.conv")) is nn.Conv2d


def test_plan_converting_a_grouped_conv_names_the_layer(odd_net):
    plan = make_plan(odd_net)
    plan["dw"].action, plan["dw"].spec = "convert", LayerSpec()
    with pytest.raises(GhostifyError, match=r"layer 'dw': groups=8"):
        convert(odd_net, plan=plan)


def test_plan_holding_a_non_conv_names_the_layer(chain_net):
    plan = make_plan(chain_net)
    plan["conv2"].name = "fc"  # a Linear in chain_net
    with pytest.raises(GhostifyError, match=r"layer 'fc'.*Linear"):
        convert(chain_net, plan=plan)


def test_plan_naming_a_missing_layer_is_a_ghostify_error(chain_net, blocks_net):
    plan = make_plan(blocks_net)  # names body.0.conv etc., which chain_net does not have
    with pytest.raises(GhostifyError, match=r"body\.0\.conv"):
        convert(chain_net, plan=plan)


@pytest.mark.parametrize("kwargs,match", [({"ratio": 0}, "ratio"), ({"ratio": 0.5}, "ratio"),
                                          ({"dw_size": 4}, "dw_size"), ({"init": "magic"}, "init"),
                                          ({"overrides": {"conv1": {"ratoi": 2}}}, "ratoi")])
def test_bad_settings_are_ghostify_errors(chain_net, kwargs, match):
    with pytest.raises(GhostifyError, match=match):
        convert(chain_net, **kwargs)


def test_public_names_survive_submodule_imports():
    """`ghostify.convert` / `ghostify.report` stay the functions after their submodules are imported
    (as the CLI does with `from .convert import convert`); run in a fresh interpreter, since the
    outcome depends on import order."""
    code = ("import ghostify.conversion.rewrite, ghostify.measure.reporting, ghostify.measure.counting\n"
            "import ghostify\n"
            "print(callable(ghostify.convert), callable(ghostify.report), callable(ghostify.count))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]


def test_no_layer_reorders_at_run_time_by_default(bn_randomizer):
    """Foldable layers fold; the others (meeting a residual add) keep the identity layout: only cats run."""
    model = bn_randomizer(build("resnet18"))
    ghost = convert(model)
    info = ghost.ghostify_info
    for e in info.plan.converted:
        layer = ghost.get_submodule(e.name)
        if e.name in info.folded:
            assert layer.emit_internal_order
        else:
            assert e.name.endswith(("conv2", "downsample.0")) and layer._identity_order
    scattered = convert(model, scatter=True)
    assert any(not scattered.get_submodule(e.name)._identity_order
               for e in info.plan.converted if e.name not in info.folded)
    rows = {r.name: r.order for r in ghostify.report(model, ghost, input_size=(1, 3, 32, 32)).layers}
    assert rows["layer1.0.conv1"] == "folded" and rows["layer1.0.conv2"] == "cat"


def test_fold_through_flatten_module_into_linear(bn_randomizer):
    """nn.Flatten (start_dim=1) then Linear absorbs the order: columns permuted in blocks of H*W."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(), nn.Linear(64, 10))
    net = bn_randomizer(net).eval()
    folded, unfolded = convert(net), convert(net, fold=False)
    assert folded.ghostify_info.folded == ["3"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(folded(x), unfolded(x), rtol=1e-5, atol=1e-5)
