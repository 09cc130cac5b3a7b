"""benchmarks/peer_methods.py and peers.py on tiny networks: the peers' MAC matching, the BN fold before
export, the low-rank refit and the Pareto front (the run itself is a benchmark, not a test)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning", reason="the peers extra is not installed: pip install -e '.[peers]'")
pytest.importorskip("tensorly", reason="the peers extra is not installed: pip install -e '.[peers]'")

import ghostify  # noqa: E402
from ghostify.errors import GhostifyError  # noqa: E402
from ghostify.train.loss import GhostLayerOutputs  # noqa: E402
from benchmarks import peer_methods as P  # noqa: E402
from benchmarks.peers import pareto  # noqa: E402
from conftest import randomize_bn  # noqa: E402

X = torch.zeros(1, 3, 8, 8)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_uniform_pruning_keeps_the_fraction_of_every_layer_and_the_classifier(chain_net):
    pruned = P.prune(chain_net, X, importance="l1", global_pruning=False, ratio=0.5, ignored=lambda m: [m.fc])
    # stem 8 -> 4, conv1 16 -> 8, conv2 12 -> 6 output channels; the classifier keeps its 5 outputs
    assert [c.out_channels for c in _convs(pruned)] == [4, 8, 6]
    assert (pruned.fc.in_features, pruned.fc.out_features) == (6, 5)
    # the convs' MACs by hand on 8x8: 3*4*9*64, 4*8*9*64 (against 8*16*9*64)
    by = ghostify.count(pruned, X).macs_by_module
    assert (by["stem"], by["conv1"]) == (6912, 18432)
    assert ghostify.count(chain_net, X).macs_by_module["conv1"] == 73728
    assert [c.out_channels for c in _convs(chain_net)] == [8, 16, 12]  # the caller's model is untouched


def test_bisection_matches_a_macs_target_for_pruning_and_low_rank(chain_net):
    macs0 = ghostify.count(chain_net, X).macs
    frac = lambda m: ghostify.count(m, X).macs / macs0  # noqa: E731
    prune = lambda p: P.prune(chain_net, X, importance="bn", global_pruning=False, ratio=p,  # noqa: E731
                              ignored=lambda m: [m.fc])
    p, got = P.bisect(lambda p: frac(prune(p)), 0.55, 0.0, 0.95, increasing=False)
    assert got == frac(prune(p)) and abs(got - 0.55) < 0.06  # channel counts are integers: a step function
    t, got = P.bisect(lambda t: frac(P.lowrank(chain_net, X, t, decompose=False)), 0.55, 0.01, 1.0, increasing=True)
    assert abs(got - 0.55) < 0.06
    assert frac(P.lowrank(chain_net, X, t)) == got  # the shells counted are the decomposed model's shapes


def test_svd_of_a_low_rank_1x1_conv_is_exact_and_refit_never_hurts():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1)
    conv.weight.data = (torch.randn(32, 2) @ torch.randn(2, 16))[:, :, None, None]  # rank 2
    net = nn.Sequential(conv).eval()
    low = P.lowrank(net, torch.randn(1, 16, 4, 4), 0.5, keep_stem=False)  # the only conv is the stem
    assert low.lowrank_layers == {"0": (5,)}  # floor(0.5 * 16 * 32 / 48)
    kw = dict(keep_stem=False)
    assert P.lowrank(net, torch.randn(1, 16, 4, 4), 0.5, round_to=4, **kw).lowrank_layers == {"0": (4,)}  # rounded down
    assert P.lowrank(net, torch.randn(1, 16, 4, 4), 0.5, round_to=8, **kw).lowrank_layers == {}  # below 8: whole
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(low(x), net(x), atol=1e-4, rtol=1e-4)

    deep = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    low = P.lowrank(deep, torch.randn(1, 3, 8, 8), 0.3)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    refit = P.refit_last_factors(low, deep, calib)
    err = lambda m: sum((m(x) - deep(x)).pow(2).sum().item() for x in calib)  # noqa: E731
    assert err(refit) < err(low)  # least squares on the same images cannot do worse than the data-free start


def test_low_rank_leaves_the_stem_whole_as_ghostify_does():
    # two branches on the input: both convs are stems (ghostify's plan skips both); the conv after them is not
    class TwoStems(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 1)
            self.c = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    net, x = TwoStems().eval(), torch.randn(1, 3, 8, 8)
    skipped = {e.name for e in ghostify.make_plan(net).skipped if e.reason.startswith("stem")}
    assert skipped == {"a", "b"}
    low = P.lowrank(net, x, 0.5)
    assert set(low.lowrank_layers) == {"c"} and low.a is not net.a and isinstance(low.a, nn.Conv2d)
    torch.testing.assert_close(low.a.weight, net.a.weight)
    assert set(P.lowrank(net, x, 0.5, keep_stem=False).lowrank_layers) == {"a", "b", "c"}


@pytest.mark.parametrize("kw", [dict(ratio=2), dict(ratio=1.5), dict(ratio=3, cheap="mix", dw_size=1),
                                dict(ratio=2, cheap="mix", dw_size=3), dict(ratio=3, dw_size=1)])
def test_bn_fold_into_ghost_layers_is_exact(chain_net, kw):
    ghost = ghostify.convert(randomize_bn(chain_net).eval(), init="copy", **kw)
    folded, n = P.fold_bn(ghost)
    ghosts = [name for name, m in ghost.named_modules() if isinstance(m, ghostify.GhostConv2d)]
    assert n == len(ghosts) >= 1  # each converted conv (conv1, and conv2 when it saves MACs) takes its BN
    assert not any(isinstance(folded.get_submodule(name.replace("conv", "bn")), nn.BatchNorm2d) for name in ghosts)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(folded(x), ghost(x), atol=1e-5, rtol=1e-5)


def test_bn_recalibration_changes_statistics_only(chain_net):
    batches = [(torch.randn(16, 3, 8, 8) * 2 + 1, None) for _ in range(3)]
    new = P.bn_recalibrate(chain_net, batches)
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(new.bn0.running_mean, new.stem(x).mean((0, 2, 3)))
    torch.testing.assert_close(new.stem.weight, chain_net.stem.weight)
    assert not new.training


def test_exported_model_matches_pytorch(chain_net):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -e '.[peers]'")
    ghost = ghostify.convert(randomize_bn(chain_net).eval(), ratio=2, init="copy")
    folded, _ = P.fold_bn(ghost)
    data = P.onnx_bytes(folded, X)
    assert P.ort_check(data, ghost, torch.randn(3, 3, 8, 8)) < 1e-5  # batch axis dynamic, BN fold exact


def test_pareto_front_by_hand():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.1), (2.0, 0.7)]
    assert pareto(pts, higher=True) == [(0.5, 0.1), (1.0, 0.5), (2.0, 0.9)]
    # an error: lower is better
    assert pareto([(1.0, 0.3), (2.0, 0.1), (3.0, 0.2)], higher=False) == [(1.0, 0.3), (2.0, 0.1)]


def tiny_trunk(chain_trunk, batches: int):
    """``(net, Setup)``: ``peers.py``'s setup for a tiny trunk, the chain trunk with random BatchNorm statistics
    calibrated on ``batches`` random batches of 8 8x8 images (the first also evaluates)."""
    from benchmarks.peers import Setup

    torch.manual_seed(0)
    net = randomize_bn(chain_trunk).eval()
    data = [(torch.randn(8, 3, 8, 8), None) for _ in range(batches)]
    s = Setup("tiny", "trunk", lambda: net, (3, 8, 8), lambda m: [], 8 * batches, 8, 1, "feature error")
    s.data = {"calib": data, "eval": data[:1], "desc": ""}
    return net, s


@pytest.mark.parametrize("recipe", ["mnist", "photos", "trunk"])
def test_kd_recipe_moves_a_copy_toward_the_teacher(chain_net, chain_trunk, recipe):
    """Every recipe brings the student closer to the teacher on images it did not train on (the KL of the logits;
    for a trunk, which has none, the relative squared error of the output feature map) and leaves the student as
    it was; the photos and trunk recipes (ghostify.distill's gentle AdamW 3e-5: a small step) keep the BatchNorm
    statistics frozen, the MNIST one updates them."""
    net = chain_trunk if recipe == "trunk" else chain_net
    teacher = randomize_bn(net).eval()
    student = randomize_bn(type(net)()).eval()  # a different network: far from the teacher
    before = {k: v.clone() for k, v in student.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(4)]
    held = torch.randn(64, 3, 8, 8, generator=gen)

    def distance(model):
        with torch.no_grad():
            s, t = model.eval()(held), teacher(held)
            if recipe == "trunk":
                return ((s - t).pow(2).sum() / t.pow(2).sum()).item()
            return ghostify.kd_loss(s, t, None, temperature=2.0)[0].item()

    kd = P.kd_finetune(student, teacher, batches, steps=40, recipe=recipe)
    assert distance(kd) < (0.9 if recipe == "mnist" else 0.99) * distance(student)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k])
    same_stats = torch.equal(kd.bn1.running_mean, student.bn1.running_mean)
    assert same_stats == (recipe != "mnist")
    assert not kd.training
    with pytest.raises(ValueError, match="'trunk'"):
        P.kd_finetune(student, teacher, batches, steps=1, recipe="logits")


def test_trunk_students_are_distilled_from_their_best_start(chain_trunk):
    """Every method's student on a trunk gets a ``kd`` row (the held-out feature error after ``--trunk-kd-steps``);
    a peer whose repair does not exist (no BatchNorm to recalibrate) starts from its unrepaired model."""
    import argparse

    from benchmarks.peers import Context, distill, fidelity, kd_repair

    assert kd_repair("tp-l1-global") == kd_repair("tp-l1-global", {"none", "bn-recal"}) == "bn-recal"
    assert kd_repair("tp-l1-global", {"none"}) == "none" == kd_repair("ghostify-mix", {"none"})
    assert kd_repair("lowrank", {"none", "bn-recal", "ls-refit"}) == "ls-refit"
    assert kd_repair("tp-taylor-global", {"none", "bn-recal"}, "trunk") == "none"
    assert kd_repair("lowrank", {"none", "bn-recal", "ls-refit"}, "trunk") == "ls-refit"  # refit, not BN recal
    net, s = tiny_trunk(chain_trunk, batches=2)
    batches = s.data["calib"]
    student = ghostify.convert(net, ratio=2, init="calib", calib_data=[x for x, _ in batches])
    ctx = Context(s, argparse.Namespace(trunk_kd_steps=3))
    res = distill(ctx, "ghostify-mix", student)
    assert set(res) == {"kd", "kd_seconds", "kd_own"}
    kd = P.kd_finetune(student, net, ctx.kd_x, steps=3, recipe="trunk")
    assert res["kd"] == pytest.approx(fidelity(s, kd, ctx.ref)["fidelity"])
    assert res["kd"] != pytest.approx(fidelity(s, student, ctx.ref)["fidelity"])
    # ghostify's own repair: the same steps with the per-Ghost-layer feature loss at weight 1
    own = P.kd_finetune(student, net, ctx.kd_x, steps=3, recipe="trunk", feature_weight=1.0)
    assert res["kd_own"] == pytest.approx(fidelity(s, own, ctx.ref)["fidelity"]) != res["kd"]
    ctx.args.no_kd_own = True
    assert set(distill(ctx, "ghostify-mix", student)) == {"kd", "kd_seconds"}


def test_ghost_feature_loss_by_hand_and_its_hooks_go(chain_trunk):
    """``kd_finetune(feature_weight=...)``'s extra term is each Ghost layer's output against the teacher's conv of
    the same name, ``||s - t||^2 / ||t||^2`` averaged over the layers (worked out here on ``conv1``, whose channel
    order is folded into ``bn1`` and ``conv2``: its internal channel ``i`` is the original's ``channel_map[i]``,
    and ``conv2``, whose input differs); the hooks it sets are gone after, on teacher and student alike; a
    student without Ghost layers is refused."""
    net, s = tiny_trunk(chain_trunk, batches=2)
    x = torch.cat([b for b, _ in s.data["calib"]])
    student = ghostify.convert(net, ratio=2, init="calib", calib_data=[x], exclude=["stem"])
    assert sorted(e.name for e in ghostify.conversion_info(student).plan.converted) == ["conv1", "conv2"]
    cmap = student.conv1.channel_map
    assert student.conv1.emit_internal_order and not torch.equal(cmap, torch.arange(len(cmap)))
    with torch.no_grad(), GhostLayerOutputs(student, net) as feats:
        student(x), net(x)
        got = feats.loss()
        h_t = net.relu(net.bn0(net.stem(x)))
        h_s = student.relu(student.bn0(student.stem(x)))
        t1, s1 = net.conv1(h_t), student.conv1(h_s)
        t2, s2 = net.conv2(net.relu(net.bn1(t1))), student.conv2(student.relu(student.bn1(s1)))
        by_hand = ((s1 - t1[:, cmap]).pow(2).sum() / t1.pow(2).sum() + (s2 - t2).pow(2).sum() / t2.pow(2).sum()) / 2
    torch.testing.assert_close(got, by_hand)
    assert got > 1e-6  # the Ghost layers are not their convs
    batches = [b for b, _ in s.data["calib"]]
    plain = P.kd_finetune(student, net, batches, steps=3, recipe="trunk")
    with_layers = P.kd_finetune(student, net, batches, steps=3, recipe="trunk", feature_weight=1.0)
    assert not torch.equal(plain.conv1.primary.weight, with_layers.conv1.primary.weight)
    for m in [*net.modules(), *student.modules(), *with_layers.modules()]:
        assert not m._forward_hooks
    with pytest.raises(GhostifyError, match="not made by ghostify"):
        P.kd_finetune(net, net, batches, steps=1, recipe="trunk", feature_weight=1.0)


@pytest.mark.parametrize("recipe", ["mnist", "photos"])
def test_kd_learning_rate_is_the_one_given(recipe):
    """``lr`` replaces the recipe's: 0 leaves every weight where it was; a larger one moves them further."""
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    batches = [torch.randn(8, 3, 2, 2) for _ in range(3)]
    frozen = P.kd_finetune(student, teacher, batches, steps=5, recipe=recipe, lr=0.0)
    torch.testing.assert_close(frozen[1].weight, student[1].weight)
    moved = [(P.kd_finetune(student, teacher, batches, steps=5, recipe=recipe, lr=lr)[1].weight
              - student[1].weight).abs().sum() for lr in (None, 1e-2)]
    assert 0 < moved[0] < moved[1]


def test_kd_is_seeded_whatever_ran_before_and_leaves_the_global_generator_alone():
    """Dropout draws from the global generator: the KD seeds it, so a student's result does not depend on what
    ran before (the order of the methods), and restores it afterwards."""
    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 4))  # noqa: E731
    student, teacher = net(), net().eval()
    batches = [torch.randn(8, 3, 2, 2) for _ in range(3)]
    results = []
    for state in (1, 2):
        torch.manual_seed(state)
        before = torch.random.get_rng_state()
        results.append(P.kd_finetune(student, teacher, batches, steps=5))
        assert torch.equal(torch.random.get_rng_state(), before)
    for p, q in zip(*(r.parameters() for r in results)):
        torch.testing.assert_close(p, q)
    assert not torch.equal(results[0][2].weight, student[2].weight)  # it did train
    other = P.kd_finetune(student, teacher, batches, steps=5, seed=1)
    assert not torch.equal(other[2].weight, results[0][2].weight)


