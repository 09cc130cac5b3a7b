"""ghostify.deploy: the fuse pass is exact, export writes files that compute what PyTorch computes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torchvision
from torch import fx, nn
from torch.testing import assert_close

import ghostify
from ghostify import GhostifyError, convert
from ghostify.deploy import fuse
from ghostify.deploy.fuse import (DEFAULT_PASSES, FoldBatchNorm, InlineGhost, PushThroughCat, ScaleIntoPrimary,
                                  SplitConsumer)
from conftest import ResidualNet, randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomize_bn(torchvision.models.get_model(name, weights=None)).eval()


def assert_same(actual, expected):
    """Equal up to float32 rounding of reordered sums, relative to the output's scale."""
    scale = max(expected.abs().max().item(), 1e-6)
    assert_close(actual, expected, rtol=1e-4, atol=2e-5 * scale)


def check_fuse(model, x, passes=DEFAULT_PASSES):
    with torch.no_grad():
        expected = model(x)
        fused = fuse(model, passes=passes)
        assert_same(fused(x), expected)
    return fused


def ops(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def modules(gm: fx.GraphModule, cls) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls))


# -- fuse: exactness ------------------------------------------------------------------------------

CASES = {
    "dw3-r2": dict(ratio=2),
    "dw3-r3": dict(ratio=3),  # two ghosts per map, the last map's second dropped (8 channels: 3 + 5)
    "dw3-r4-scatter": dict(ratio=4, scatter=True),
    "dw3-r1.5-scatter": dict(ratio=1.5, scatter=True),
    "mix1-r2": dict(ratio=2, cheap="mix", dw_size=1),
    "mix1-r1.5-scatter": dict(ratio=1.5, cheap="mix", dw_size=1, scatter=True),
}


@pytest.mark.parametrize("name, case", [("resnet18", c) for c in CASES]
                         + [("mobilenet_v2", "dw3-r2"), ("mobilenet_v2", "mix1-r1.5-scatter")])
def test_fused_equals_unfused_torchvision(name, case):
    model = build(name)
    ghost = convert(model, **CASES[case]).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = check_fuse(ghost, x)
    assert modules(fused, nn.BatchNorm2d) == 0
    check_fuse(model, x)  # the original gets the same BN folding


@pytest.mark.parametrize("case", CASES)
def test_each_pass_preserves_the_computation(case):
    ghost = convert(randomize_bn(ResidualNet()).eval(), **CASES[case]).eval()
    x = torch.randn(2, 3, 12, 12)
    for k in range(1, len(DEFAULT_PASSES) + 1):
        assert all(p.preserves_computation for p in DEFAULT_PASSES[:k])
        check_fuse(ghost, x, DEFAULT_PASSES[:k])


def test_residual_net_loses_every_cat_and_batchnorm(residual_net):
    # stem -> bn0 -> relu -> conv1(G) -> bn1 -> relu -> conv2(G) -> bn2 -> (+x) -> relu -> head(G)
    ghost = convert(randomize_bn(residual_net), ratio=2).eval()
    fused = check_fuse(ghost, torch.randn(1, 3, 10, 10))
    # the stem is split so that the residual stream is carried as intrinsic and ghost halves, which
    # the head (a conv: 4 outputs are too few to convert) reads split too
    assert ops(fused, torch.cat) == 0
    assert modules(fused, nn.BatchNorm2d) == 0
    report = fused.meta["ghostify_fuse"]
    assert report.counts()["inline_ghost"] == 2 and report.counts()["scale_into_primary"] == 2
    assert not report.skipped


def test_zero_batchnorm_scale_stays_exact(residual_net):
    ghost = convert(randomize_bn(residual_net), ratio=2).eval()
    with torch.no_grad():
        ghost.get_submodule("bn1").weight[[0, 5]] = 0  # an intrinsic and a ghost channel
    check_fuse(ghost, torch.randn(2, 3, 9, 9))