def test_photo_distillation_adds_ghostifys_own_repair_unless_told_not_to(chain_net):
    """A ghostify student on photos gets ``kd`` (the shared recipe) and ``kd_own`` (``ghostify.distill``) after
    the same steps; ``--no-kd-own`` leaves the second out; a peer's student never has it."""
    import argparse

    from benchmarks.peers import Context, Setup, distill

    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()
    batches = [(torch.randn(8, 3, 8, 8), None) for _ in range(2)]
    s = Setup("tiny", "photos", lambda: net, (3, 8, 8), lambda m: [m.fc], 16, 8, 1, "agreement")
    s.data = {"calib": batches, "eval": batches[:1], "desc": ""}
    student = ghostify.convert(net, ratio=2, init="calib", calib_data=[x for x, _ in batches])
    for no_own, method, keys in ((False, "ghostify-mix", {"kd", "kd_seconds", "kd_kl", "kd_own"}),
                                 (True, "ghostify-mix", {"kd", "kd_seconds", "kd_kl"}),
                                 (False, "tp-l1-global", {"kd", "kd_seconds", "kd_kl"})):
        ctx = Context(s, argparse.Namespace(photo_kd_steps=2, no_kd_own=no_own))
        res = distill(ctx, method, student)
        assert set(res) == keys and all(0 <= res[k] <= 1 for k in keys - {"kd_seconds", "kd_kl"})
        assert res["kd_kl"] > 0


def test_kd_crops_and_kd_seed_reach_every_distillation(chain_net, monkeypatch):
    """``--kd-crops N``: ``load_data`` adds N crops of the calibration photos cut with another seed (none equal to
    a calibration crop), and both distillations (the shared recipe and ghostify.distill) train on them, seeded with
    ``--kd-seed``; the held-out KL in ``fidelity`` is KL(original || model) at the KD temperature, worked out by hand."""
    import argparse

    from benchmarks.peers import Context, Setup, distill, fidelity, load_data

    s = Setup("tiny", "photos", lambda: None, (3, 224, 224), lambda m: [], 2, 2, 1, "agreement")
    load_data(s, quick=False, kd_crops=3)
    calib, kd = torch.cat([x for x, _ in s.data["calib"]]), torch.cat([x for x, _ in s.data["kd"]])
    assert calib.shape[0] == 2 and kd.shape == (3, 3, 224, 224)
    assert not any(torch.equal(a, b) for a in kd for b in calib)
    load_data(s, quick=False)
    assert "kd" not in s.data
    s = Setup("tiny", "trunk", lambda: None, (3, 224, 224), lambda m: [], 2, 2, 1, "feature error")
    load_data(s, quick=False, kd_crops=3)  # a trunk distils on other crops too
    assert torch.equal(torch.cat([x for x, _ in s.data["kd"]]), kd) and "3 other crops" in s.data["desc"]

    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()
    other = [(torch.randn(4, 3, 8, 8), None)]
    s = Setup("tiny", "photos", lambda: net, (3, 8, 8), lambda m: [m.fc], 16, 8, 1, "agreement")
    s.data = {"calib": [(torch.randn(8, 3, 8, 8), None)], "kd": other, "eval": [(torch.randn(2, 3, 8, 8), None)],
              "desc": ""}
    seen = []
    seeds = []
    monkeypatch.setattr(P, "kd_finetune", lambda st, t, batches, **kw: seen.append(batches) or seeds.append(kw) or st)
    monkeypatch.setattr(ghostify, "distill", lambda st, t, data, **kw: seen.append(data) or seeds.append(kw) or st)
    ctx = Context(s, argparse.Namespace(photo_kd_steps=2, no_kd_own=False, kd_seed=7))
    distill(ctx, "ghostify-mix", net)
    assert len(seen) == 2 and torch.equal(seen[0][0], other[0][0]) and seen[1] is other
    assert [kw["seed"] for kw in seeds] == [7, 7]  # --kd-seed reaches both distillations

    class Half(nn.Module):
        def forward(self, x):
            return 0.5 * net(x)

    with torch.no_grad():
        ref = [(x, None, net(x)) for x, _ in s.data["eval"]]
        pt, ps = (ref[0][2] / P.PHOTO_KD_T).softmax(1), (0.5 * ref[0][2] / P.PHOTO_KD_T).softmax(1)
        by_hand = (pt * (pt.log() - ps.log())).sum(1).mean().item()
        assert by_hand > 1e-4
        assert fidelity(s, Half(), ref)["kl"] == pytest.approx(by_hand, rel=1e-4)
        assert fidelity(s, net, ref)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_kl_allocation_ranks_with_the_alone_table_and_refuses_a_trunk(chain_net):
    from benchmarks.peers import Context, Setup, build

    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()
    batches = [(torch.randn(8, 3, 8, 8), None) for _ in range(4)]
    s = Setup("tiny", "photos", lambda: net, (3, 8, 8), lambda m: [m.fc], 32, 8, 1, "agreement")
    s.data = {"calib": batches, "eval": batches[:1], "desc": ""}
    ctx = Context(s, None)
    model, setting, repairs = build(ctx, "ghostify-alloc-kl", 0.8)
    table = ctx._tables["alone"]
    assert list(ctx._tables) == ["alone"] and table.method == "alone" and table.measure == "kl"
    assert ctx.macs(model) <= 0.8 and setting.startswith("1/2 convs") and repairs == {}
    assert any(isinstance(m, ghostify.GhostConv2d) for m in model.modules())
    trunk = Setup("tiny", "trunk", lambda: net, (3, 8, 8), lambda m: [m.fc], 32, 8, 1, "feature error")
    trunk.data = s.data
    with pytest.raises(ghostify.GhostifyError, match="needs logits"):
        build(Context(trunk, None), "ghostify-alloc-kl", 0.8)
    with pytest.raises(ghostify.GhostifyError, match="for trunks"):
        build(ctx, "ghostify-alloc-out", 0.8)