def test_discarded_ghost_slots_are_not_computed():
    # ratio 1.5 on 12 channels: 8 intrinsic maps, 4 ghosts; the depthwise cheap op computes 8
    # slots and keeps 4, so the primary conv is split into the 4 parents and the 4 others
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12),
                        nn.ReLU(), nn.Conv2d(12, 5, 1))
    ghost = convert(randomize_bn(net).eval(), ratio=1.5, exclude=["4"]).eval()
    fused = check_fuse(ghost, torch.randn(2, 3, 8, 8), (InlineGhost,))
    convs = [fused.get_submodule(n.target) for n in fused.graph.nodes if n.op == "call_module"
             and isinstance(fused.get_submodule(n.target), nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.groups) for c in convs] == [(3, 8, 1), (8, 4, 1), (8, 4, 1),
                                                                           (4, 4, 4), (12, 5, 1)]


def test_folding_is_computed_in_float64_and_rounded_once(residual_net):
    ghost = convert(randomize_bn(residual_net), ratio=2, cheap="mix", dw_size=1).eval()
    fused = fuse(ghost)
    exact = fuse(ghost.double())  # the same passes on a float64 copy
    assert all(t.dtype == torch.float32 for t in fused.state_dict().values() if t.is_floating_point())
    for k, v in fused.state_dict().items():  # folded in float32 many products round differently
        assert_close(v, exact.state_dict()[k].to(v.dtype), rtol=0, atol=0, msg=k)


def test_fuse_leaves_the_input_model_alone(residual_net):
    ghost = convert(residual_net).train()
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    fused = fuse(ghost)
    assert ghost.training and not fused.training
    assert all(torch.equal(before[k], v) for k, v in ghost.state_dict().items())


def test_untraceable_model_is_refused_in_one_line_and_exported_unfused(untraceable_net, tmp_path):
    with pytest.raises(GhostifyError, match="does not trace.*--no-fuse"):
        fuse(untraceable_net)
    check = ghostify.export(convert(untraceable_net), tmp_path / "m.onnx", input_size=(1, 3, 8, 8))
    assert check.fusions == {} and "does not trace" in check.not_fused[0] and check.max_rel_err <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_fused_equals_unfused_sweep(name):
    model = build(name)
    size = 224 if name.startswith(("vit_", "swin", "maxvit")) else 96 if name == "inception_v3" else 64
    x = torch.randn(1, 3, size, size)
    ghost = convert(model).eval()
    if ghost.ghostify_info.mode != "fx":
        pytest.skip("the model does not trace")
    check_fuse(ghost, x)
    check_fuse(model, x)


# -- fuse: what ONNX Runtime runs -----------------------------------------------------------------

def ort_optimized_ops(model, x, tmp_path) -> list[str]:
    from ghostify.deploy.runtime import onnx_bytes

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(onnx_bytes(model, x), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("ratio", [2, 4])
def test_fused_resnet_runs_only_convs_in_onnxruntime(ratio, tmp_path):
    ghost = convert(build("resnet18"), ratio=ratio).eval()
    x = torch.randn(1, 3, 64, 64)
    unfused = ort_optimized_ops(ghost, x, tmp_path)
    fused = ort_optimized_ops(fuse(ghost), x, tmp_path)
    assert unfused.count("Concat") == 19  # one per Ghost layer
    # every BatchNorm, ReLU and residual add fused into a conv; one cat before the pooling (at ratio 4,
    # where each map has 3 ghosts made by 3 depthwise convs, with a gather into channel order); the
    # runtime's blocked layout is entered and left once
    assert {op for op in fused} <= {"Conv", "MaxPool", "GlobalAveragePool", "Concat", "Gather", "ReorderInput",
                                    "ReorderOutput", "Flatten", "Gemm"}
    assert fused.count("Concat") == 1 and fused.count("Gather") == (ratio == 4)
    assert fused.count("ReorderInput") + fused.count("ReorderOutput") <= 2


@pytest.mark.parametrize("exclude", [[], ["conv2"]])
def test_residual_add_after_a_split_conv_still_fuses(residual_net, exclude, tmp_path):
    # with conv2 kept as a conv, it reads conv1's Ghost halves split in two, and the residual add
    # joins that sum: conv2_a(p) + (conv2_b(g) + x), which ONNX Runtime fuses into the two convs
    ghost = convert(randomize_bn(residual_net), ratio=2, exclude=exclude).eval()
    x = torch.randn(1, 3, 16, 16)
    fused = check_fuse(ghost, x)
    assert set(ort_optimized_ops(fused, x, tmp_path)) <= {"Conv", "ReorderInput", "ReorderOutput"}


# -- export ---------------------------------------------------------------------------------------

def small(name: str) -> nn.Module:
    """A small instance of a torchvision architecture (same blocks, fewer and narrower), for fast tests."""
    from torchvision.models import DenseNet
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
    from torchvision.models.regnet import BlockParams, RegNet

    if name == "densenet":
        model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)
    elif name == "regnet":
        model = RegNet(BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
                       num_classes=10)
    elif name == "efficientnet":
        setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.5, depth_mult=0.3)
        model = EfficientNet(setting, 0.2, last_channel=last, num_classes=10)
    else:
        model = build(name)
    if name.startswith("vgg"):  # a small head: ONNX pools 2x2 maps to VGG's 7x7 only from 224x224 inputs
        model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Linear(512, 10))
    return randomize_bn(model).eval()


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet", "regnet", "efficientnet"])
def test_exported_onnx_matches_pytorch(name, tmp_path):
    check_export(small(name), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn", "densenet121", "regnet_y_400mf", "efficientnet_b0",
                                  "mobilenet_v3_large", "convnext_tiny"])