def test_trunk_allocation_ranks_by_the_relative_error_of_the_trunk_output(chain_trunk):
    """``ghostify-alloc-out``: the ``alone`` table with ``measure="output"``, fitted on 3/4 of the calibration
    batches and measured on the last 1/4, then the budget met with calibrated Ghost layers."""
    from benchmarks.peers import Context, build

    net, s = tiny_trunk(chain_trunk, batches=4)
    ctx = Context(s, None)
    model, setting, _ = build(ctx, "ghostify-alloc-out", 0.9)
    table = ctx._tables["alone-output"]
    assert list(ctx._tables) == ["alone-output"] and (table.method, table.measure) == ("alone", "output")
    assert all(r.loss == pytest.approx(r.metrics["output_error"] ** 2) for r in table.rows)
    assert ctx.macs(model) <= 0.9 and any(isinstance(m, ghostify.GhostConv2d) for m in model.modules())


def test_ort_allocation_reads_the_target_as_a_latency_budget(chain_trunk, monkeypatch, capsys):
    """``ghostify-alloc-out-ort``: the same table as ``ghostify-alloc-out``, handed to ``ghostify.allocate`` with
    the target as a budget of ONNX Runtime latency (the run's threads) instead of MACs; the setting says so and
    names the plan (the convs chosen on timings, which move between builds), so a rebuild can be told apart."""
    import argparse
    import hashlib

    from benchmarks.peers import Context, build

    pytest.importorskip("onnxruntime")
    net, s = tiny_trunk(chain_trunk, batches=4)
    seen, made, allocate = [], [], ghostify.allocate
    monkeypatch.setattr(ghostify, "allocate", lambda *a, **kw: seen.append(kw) or made.append(allocate(*a, **kw))
                        or made[-1])
    ctx = Context(s, argparse.Namespace(threads=1))
    model, setting, _ = build(ctx, "ghostify-alloc-out-ort", 1.0)  # a budget of the whole latency: nothing to save
    assert list(ctx._tables) == ["alone-output"] and seen[0]["table"] is ctx._tables["alone-output"]
    assert (seen[0]["target_latency"], seen[0]["runtime"], seen[0]["threads"]) == (1.0, "ort", 1)
    plan = hashlib.sha256(repr(sorted(made[0].choices.items())).encode()).hexdigest()[:6]  # names the convs chosen
    assert "target_macs" not in seen[0] and setting == f"ORT budget 1: 0/2 convs, ratios [], plan {plan}"
    chosen = ", ".join(f"{n} x{r:g}" for n, r in made[0].choices.items() if r is not None)
    assert f"plan {plan} converts {chosen}\n" in capsys.readouterr().err  # the log names the convs, to replay
    assert not any(isinstance(m, ghostify.GhostConv2d) for m in model.modules())
    build(ctx, "ghostify-alloc-out", 0.9)
    assert list(ctx._tables) == ["alone-output"] and seen[1]["target_macs"] == 0.9 and "runtime" not in seen[1]
    with pytest.raises(ghostify.GhostifyError, match="needs logits"):
        build(ctx, "ghostify-alloc-kl-ort", 0.9)


def test_allocation_takes_fractional_candidate_ratios(chain_net):
    """``--alloc-ratios 1.5 2``: the table is measured at both and a mild budget is met at ratio 1.5, which
    keeps more filters than 2 (ceil(n / 1.5) intrinsic maps)."""
    import argparse

    from benchmarks.peers import Context, Setup, build

    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()
    batches = [(torch.randn(8, 3, 8, 8), None) for _ in range(4)]
    s = Setup("tiny", "photos", lambda: net, (3, 8, 8), lambda m: [m.fc], 32, 8, 1, "agreement")
    s.data = {"calib": batches, "eval": batches[:1], "desc": ""}
    ctx = Context(s, argparse.Namespace(alloc_ratios=[1.5, 2]))
    model, setting, _ = build(ctx, "ghostify-alloc", 0.95)
    assert sorted({r.ratio for r in ctx._tables["proxy"].rows}) == [1.5, 2]
    assert ctx.macs(model) <= 0.95
    ghosts = [m for m in model.modules() if isinstance(m, ghostify.GhostConv2d)]
    assert ghosts and "ratios [1.5]" in setting
    assert all(g.primary.out_channels == math.ceil(g.out_channels / 1.5) for g in ghosts)


def test_ratio_arguments_are_checked_and_kept_whole(tmp_path):
    import argparse

    from benchmarks.agreement_budget import ratio_arg
    from benchmarks.peers import main

    assert [ratio_arg(t) for t in ("1.5", "2", "8.0")] == [1.5, 2, 8]
    assert isinstance(ratio_arg("2"), int)
    for bad in ("1", "0.5", "-2", "two", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="a ratio is a number > 1"):
            ratio_arg(bad)
    with pytest.raises(SystemExit):  # argparse's usage error, before any work
        main(["-o", "/nonexistent/never-written", "--alloc-ratios", "1"])
    # a folder's allocations keep one set of ratios: resuming with another is refused, and nothing is written
    (tmp_path / "results.json").write_text('{"meta": {}, "rows": []}')
    with pytest.raises(SystemExit, match="resume with --alloc-ratios 2 3 4"):
        main(["-o", str(tmp_path), "--resume", "--alloc-ratios", "1.5", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # so does resuming with another distillation seed (a folder old enough to have none recorded ran seed 0)
    with pytest.raises(SystemExit, match="was run with --kd-seed 0"):
        main(["-o", str(tmp_path), "--resume", "--kd-seed", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # and with other channel rounding (none recorded: 1), and a rounding below 1 is a usage error
    with pytest.raises(SystemExit, match="was run with --round-to 1"):
        main(["-o", str(tmp_path), "--resume", "--round-to", "8"])
    with pytest.raises(SystemExit):
        main(["-o", str(tmp_path / "new"), "--round-to", "0", "--quick", "--methods", "ghostify-mix"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_resume_keeps_the_recorded_unreachable_points_and_does_not_retry_them(tmp_path, chain_net, monkeypatch):
    import json

    import benchmarks.peers as peers

    s = peers.Setup("tiny", "photos", lambda: chain_net.eval(), (3, 8, 8), lambda m: [m.fc], 32, 8, 1, "agreement")
    monkeypatch.setitem(peers.SETUPS, "tiny", s)
    monkeypatch.setattr(peers, "load_data", lambda s, quick, **kw: s.__setattr__("data", {"desc": "no data"}))
    monkeypatch.setattr(peers, "Context", lambda s, args: None)
    monkeypatch.setattr(peers, "build", lambda *a: pytest.fail("a recorded unreachable point was built again"))
    monkeypatch.setattr(peers, "plot", lambda *a: None)
    gone = ["tiny", 0.5, "ghostify-alloc", "the budget cannot be met"]
    original = {"model": "tiny", "target": None, "method": "original", "repair": "none", "setting": "-", "macs": 1.0,
                "params": 1.0, "arch": "original", "fidelity": 1.0, "ort_ms": {"1": 1.0, "8": 2.0}}
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"unreachable": [gone]}, "rows": [original]}))
    peers.main(["-o", str(tmp_path), "--resume", "--models", "tiny", "--targets", "0.5", "--methods",
                "ghostify-alloc", "--no-kd", "--no-latency"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["unreachable"] == [gone] and saved["rows"] == [original]


def test_resume_refuses_a_point_built_again_differently(tmp_path, chain_net, monkeypatch):
    """A resumed point is built again for its distillation or export; when the build differs from the recorded
    one (an allocation under a latency budget, met on other timings), the run stops instead of attaching the
    other model's results to the recorded row."""
    import json
    import types

    import benchmarks.peers as peers

    s = peers.Setup("tiny", "photos", lambda: chain_net.eval(), (3, 8, 8), lambda m: [m.fc], 32, 8, 1, "agreement")
    monkeypatch.setitem(peers.SETUPS, "tiny", s)
    monkeypatch.setattr(peers, "load_data", lambda s, quick, **kw: s.__setattr__("data", {"desc": "no data"}))
    monkeypatch.setattr(peers, "Context", lambda s, args: types.SimpleNamespace(model=chain_net))
    monkeypatch.setattr(peers, "build", lambda *a: (chain_net, "ORT budget 0.8: 2/2 convs, ratios [2]", {}))
    (tmp_path / "onnx" / "tiny").mkdir(parents=True)
    (tmp_path / "onnx" / "tiny" / "original.onnx").write_bytes(b"kept")  # not exported again
    monkeypatch.setattr(peers, "distill", lambda *a: pytest.fail("distilled a model that is not the recorded one"))
    original = {"model": "tiny", "target": None, "method": "original", "repair": "none", "setting": "-", "macs": 1.0,
                "params": 1.0, "arch": "original", "fidelity": 1.0, "ort_ms": {"1": 1.0, "8": 2.0}}
    point = {"model": "tiny", "target": 0.8, "method": "ghostify-alloc-kl-ort", "repair": "none", "macs": 0.7,
             "setting": "ORT budget 0.8: 1/2 convs, ratios [2]", "params": 0.8, "arch": "0.8-ghostify-alloc-kl-ort",
             "fidelity": 0.9}
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "rows": [original, point]}))
    with pytest.raises(SystemExit, match="built again as 'ORT budget 0.8: 2/2 convs.*recorded as 'ORT budget 0.8: 1/2"):
        peers.main(["-o", str(tmp_path), "--resume", "--models", "tiny", "--targets", "0.8", "--methods",
                    "ghostify-alloc-kl-ort", "--no-latency"])
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == [original, point]


def test_calib_gap_closeness_by_hand_and_the_kd_views():
    from benchmarks.calib_gap import TEMPERATURE, closeness, kd_views

    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    agree, kl, n = closeness(lambda x: t[x], lambda x: s[x], [torch.tensor([0]), torch.tensor([1])])
    pt, ps = (t / TEMPERATURE).softmax(1), (s / TEMPERATURE).softmax(1)
    assert (agree, n) == (0.5, 2)  # the first agrees on class 0, the second does not
    assert kl == pytest.approx((pt * (pt.log() - ps.log())).sum().item() / 2)
    crops = [torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)]
    views = kd_views(crops, 20)  # two batches of 16: the second from the next epoch's permutation
    assert [v.shape for v in views] == [(16, 3, 16, 16), (16, 3, 16, 16)]
    torch.testing.assert_close(kd_views(crops, 20)[1], views[1])  # seeded: the same views every time
    assert not torch.equal(views[0], views[1])  # a new epoch augments anew
    assert not any(torch.equal(v, c) for v in torch.cat(views) for c in torch.cat(crops))  # augmented