def test_exported_onnx_matches_pytorch_full_size(name, tmp_path):
    model = build(name)
    if name.startswith("vgg"):
        model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Linear(512, 10))
    check_export(model, tmp_path)


def check_export(model, tmp_path):
    ghost = convert(model, ratio=2)
    check = ghostify.export(ghost, tmp_path / "m.onnx", input_size=(2, 3, 64, 64))
    assert check.max_rel_err <= 1e-4 and check.top1_agreement == 1.0 and check.samples == 2
    assert check.fusions["inline_ghost"] == len(ghost.ghostify_info.plan.converted)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), ghost.eval()(x))
    assert {n.domain for n in onnx.load(str(tmp_path / "m.onnx")).graph.node} <= {""}  # no custom ops


def test_export_mix_scatter_fractional_with_dynamic_batch(tmp_path):
    ghost = convert(build("resnet18"), ratio=1.5, cheap="mix", dw_size=1, scatter=True)
    check = ghostify.export(ghost, tmp_path / "m.onnx", input_size=(1, 3, 64, 64), dynamic_batch=True)
    assert check.samples == 3 and check.max_rel_err <= 1e-4  # batches of 1 and 2
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        assert_same(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), ghost.eval()(x))


def test_export_pt2_round_trip(residual_net, tmp_path):
    ghost = convert(randomize_bn(residual_net))
    check = ghostify.export(ghost, tmp_path / "m.pt2", input_size=(3, 3, 16, 16), check_data=[torch.randn(3, 3, 16, 16)])
    assert check.format == "pt2" and check.samples == 3 and check.top1_agreement is None
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_same(program(x), ghost.eval()(x))


def test_export_refuses_to_overwrite_and_writes_nothing_when_the_check_fails(residual_net, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    with pytest.raises(GhostifyError, match="exists.*--force"):
        ghostify.export(residual_net, out, input_size=(1, 3, 8, 8))
    assert out.read_text() == "keep me"
    with pytest.raises(GhostifyError, match="check data has batches of 2 but the file takes batches of 1"):
        ghostify.export(residual_net, out, input_size=(1, 3, 8, 8), check_data=torch.randn(2, 3, 8, 8), force=True)
    with pytest.raises(GhostifyError, match=r"^export check failed: max relative error .* > tolerance -1.* own float32 "
                                            r"result is [\d.e+-]+ off its float64 result.*--tolerance"):
        ghostify.export(residual_net, out, input_size=(1, 3, 8, 8), tolerance=-1, force=True)
    assert out.read_text() == "keep me" and os.listdir(tmp_path) == ["m.onnx"]
    check = ghostify.export(residual_net, out, input_size=(1, 3, 8, 8), force=True, fuse=False)
    assert onnx.load(str(out)).graph.node and check.fusions == {}


def test_a_saved_model_loads_and_exports(tmp_path):
    ghost = convert(build("resnet18"), ratio=1.5, cheap="mix", dw_size=1, scatter=True)
    ghostify.save(ghost, tmp_path / "g.safetensors", arch="torchvision.models:resnet18")
    loaded = ghostify.load(tmp_path / "g.safetensors")
    check = ghostify.export(loaded, tmp_path / "g.onnx", input_size=(2, 3, 64, 64))
    assert check.max_rel_err <= 1e-4 and check.top1_agreement == 1.0
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), ghost.eval()(x))