def test_calib_augment_gives_every_fit_the_same_views(chain_net):
    """``--calib-augment N``: ghostify's calibration is the library's ``calib_augment=N`` and the BN recalibration
    of the pruned model sees the same images and views; the distillation keeps the images alone."""
    import argparse

    from benchmarks.peers import Context, Setup, build
    from ghostify.init.calib import calibration_batches

    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()
    batches = [(torch.randn(8, 3, 8, 8), None) for _ in range(2)]
    s = Setup("tiny", "photos", lambda: net, (3, 8, 8), lambda m: [m.fc], 16, 8, 1, "agreement")
    s.data = {"calib": batches, "eval": batches[:1], "desc": ""}
    ctx = Context(s, argparse.Namespace(alloc_ratios=[2], calib_augment=16))
    assert len(ctx.calib_x) == 2 and len(ctx.fit_x) == 4
    model, setting, _ = build(ctx, "ghostify-mix", 0.9)
    ratio = float(setting.split()[1])
    by_hand = ghostify.convert(net, ratio=ratio, cheap="mix", dw_size=1, init="calib", calib_data=ctx.calib_x,
                               calib_augment=16)
    for p, q in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q)
    pruned, _, repairs = build(ctx, "tp-l1-uniform", 0.9)
    views = [(x, None) for x in calibration_batches(ctx.calib_x, augment=16)]
    for m, n in zip(repairs["bn-recal"].modules(), P.bn_recalibrate(pruned, views).modules()):
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_var, n.running_var)


def test_round_to_reaches_the_pruned_channels_and_every_ghostify_method(chain_net):
    """``--round-to 4``: Torch-Pruning keeps multiples of 4 (unrounded, 0.3 of ChainNet's 8/16/12 channels leaves
    counts that are not), each ghostify method's intrinsic counts and the low-rank factors' ranks are multiples
    of 4."""
    import argparse

    from benchmarks.peers import Context, Setup, build

    plain = P.prune(chain_net, X, importance="l1", global_pruning=False, ratio=0.3, ignored=lambda m: [m.fc])
    assert any(c.out_channels % 4 for c in _convs(plain))
    rounded = P.prune(chain_net, X, importance="l1", global_pruning=False, ratio=0.3, ignored=lambda m: [m.fc],
                      round_to=4)
    assert all(c.out_channels % 4 == 0 for c in _convs(rounded))
    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()
    batches = [(torch.randn(8, 3, 8, 8), None) for _ in range(4)]
    s = Setup("tiny", "photos", lambda: net, (3, 8, 8), lambda m: [m.fc], 32, 8, 1, "agreement")
    s.data = {"calib": batches, "eval": batches[:1], "desc": ""}
    ctx = Context(s, argparse.Namespace(round_to=4, alloc_ratios=[3]))
    for method, target in (("ghostify-mix", 0.8), ("ghostify-alloc-kl", 0.9)):
        model, _, _ = build(ctx, method, target)
        ghosts = [m for m in model.modules() if isinstance(m, ghostify.GhostConv2d)]
        assert ghosts and all(g.primary.out_channels % 4 == 0 for g in ghosts), method
    assert ctx._tables["alone"].rows and all(r.ratio == 3 for r in ctx._tables["alone"].rows)
    model, _, _ = build(ctx, "lowrank", 0.6)
    ranks = [r for rs in model.lowrank_layers.values() for r in rs]
    assert ranks and all(r % 4 == 0 for r in ranks) and 0.5 < ctx.macs(model) <= 0.6 + 1e-9


def test_kd_lr_sweep_distils_one_student_per_rate(tiny_photos, monkeypatch, tmp_path):
    """``benchmarks.kd_lr`` builds each student once and distils a copy per learning rate: at rate 0 the KD
    changes nothing (the start's KL), at the recipe's rate it moves; the rows are written to ``-o``."""
    import json

    from benchmarks import kd_lr, peers

    monkeypatch.setitem(peers.SETUPS, "mobilenet_v2", peers.SETUPS["tiny"])
    rows = kd_lr.main(["--methods", "tp-l1-global", "--target", "0.7", "--lrs", "0", "1e-2", "--steps", "3",
                       "-o", str(tmp_path / "rows.json")])
    assert [r["lr"] for r in rows] == [0.0, 1e-2] and all(r["steps"] == 3 for r in rows)
    assert rows[0]["kd_kl"] == pytest.approx(rows[0]["start_kl"], rel=1e-6)
    assert rows[1]["kd_kl"] != pytest.approx(rows[1]["start_kl"], rel=1e-3)
    assert 0.6 < rows[0]["macs"] < 0.8
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_kd_lr_sweeps_a_trunk_with_a_target_per_method(chain_trunk, monkeypatch):
    """On a trunk ``benchmarks.kd_lr`` distils with the trunk recipe and reports the feature error; a method's
    ``@TARGET`` overrides ``--target`` (here the pruned student at 0.7 of the MACs, ghostify's at 0.8)."""
    from benchmarks import kd_lr, peers

    net, s = tiny_trunk(chain_trunk, batches=2)
    s.ignored = peers._last_conv  # as the real trunks: the output's channels stay
    monkeypatch.setitem(peers.SETUPS, "craft_trunk", s)
    asked = []
    monkeypatch.setattr(peers, "load_data", lambda s, quick, kd_crops=0: asked.append(kd_crops))
    rows = kd_lr.main(["--model", "craft_trunk", "--target", "0.8", "--methods", "tp-l1-global@0.7",
                       "ghostify-alloc-out", "--lrs", "0", "1e-2", "--steps", "3", "--kd-crops", "5"])
    assert asked == [5] and all(r["kd_crops"] == 5 for r in rows)
    assert [(r["method"], r["target"], r["lr"]) for r in rows] == [
        ("tp-l1-global", 0.7, 0.0), ("tp-l1-global", 0.7, 1e-2), ("ghostify-alloc-out", 0.8, 0.0),
        ("ghostify-alloc-out", 0.8, 1e-2)]
    assert 0.6 < rows[0]["macs"] < 0.8 and rows[2]["macs"] > rows[0]["macs"]
    for still, moved in (rows[0:2], rows[2:4]):
        assert still["kd"] == pytest.approx(still["start"], rel=1e-6)  # rate 0: the student as built
        assert 0 < moved["kd"] < moved["start"]  # the trunk recipe brings the feature map closer
    with pytest.raises(SystemExit, match="unknown method 'tp-l1'"):
        kd_lr.main(["--model", "craft_trunk", "--methods", "tp-l1@0.7"])
    # --feature-weights: ghostify's student at each weight, the pruned one (no Ghost layers) only at 0
    rows = kd_lr.main(["--model", "craft_trunk", "--methods", "tp-l1-global@0.7", "ghostify-alloc-out@0.8",
                       "--lrs", "1e-2", "--steps", "3", "--feature-weights", "0", "1"])
    assert [(r["method"], r["feature_weight"]) for r in rows] == [
        ("tp-l1-global", 0.0), ("ghostify-alloc-out", 0.0), ("ghostify-alloc-out", 1.0)]
    assert rows[1]["kd"] != pytest.approx(rows[2]["kd"], rel=1e-6)
    rows = kd_lr.main(["--model", "craft_trunk", "--methods", "tp-l1-global@0.7", "--lrs", "1e-2", "--steps", "0"])
    assert rows[0]["steps"] == 0 and rows[0]["kd"] == rows[0]["start"]  # 0 steps: not the default's 40


def test_kd_lr_keeps_and_replays_a_latency_budget_plan(chain_trunk, monkeypatch, tmp_path):
    """``kd_lr --plans DIR`` plans a latency budget once and keeps it there; the next sweep replays it. ``--seeds``
    distils the student once per seed."""
    from benchmarks import kd_lr, peers

    pytest.importorskip("onnxruntime")
    net, s = tiny_trunk(chain_trunk, batches=2)
    s.ignored = peers._last_conv
    monkeypatch.setitem(peers.SETUPS, "craft_trunk", s)
    monkeypatch.setattr(peers, "load_data", lambda s, quick, kd_crops=0: None)
    argv = ["--model", "craft_trunk", "--methods", "ghostify-alloc-out-ort@1", "tp-l1-global@0.7", "--lrs", "1e-2",
            "--steps", "2", "--plans", str(tmp_path), "--seeds", "0", "1"]
    first = kd_lr.main(argv)
    assert [(r["method"], r["seed"]) for r in first] == [("ghostify-alloc-out-ort", 0), ("ghostify-alloc-out-ort", 1),
                                                         ("tp-l1-global", 0), ("tp-l1-global", 1)]
    assert first[2]["kd"] != first[3]["kd"]  # each seed its own batches
    assert (tmp_path / f"{s.name}_1-ghostify-alloc-out-ort.json").exists()
    monkeypatch.setattr(ghostify, "allocate", lambda *a, **kw: pytest.fail("a kept plan is not planned again"))
    assert kd_lr.main(argv)[0]["setting"] == first[0]["setting"]


@pytest.fixture
def tiny_photos(chain_net, monkeypatch):
    """``peers.py``'s model "tiny": a chain net with random BatchNorm statistics on random 8x8 "photos"."""
    import benchmarks.peers as peers

    torch.manual_seed(0)
    net = randomize_bn(chain_net).eval()

    def fake_data(s, quick, kd_crops=0):
        s.data = {"calib": [(torch.randn(8, 3, 8, 8), None) for _ in range(2)],  # 16: one photos KD batch
                  "eval": [(torch.randn(8, 3, 8, 8), None)], "desc": "random images"}

    monkeypatch.setitem(peers.SETUPS, "tiny", peers.Setup("tiny", "photos", lambda: net, (3, 8, 8),
                                                           lambda m: [m.fc], 16, 8, 1, "agreement"))
    monkeypatch.setattr(peers, "load_data", fake_data)
    return net