def test_export_checks_on_a_data_spec(residual_net, tmp_path):
    from PIL import Image

    for k in range(3):
        (tmp_path / "images" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        Image.fromarray(pixels.numpy()).save(tmp_path / "images" / f"c{k % 2}" / f"{k}.png")
    spec = f"imagefolder:{tmp_path / 'images'}"
    ghost = convert(randomize_bn(residual_net))
    check = ghostify.export(ghost, tmp_path / "m.onnx", input_size=(1, 3, 224, 224), check_data=spec)
    assert check.samples == 3 and check.data == spec and check.max_rel_err <= 1e-4 and spec in check.summary()
    with pytest.raises(GhostifyError, match=r"inputs of \(3, 224, 224\) but input_size is \(1, 3, 64, 64\).*"
                                            r"--input-size N,3,224,224"):
        ghostify.export(ghost, tmp_path / "n.onnx", input_size=(1, 3, 64, 64), check_data=spec)
    assert not (tmp_path / "n.onnx").exists()


def test_missing_extra_is_one_line_naming_the_install(monkeypatch, residual_net, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(GhostifyError, match=r"pip install 'ghostify\[deploy\]'") as err:
        ghostify.export(residual_net, tmp_path / "m.onnx", input_size=(1, 3, 8, 8))
    assert "\n" not in str(err.value)


def test_ghostify_works_without_the_deploy_extra():
    code = ("import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
            "import torch, torchvision, ghostify\n"
            "g = ghostify.convert(torchvision.models.resnet18(num_classes=4))\n"
            "f = ghostify.fuse(g); x = torch.randn(1, 3, 32, 32)\n"
            "torch.testing.assert_close(f(x), g.eval()(x), rtol=1e-4, atol=1e-4)\n"
            "print(ghostify.runtime_latency({'g': g}, x, runtime='torch', repeats=1)['g']['repeats'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


# -- runtime latency ------------------------------------------------------------------------------

def test_runtime_callables_compute_the_model(residual_net):
    from ghostify.deploy.runtime import runtime_callable

    ghost = convert(randomize_bn(residual_net)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = ghost(x)
        for runtime in ("torch", "ort"):
            out = runtime_callable(ghost, x, runtime, threads=1)(x)
            assert_same(torch.as_tensor(out[0] if isinstance(out, list) else out), expected)


def test_runtime_latency_alternates_models(residual_net):
    ghost = convert(residual_net)
    r = ghostify.runtime_latency({"original": residual_net, "ghost": ghost}, torch.randn(1, 3, 16, 16),
                                 runtime="ort", repeats=4, warmup=1, threads=1, clock=time.thread_time)
    assert sorted(r) == ["ghost", "original"] and all(v["repeats"] == 4 and v["min_ms"] > 0 for v in r.values())
    with pytest.raises(GhostifyError, match="unknown runtime 'tvm'; choose one of torch, compile, ort"):
        ghostify.runtime_latency({"g": ghost}, torch.randn(1, 3, 16, 16), runtime="tvm")


def test_ort_profile_tells_the_kinds_of_conv_apart():
    from ghostify.deploy.runtime import ort_profile

    net = build("resnet18")
    x = torch.randn(1, 3, 64, 64)
    original = ort_profile(net, x, threads=1, runs=1)
    ghost = ort_profile(convert(net, ratio=2), x, threads=1, runs=1)
    assert original["by_kind"]["Conv"][1] == original["by_op"]["Conv"][1] == 20
    assert not any(k.startswith("Conv ") for k in original["by_kind"])
    # 19 Ghost layers (the stem stays a conv): each has one depthwise 3x3 cheap op and one
    # per-channel BN shift between its primary conv and the conv that reads it
    assert ghost["by_kind"]["Conv depthwise 3x3"][1] == 19 and ghost["by_kind"]["Conv 1x1 per-channel"][1] == 19
    convs = sum(n for k, (_, n) in ghost["by_kind"].items() if k.startswith("Conv"))
    assert convs == ghost["by_op"]["Conv"][1]


@pytest.mark.slow
def test_compile_runtime_computes_the_model(residual_net):
    from ghostify.deploy.runtime import runtime_callable

    ghost = convert(randomize_bn(residual_net)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert_same(runtime_callable(ghost, x, "compile", threads=1)(x), ghost(x))


def test_layer_callables_time_the_layer_with_its_bn_and_activation(chain_net):
    from ghostify import GhostConv2d
    from ghostify.deploy.runtime import layer_callables, layer_context

    context = layer_context(randomize_bn(chain_net), "conv1")
    assert [type(m) for m in context] == [nn.BatchNorm2d, nn.ReLU]
    ghost = GhostConv2d.from_conv(chain_net.conv1, ratio=2)
    for p in ghost.parameters():
        nn.init.normal_(p)
    x = torch.randn(1, 8, 12, 12)
    out = layer_callables({"ghost": ghost}, context, x, "ort", threads=1)["ghost"](x)
    assert len(out) == 2  # the intrinsic and ghost halves, not cat together
    with torch.no_grad():
        assert_same(torch.cat([torch.from_numpy(o) for o in out], 1), nn.Sequential(ghost, *context).eval()(x))


def test_skip_slower_in_onnxruntime(chain_net):
    from ghostify.tradeoffs.timing import layer_latency, skip_slower

    x = torch.randn(1, 3, 16, 16)
    res = layer_latency(chain_net, {"conv1": [(2, 3, "dw"), (4, 1, "mix")]}, x, repeats=2, progress=False,
                        runtime="ort")
    assert set(res["conv1"]) == {"conv", 2, 4} and all(v > 0 for v in res["conv1"].values())
    plan = skip_slower(chain_net, ghostify.make_plan(chain_net), x, repeats=2, progress=False, runtime="ort")
    assert all("in ort" in e.reason for e in plan.entries if e.action == "skip" and "not faster" in e.reason)


class DoubleCheap(nn.Module):
    """A cheap op of a family the deploy pass does not know: ghosts = twice the first intrinsic maps."""

    def __init__(self, intrinsic, num_ghosts, ratio, dw_size, bias):
        super().__init__()
        self.num_ghosts = num_ghosts

    def forward(self, x):
        return 2 * x[:, : self.num_ghosts]


def test_an_unknown_cheap_op_stays_opaque_and_the_skip_is_reported(residual_net, monkeypatch):
    from ghostify.layers import CHEAP_OPS

    monkeypatch.setitem(CHEAP_OPS, "double", DoubleCheap)
    ghost = convert(randomize_bn(residual_net), cheap="double", init="random").eval()
    fused = check_fuse(ghost, torch.randn(2, 3, 10, 10))
    report = fused.meta["ghostify_fuse"]
    assert [(p, w) for p, w, _ in report.skipped] == [("scale_into_primary", "conv1.primary"),
                                                      ("scale_into_primary", "conv2.primary")]
    assert "not a conv" in report.skipped[0][2]
    assert modules(fused, nn.BatchNorm2d) == 4  # both halves of both layers keep their BN (split by the cat)


@pytest.mark.parametrize("spin", [False, True])
def test_timing_sessions_do_not_spin_unless_asked(spin, tmp_path):
    from ghostify.deploy.export import onnx_session

    path = tmp_path / "conv.onnx"
    torch.onnx.export(nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False)
    sess = onnx_session(path, threads=2, spin=spin)
    entry = sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert entry == ("1" if spin else "0")