def test_a_point_interrupted_before_its_repairs_leaves_no_row(tmp_path, tiny_photos, monkeypatch):
    """A run stopped while a point's repaired model distils (Ctrl-C, a killed job) saves none of that point's rows,
    so ``--resume`` builds the whole point again instead of keeping its unrepaired row alone."""
    import json

    import benchmarks.peers as peers

    def interrupted(ctx, method, student):
        raise KeyboardInterrupt

    monkeypatch.setattr(peers, "distill", interrupted)
    args = ["-o", str(tmp_path), "--models", "tiny", "--targets", "0.7", "--methods", "tp-l1-global", "--no-latency"]
    with pytest.raises(KeyboardInterrupt):
        peers.main(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["original"]
    monkeypatch.setattr(peers, "distill", lambda ctx, method, student: {"kd": 0.5, "kd_seconds": 0.0})
    monkeypatch.setattr(peers, "plot", lambda *a: None)
    peers.main(args + ["--resume"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["repair"], r.get("kd")) for r in saved["rows"]] == [
        ("original", "none", None), ("tp-l1-global", "none", None), ("tp-l1-global", "bn-recal", 0.5)]


def test_resume_with_a_new_target_times_every_point_again_when_the_onnx_files_were_not_kept(
        tmp_path, tiny_photos, monkeypatch):
    """Without ``--keep-onnx`` a finished run deletes its ONNX files; a later ``--resume`` with another target
    rebuilds the recorded points' models so that one timing covers them all (it used to stop on a missing file)."""
    import json

    import benchmarks.peers as peers

    built = []
    real_build = peers.build
    monkeypatch.setattr(peers, "build", lambda ctx, method, target: built.append(target) or real_build(ctx, method,
                                                                                                       target))
    monkeypatch.setattr(peers, "plot", lambda *a: None)
    args = ["-o", str(tmp_path), "--models", "tiny", "--methods", "tp-l1-global", "--no-kd", "--repeats", "1",
            "--batch-sizes", "1"]
    peers.main(args + ["--targets", "0.7"])
    assert not (tmp_path / "onnx" / "tiny").exists() and built == [0.7]
    peers.main(args + ["--targets", "0.5", "--resume"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert built == [0.7, 0.5, 0.7]  # the new point, then the recorded one rebuilt for the timing
    assert sorted({r["target"] or 0 for r in rows}) == [0, 0.5, 0.7]
    assert all(r["ort_ms"]["1"] > 0 for r in rows)


def test_plot_draws_every_method(tmp_path):
    """The figure has a marker for every method (a method added without one stopped a run at its end) and is
    written as a PNG."""
    from benchmarks.peers import METHODS, Setup, plot

    pytest.importorskip("matplotlib")
    s = Setup("tiny", "trunk", lambda: None, (3, 8, 8), lambda m: [], 32, 8, 1, "feature error")
    rows = [{"model": "tiny", "method": "original", "repair": "none", "target": None, "fidelity": 0.0, "macs": 1.0,
             "ort_ms": {"1": 1.0}}]
    rows += [{"model": "tiny", "method": m, "repair": "none", "target": 0.5, "fidelity": 0.1 + i / 100, "macs": 0.5,
              "ort_ms": {"1": 0.5 + i / 100}} for i, m in enumerate(METHODS)]
    plot(rows, s, tmp_path / "tiny.png")
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retime_times_a_folders_kept_onnx_models_and_writes_each_pass(tmp_path, chain_net, monkeypatch):
    """``benchmarks.retime``: every kept ONNX model of the folder timed together, once per pass, the passes written
    to ``retime_MODEL.json``; a folder without the original is refused with the flag that keeps it."""
    import json

    import benchmarks.peers as peers
    from benchmarks.retime import main

    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(peers.SETUPS, "tiny", peers.Setup("tiny", "photos", lambda: chain_net, (3, 8, 8),
                                                          lambda m: [], 8, 8, 1, "agreement"))
    with pytest.raises(SystemExit, match="--keep-onnx"):
        main([str(tmp_path), "tiny"])
    folder = tmp_path / "onnx" / "tiny"
    folder.mkdir(parents=True)
    ghost = ghostify.convert(randomize_bn(chain_net).eval(), ratio=2, init="copy")
    for name, model in (("original", chain_net.eval()), ("0.5-ghostify-dw", P.fold_bn(ghost)[0])):
        (folder / f"{name}.onnx").write_bytes(P.onnx_bytes(model, X))
    passes = main([str(tmp_path), "tiny", "--repeats", "2", "--timings", "2"])
    assert len(passes) == 2 and all(set(p) == {"original", "0.5-ghostify-dw"} for p in passes)
    assert all(v > 0 for p in passes for v in p.values())
    assert json.loads((tmp_path / "retime_tiny.json").read_text()) == passes


def test_ort_passes_takes_each_models_median_ratio_to_the_original_over_the_timings(monkeypatch):
    """Several timings: a model's ratio to the original is the median of its per-timing ratios (the machine's speed
    moves between timings), its ms that ratio times the original's median, and the table gives the range."""
    from benchmarks.peers import Setup, table

    passes = iter([{"original": {1: 100.0}, "a": {1: 80.0}}, {"original": {1: 200.0}, "a": {1: 180.0}},
                   {"original": {1: 150.0}, "a": {1: 120.0}}])
    monkeypatch.setattr(P, "ort_latency", lambda models, inputs, **kw: next(passes))
    ms, ratios = P.pass_medians(P.ort_passes({"original": b"", "a": b""}, {1: X}, timings=3))
    assert ratios == {"original": {1: [1.0, 1.0, 1.0]}, "a": {1: [0.8, 0.9, 0.8]}}
    assert ms == {"original": {1: 150.0}, "a": {1: pytest.approx(120.0)}}
    s = Setup("tiny", "trunk", lambda: None, (3, 8, 8), lambda m: [], 32, 8, 1, "feature error")
    rows = [{"model": "tiny", "method": m, "repair": "none", "target": t, "setting": "-", "macs": 1.0, "params": 1.0,
             "fidelity": 0.1, "ort_ms": {"1": ms[k][1]}, "ort_ratios": {"1": ratios[k][1]}}
            for k, m, t in (("original", "original", None), ("a", "tp-l1-global", 0.5))]
    md = table(rows, {"tiny": s})
    assert "bs1 vs orig (range over timings)" in md and "| 0.80 (0.80-0.90) |" in md and "| 1.00 |" in md


def test_latency_budget_plans_are_kept_and_replayed(chain_trunk, tmp_path, monkeypatch, capsys):
    """``--plans DIR``: a latency budget's plan (chosen on timings, which move) is written to DIR when planned, and
    a plan kept there is replayed without planning: the same convs converted, the same setting (plan name), the
    same model."""
    import argparse
    import json

    from benchmarks.peers import Context, build, plan_file

    pytest.importorskip("onnxruntime")
    net, s = tiny_trunk(chain_trunk, batches=4)
    ctx = Context(s, argparse.Namespace(threads=1, plans=tmp_path / "plans"))
    path = plan_file(ctx, "ghostify-alloc-out-ort", 1.0)
    assert path == tmp_path / "plans" / f"{s.name}_1-ghostify-alloc-out-ort.json"
    assert plan_file(ctx, "ghostify-alloc-out", 1.0) is None  # a MACs budget needs no replay
    _, planned, _ = build(ctx, "ghostify-alloc-out-ort", 1.0)
    assert json.loads(path.read_text())["choices"] == {"conv1": None, "conv2": None}  # kept: nothing converted

    a = ghostify.allocate(net, table=ctx.table("alone", "output"), ratios=(2,), target_macs=0.8, progress=False,
                          input_size=tuple(ctx.x0.shape))  # a plan that converts a conv, kept as if timed
    assert [r for r in a.choices.values() if r] == [2]
    path = plan_file(ctx, "ghostify-alloc-out-ort", 0.9)
    path.write_text(json.dumps({"choices": a.choices, "plan": a.plan.to_dict(), "summary": "by hand"}))
    monkeypatch.setattr(ghostify, "allocate", lambda *a, **kw: pytest.fail("a kept plan is not planned again"))
    capsys.readouterr()
    model, setting, _ = build(ctx, "ghostify-alloc-out-ort", 0.9)
    log = capsys.readouterr().err
    assert f"replays {path} (by hand)" in log
    assert setting.startswith("ORT budget 0.9: 1/2 convs, ratios [2], plan ")
    conv = next(n for n, r in a.choices.items() if r)
    assert f"plan {setting.split()[-1]} converts {conv} x2\n" in log  # the log names the conv converted
    expected = ghostify.convert(net, plan=a.plan, calib_data=ctx.fit_x)
    x = ctx.calib_x[0]
    torch.testing.assert_close(model(x), expected(x))
    assert build(ctx, "ghostify-alloc-out-ort", 1.0)[1] == planned  # replayed: the same plan name
    ctx.round_to = 8  # a plan kept under other settings is refused, not replayed as if it were this run's
    with pytest.raises(SystemExit, match=r"planned with \{'round_to': 1, 'alloc_ratios': \[2, 3, 4\]\}.*round_to': 8"):
        build(ctx, "ghostify-alloc-out-ort", 1.0)
