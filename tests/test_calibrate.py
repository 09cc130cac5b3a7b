"""Calibrated init (init="calib") and the mix cheap op."""
import pytest
import torch
from torch import nn

import ghostify
from ghostify.layers import GhostConv2d, MixCheap


class Planted(nn.Module):
    """stem (kept) -> ReLU -> a conv whose 8 filters are 4 filters and scaled copies of them, shuffled."""

    def __init__(self, scale_only=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        base = torch.randn(4, 6, 3, 3, generator=g)
        scales = torch.tensor([1.7, -0.6, 2.3, 0.9])
        w = torch.cat([base, base * scales[:, None, None, None]])
        self.perm = torch.randperm(8, generator=g)
        with torch.no_grad():
            self.conv.weight.copy_(w[self.perm])

    def forward(self, x):
        return self.conv(self.act(self.stem(x)))


@pytest.mark.parametrize("init", ["calib", "copy"])
def test_planted_ghosts_are_found_and_reproduced(init):
    torch.manual_seed(0)
    model = Planted().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(4)]
    # the planted conv feeds the model output, so its order cannot be folded: scatter=True lets
    # the conversion choose the intrinsic filters freely and reorder at run time
    ghost = ghostify.convert(model, ratio=2, dw_size=1, init=init, cheap="dw", calib_data=data, scatter=True).eval()
    assert not ghost.get_submodule("conv")._identity_order  # reordered at run time
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), model(x), rtol=1e-4, atol=1e-4)
    # the pairing found: each ghost's parent is the filter it is a scaled copy of
    g = ghost.get_submodule("conv")
    cmap = g.channel_map.tolist()
    base_of = {int(c): int(c) % 4 for c in range(8)}  # planted row r is base r % 4
    orig_row = {int(model.perm[i]): i for i in range(8)}  # channel i holds planted row perm[i]
    parents = g.cheap.parents().tolist()
    for slot, ch in enumerate(cmap[g.intrinsic_channels:]):
        parent_ch = cmap[parents[slot]]
        assert base_of[int(model.perm[ch])] == base_of[int(model.perm[parent_ch])]
    assert orig_row  # sanity: permutation is a bijection


def test_largest_norm_selection_fails_on_planted_case():
    """Why selection uses the covariance: the 4 largest-norm filters are not one of each pair."""
    model = Planted()
    norms = model.conv.weight.flatten(1).norm(dim=1)
    top = set(norms.argsort(descending=True)[:4].tolist())
    bases = {int(model.perm[c]) % 4 for c in top}
    assert len(bases) < 4


def _small_net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sequential_is_no_worse_than_per_layer():
    model = _small_net()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(6)]
    test = torch.randn(16, 3, 16, 16, generator=gen)
    errs = {}
    for seq in (True, False):
        g = ghostify.convert(model, ratio=2, init="calib", cheap="dw", calib_data=data, sequential=seq).eval()
        with torch.no_grad():
            errs[seq] = _rel(g(test), model(test))
    assert errs[True] <= errs[False] + 1e-6, errs


def test_calib_beats_copy_and_records_heldout_error():
    model = _small_net()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(6)]
    test = torch.randn(16, 3, 16, 16, generator=gen)
    calib = ghostify.convert(model, init="calib", calib_data=data).eval()
    copy = ghostify.convert(model, init="copy").eval()
    with torch.no_grad():
        assert _rel(calib(test), model(test)) < _rel(copy(test), model(test))
    info = calib.ghostify_info.layer_info
    assert set(info) == {e.name for e in calib.ghostify_info.plan.converted}
    for rec in info.values():
        assert 0 <= rec["heldout_error"] and 0 <= rec["calib_error"]


def test_max_layer_error_keeps_convs_and_saved_model_round_trips(tmp_path):
    model = _small_net()
    data = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    ghost = ghostify.convert(model, init="calib", calib_data=data, max_layer_error=0.0).eval()
    plan = ghost.ghostify_info.plan
    assert not plan.converted
    assert all("kept as conv" in e.reason for e in plan.entries[1:])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), model(x))
    # a calib model (cheap-op biases) saves and loads
    ghost = ghostify.convert(model, init="calib", calib_data=data).eval()
    path = ghostify.save(ghost, tmp_path / "m.safetensors")
    with pytest.raises(ghostify.GhostifyError, match="model=MyNet"):
        ghostify.load(path)  # nn.Sequential of layers: no recipe can rebuild it
    again = ghostify.load(path, model=_small_net())
    with torch.no_grad():
        torch.testing.assert_close(again(x), ghost(x), rtol=0, atol=0)


def test_calib_without_data_names_the_fix():
    with pytest.raises(ghostify.GhostifyError, match="calib_data"):
        ghostify.convert(_small_net(), init="calib")


def test_mix_cheap_op_shapes_and_grouping():
    op = MixCheap(8, 12, groups=4, dw_size=3)
    assert op(torch.randn(2, 8, 5, 5)).shape == (2, 12, 5, 5)
    m = torch.randn(12, 8)
    op.load_mix(m)
    x = torch.randn(1, 8, 5, 5)
    # block-diagonal part of m applied per position (dw conv set to identity)
    mask = torch.zeros(12, 8)
    for i in range(4):
        mask[i * 3:(i + 1) * 3, i * 2:(i + 1) * 2] = 1
    ref = torch.einsum("gc,nchw->nghw", m * mask, x)
    torch.testing.assert_close(op(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        MixCheap(6, 9, groups=4)


def test_mix_copy_is_exact_on_low_rank_filters():
    """Filters spanning a rank-4 space: mix reproduces all 8 channels from 4 intrinsic ones."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        base = torch.randn(4, 5 * 9)
        conv.weight.copy_((torch.randn(8, 4) @ base).reshape(8, 5, 3, 3))
    ghost = GhostConv2d.from_conv(conv, ratio=2, dw_size=1, cheap="mix")
    from ghostify.init.transfer import copy_layer

    copy_layer(conv, ghost)
    x = torch.randn(2, 5, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["calib", "copy"])
def test_unfoldable_layers_keep_the_identity_order_by_default(init):
    """Without scatter=True a layer whose output meets the model output runs as a plain cat."""
    model = Planted().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(4)]
    ghost = ghostify.convert(model, ratio=2, dw_size=1, init=init, calib_data=data).eval()
    g = ghost.get_submodule("conv")
    torch.testing.assert_close(g.channel_map, torch.arange(8))
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():  # intrinsic channels 0..3 are the original's (copied or refit exactly)
        torch.testing.assert_close(ghost(x)[:, :4], model(x)[:, :4], rtol=1e-4, atol=1e-4)


class _PlantedPair(nn.Module):
    """stem -> ReLU -> one 5x5 conv whose last 4 filters are derived from its first 4.

    ``kind="mix"``: ghost filters are random linear mixtures of all 4 intrinsic filters
    (a 1x1 mix reproduces them, a depthwise op cannot). ``kind="dw"``: each ghost filter is
    one intrinsic filter blurred by its own 3x3 kernel (a depthwise 3x3 reproduces it away
    from the borders, a 1x1 mix cannot).
    """

    def __init__(self, kind):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.stem, self.act = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv = nn.Conv2d(6, 8, 5, padding=2, bias=False)
        base = torch.zeros(4, 6, 5, 5)
        base[:, :, 1:4, 1:4] = torch.randn(4, 6, 3, 3, generator=g)
        if kind == "mix":
            ghosts = torch.einsum("gi,icxy->gcxy", torch.randn(4, 4, generator=g), base)
        else:
            k = torch.randn(4, 1, 3, 3, generator=g)
            ghosts = torch.stack([nn.functional.conv2d(base[i][:, None], k[i][None], padding=1)[:, 0]
                                  for i in range(4)])
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([base, ghosts]))

    def forward(self, x):
        return self.conv(self.act(self.stem(x)))


@pytest.mark.parametrize("kind", ["mix", "dw"])
def test_cheap_auto_picks_the_family_that_fits(kind, tmp_path):
    torch.manual_seed(0)
    model = _PlantedPair(kind).eval()
    data = [torch.randn(4, 3, 24, 24) for _ in range(5)]
    ghost = ghostify.convert(model, ratio=2, dw_size=3, init="calib", cheap="auto", calib_data=data)
    info = ghostify.conversion_info(ghost)
    rec = info.layer_info["conv"]
    assert rec["cheap"]["cheap"] == kind
    other = "dw" if kind == "mix" else "mix"
    assert rec["cheap"]["scores"][kind] < 0.5 * rec["cheap"]["scores"][other]
    layer = ghost.get_submodule("conv")
    assert layer.cheap_kind == kind and isinstance(layer.cheap, MixCheap) == (kind == "mix")
    assert info.plan["conv"].spec.cheap == kind  # the plan records the choice, so load rebuilds it
    ghostify.save(ghost, tmp_path / "g.safetensors")
    back = ghostify.load(tmp_path / "g.safetensors", model=_PlantedPair(kind))
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ghost(x))


def test_calibrated_default_is_the_1x1_mix_and_the_saved_plan_records_it(chain_net, net_classes, tmp_path):
    """convert(init="calib") with no cheap op is convert(init="calib", cheap="mix", dw_size=1); copy keeps dw 3x3."""
    data = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    ghost = ghostify.convert(chain_net, init="calib", calib_data=data)
    explicit = ghostify.convert(chain_net, init="calib", cheap="mix", dw_size=1, calib_data=data)
    spec = lambda g: {e.name: (e.spec.cheap, e.spec.dw_size) for e in g.ghostify_info.plan.converted}
    assert spec(ghost) == spec(explicit) == {"conv1": ("mix", 1), "conv2": ("mix", 1)}
    assert all(isinstance(ghost.get_submodule(n).cheap, MixCheap) for n in ("conv1", "conv2"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), explicit(x), rtol=0, atol=0)
        ghostify.save(ghost, tmp_path / "g.safetensors")
        back = ghostify.load(tmp_path / "g.safetensors", model=net_classes["ChainNet"]())
        torch.testing.assert_close(back(x), ghost(x))
    assert spec(back) == spec(ghost)  # the file holds the concrete choice, not "the default"
    assert spec(ghostify.convert(chain_net)) == {"conv1": ("dw", 3), "conv2": ("dw", 3)}  # copy: the paper's op


def test_cheap_auto_needs_a_strategy_that_chooses():
    with pytest.raises(ghostify.GhostifyError, match="--init calib"):
        ghostify.LayerSpec(cheap="auto", init="copy")


class InPlaceNet(nn.Module):
    """In-place ops where the two models part: ``t`` is the same in both until ``add_`` adds each model's own
    ``conv_a`` output to it, and ``conv_b`` reads ``t`` (the relu node) after that mutation."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv_a, self.conv_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.act(self.stem(x))
        t = s.relu()
        t.add_(self.conv_a(s))
        return self.conv_b(t).mean((2, 3))


class AliasNet(InPlaceNet):
    """``v`` is a view of ``s`` (held once for both models) and is read after ``add_`` changed ``s`` in place
    with each model's own ``conv_a`` output: each model's ``v`` must show its own change."""

    def forward(self, x):
        s = self.act(self.stem(x))
        v = s[:, :4]
        s.add_(self.conv_a(s))
        return self.conv_b(torch.cat([v, v], 1)).mean((2, 3))


@pytest.mark.parametrize("sequential, net, exclude", [
    (seq, net, exclude) for net, exclude in (("residual", ()), ("residual", ("stem",)), ("inplace", ("stem",)),
                                             ("alias", ("stem",)))
    for seq in (True, False)] + [(True, "resnet18", ("conv1", "layer[124].*", "layer3.0.*"))])  # 15 s: one mode
def test_lockstep_pass_equals_the_per_layer_hook_pass(sequential, net, exclude, monkeypatch, residual_net):
    """Traced models are calibrated in one lockstep pass; it must fit exactly what per-layer capture fits,
    also where the two models share their first nodes (``stem`` kept) and where in-place ops follow the parting,
    one of them on a tensor a later node reads through a view (the pass starts again, holding nothing once)
    (torchvision's ResNet: in-place ReLUs and ``out += identity``, the models parting at ``layer3.1``)."""
    import torchvision

    torch.manual_seed(0)
    model = {"residual": lambda: residual_net, "inplace": InPlaceNet, "alias": AliasNet,
             "resnet18": lambda: torchvision.models.resnet18(num_classes=10)}[net]().eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(4)]
    options = dict(ratio=2, init="calib", cheap="auto", calib_data=data, sequential=sequential, exclude=exclude)
    fast = ghostify.convert(model, **options)
    import ghostify.init.calib as calibrate

    monkeypatch.setattr(calibrate, "_single_input", lambda graph: False)  # force the hook path
    slow = ghostify.convert(model, **options)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x))
    a, b = ghostify.conversion_info(fast).layer_info, ghostify.conversion_info(slow).layer_info
    assert a.keys() == b.keys() and len(a) >= 2
    for name in a:
        assert a[name]["heldout_error"] == pytest.approx(b[name]["heldout_error"], rel=1e-5)


@pytest.mark.parametrize("sequential", [True, False])
def test_lockstep_computes_what_both_models_share_once(sequential, residual_net):
    """Before the first fitted layer both models compute the same values: the lockstep pass runs the original's
    module once per batch for both and never the converted model's copy; after it, each runs its own, and
    with ``sequential=False`` (every layer fitted on the original's inputs) the converted model never runs."""
    model = residual_net.eval()
    seen = []
    for name in ("stem", "bn0", "bn2"):
        model.get_submodule(name).register_forward_hook(  # the memory check's forward of one image is not the pass
            lambda m, args, out, name=name: seen.append((name, m)) if len(args[0]) > 1 else None)
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    ghost = ghostify.convert(model, ratio=2, init="calib", calib_data=data, exclude=("stem",), sequential=sequential)
    counts = {}
    for name, m in seen:  # the hooks came along with the copy: tell the two models' modules apart
        side = "original" if m is model.get_submodule(name) else "converted" if m is ghost.get_submodule(name) else "?"
        counts[f"{side}.{name}"] = counts.get(f"{side}.{name}", 0) + 1
    assert counts == {"original.stem": 3, "original.bn0": 3, "original.bn2": 3} | ({"converted.bn2": 3} if sequential
                                                                                  else {})


def test_a_calibration_too_big_for_the_memory_is_warned_about_with_the_fix(chain_net, monkeypatch):
    """The lockstep pass holds a layer's outputs for every image, for both models once they part: about 4 x the
    largest layer output of one image x images when every conv converts (ChainNet parts at its first layer).
    Over 80 % of the available memory a warning names the figures and the fix; under it, none."""
    import warnings

    import ghostify.init.lockstep as L

    from ghostify._util import capture, format_size

    data = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    leaves = {n: m for n, m in chain_net.named_modules() if not list(m.children())}
    largest = max(o.numel() * 4 for o in capture(chain_net, leaves, data[0][:1], what="output").values())
    monkeypatch.setattr(L, "available_bytes", lambda device: int(4 * largest * 12 / 0.8) - 1)  # short of the 20 % margin
    with pytest.warns(UserWarning, match=r"all 12 calibration images.*--calib-size.*--calib-augment") as got:
        ghostify.convert(chain_net, init="calib", calib_data=data)
    assert f"({format_size(largest)}B per image at its largest layer)" in str(got[0].message)
    monkeypatch.setattr(L, "available_bytes", lambda device: int(4 * largest * 12 / 0.8) + 1)  # enough: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghostify.convert(chain_net, init="calib", calib_data=data)


def test_the_memory_check_reads_past_a_layer_whose_output_is_not_a_tensor(monkeypatch):
    """A leaf module returning a tuple is skipped, not fatal: the estimate comes from the tensor outputs."""
    import ghostify.init.lockstep as L

    class Pair(nn.Module):
        def forward(self, x):
            return x, 2 * x

    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pair = nn.Conv2d(3, 8, 3, padding=1), Pair()

        def forward(self, x):
            a, b = self.pair(self.conv(x))
            return a + b

    monkeypatch.setattr(L, "available_bytes", lambda device: 1)
    with pytest.warns(UserWarning, match=r"all 2 calibration images at once: about 16.4KB here \(2.05KB per image"):
        L.check_memory(TwoOut().eval(), [torch.randn(2, 3, 8, 8)], ["conv"])  # 8x8x8 floats, x4 after the parting


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(3, 5), dilation=2, padding="same"), dict(kernel_size=1, stride=2),
                                dict(kernel_size=3, padding="valid")])
def test_patches_at_sampled_positions_equal_unfold(kw):
    from ghostify.init.fitting import conv_padding as _pads, patch_rows

    conv = nn.Conv2d(4, 6, **kw)
    x = torch.randn(2, 4, 11, 9)
    y = conv(x)
    pos = torch.randperm(y.shape[2] * y.shape[3])[:7]
    cols = nn.functional.unfold(nn.functional.pad(x, _pads(conv, x)), conv.kernel_size, dilation=conv.dilation,
                                stride=conv.stride)
    expected = cols[:, :, pos].permute(0, 2, 1).reshape(-1, cols.shape[1])
    got = patch_rows(conv, x, pos, y.shape[3])
    torch.testing.assert_close(got, expected)
    # the rows reproduce the conv's outputs at those positions
    torch.testing.assert_close(got @ conv.weight.reshape(6, -1).T + conv.bias,
                               y.flatten(2)[:, :, pos].permute(0, 2, 1).reshape(-1, 6), rtol=1e-4, atol=1e-5)
    # a subset of the images, in a given order
    torch.testing.assert_close(patch_rows(conv, x, pos, y.shape[3], torch.tensor([1])), expected[len(pos):])


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), dilation=2, padding="same"),
                                dict(kernel_size=3, padding="valid", bias=False)])
def test_statistics_from_every_window_equal_the_gathered_patches(kw, monkeypatch):
    """When every output position is sampled (stride 1), the normal equations come from shifted products of
    the whole input (window_gram, the conv's weight gradient): the same sums as from the gathered patches,
    for both halves of the images (5 images: halves of 3 and 2)."""
    import ghostify.init.statistics as S

    conv = nn.Conv2d(4, 6, **kw)
    xs = [torch.randn(5, 4, 11, 9), torch.randn(2, 4, 11, 9)]
    ys = [conv(x).detach() for x in xs]
    assert S.every_window(conv, ys[0], torch.arange(ys[0].shape[2] * ys[0].shape[3]))
    dense = S.normal_equations(conv, xs, ys, 10_000, torch.Generator().manual_seed(0))
    monkeypatch.setattr(S, "every_window", lambda *a: False)
    gathered = S.normal_equations(conv, xs, ys, 10_000, torch.Generator().manual_seed(0))
    for got, want in zip(dense[:5], gathered[:5]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert dense[4] == 7 * ys[0].shape[2] * ys[0].shape[3]


# -- BN weighting, reduced-rank mix, ridge choice, fractional ratios -----------------------------


class OneByOne(nn.Module):
    """A 1x1 conv (6 -> 8) that reads the input directly, optionally followed by a BatchNorm."""

    def __init__(self, bn: bool):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(6, 8, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(8, 6, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(8, generator=g))
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        if bn:
            with torch.no_grad():
                self.bn.running_var.copy_(torch.rand(8, generator=g) * 4 + 0.01)
                self.bn.weight.copy_(torch.randn(8, generator=g))

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("bn", [False, True])
def test_mix_reaches_the_best_rank_m_error_in_the_bn_metric(bn):
    """ratio 2, mix: the fit on every position equals the optimal rank-4 approximation of the outputs, as the BN sees them."""
    torch.manual_seed(0)
    model = OneByOne(bn).eval()
    data = [torch.randn(4, 6, 5, 5) for _ in range(3)]
    ghost = ghostify.convert(model, ratio=2, cheap="mix", dw_size=1, init="calib", calib_data=data, holdout=0,
                             ridge=1e-10, scatter=True, overrides={"conv": {}})  # the stem converts by name
    got = ghost.ghostify_info.layer_info["conv"]["calib_error"]
    # by hand: outputs weighted by |gamma| / sqrt(var + eps); the mix's bias absorbs the mean,
    # so the best rank-4 error is the tail of the centred covariance's spectrum
    with torch.no_grad():
        y = torch.cat([model.conv(x) for x in data]).permute(0, 2, 3, 1).reshape(-1, 8).double()
    s = ((model.bn.weight / (model.bn.running_var + model.bn.eps).sqrt()).abs().double() if bn
         else torch.ones(8, dtype=torch.float64))
    yw = y * s
    centred = yw - yw.mean(0)
    tail = torch.linalg.eigvalsh(centred.T @ centred)[:4].sum()
    assert got == pytest.approx((tail / (yw**2).sum()).sqrt().item(), rel=1e-3)
    # and the Ghost layer's own outputs reproduce that error
    with torch.no_grad():
        yg = torch.cat([ghost.get_submodule("conv")(x) for x in data]).permute(0, 2, 3, 1).reshape(-1, 8).double()
    assert (((yg - y) * s).norm() / yw.norm()).item() == pytest.approx(got, rel=1e-3)


def test_bn_weighting_fits_the_channels_the_bn_amplifies():
    """Six channels are one filter (plus small noise); channels 2 and 5 are independent but 100x
    smaller, and the BN scales them up 100x. With two intrinsic maps the BN-weighted fit keeps
    one of them; the raw fit spends its second map on the noise and loses both after the BN."""
    g = torch.Generator().manual_seed(0)
    model = OneByOne(bn=True).eval()
    f = torch.randn(6, generator=g)
    w = torch.randn(8, 1, generator=g) * f + 0.05 * torch.randn(8, 6, generator=g)
    w[[2, 5]] = 0.01 * torch.randn(2, 6, generator=g)
    with torch.no_grad():
        model.conv.weight.copy_(w[:, :, None, None])
        model.conv.bias.zero_()
        model.bn.running_var.fill_(1.0)
        model.bn.running_var[[2, 5]] = 1e-4
        model.bn.weight.fill_(1.0)
    data = [torch.randn(4, 6, 5, 5, generator=g) for _ in range(4)]
    x = torch.randn(8, 6, 5, 5, generator=g)
    errs = {}
    for weighting in ("bn", "none"):
        ghost = ghostify.convert(model, ratio=4, cheap="mix", dw_size=1, init="calib", calib_data=data,
                                 weighting=weighting, scatter=True, overrides={"conv": {}}).eval()
        with torch.no_grad():
            errs[weighting] = ((ghost(x) - model(x)).norm() / model(x).norm()).item()
    assert errs["bn"] < 0.8 * errs["none"], errs


def test_ridge_is_chosen_by_the_other_half():
    from ghostify.init.fitting import choose_ridge as _choose_ridge

    g = torch.Generator().manual_seed(0)
    d, rows = 40, 60  # few rows per unknown
    w_true = torch.randn(d, 3, generator=g, dtype=torch.float64)

    def halves(noise):
        a, b = [], []
        for _ in range(2):
            p = torch.randn(rows, d, generator=g, dtype=torch.float64)
            t = p @ w_true + noise * torch.randn(rows, 3, generator=g, dtype=torch.float64)
            a.append(p.T @ p), b.append(p.T @ t)
        return torch.stack(a), torch.stack(b)

    ones = torch.ones(3, dtype=torch.float64)
    assert _choose_ridge(*halves(0.0), ones, 1e-6) == 1e-6  # exact targets: no shrinkage
    assert _choose_ridge(*halves(30.0), ones, 1e-6) >= 1e-2  # noise dominates: shrink


def test_weighting_must_be_known():
    with pytest.raises(ghostify.GhostifyError, match="weighting"):
        ghostify.convert(OneByOne(False), init="calib", calib_data=[torch.randn(2, 6, 4, 4)], weighting="bnn",
                         overrides={"conv": {}})


@pytest.mark.parametrize("init", ["copy", "calib"])
def test_fractional_ratio_converts_counts_and_round_trips(init, tmp_path):
    # 8 outputs at ratio 4/3: m = ceil(8 * 3 / 4) = 6 intrinsic filters, 2 ghosts
    torch.manual_seed(0)
    model = Planted().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    ghost = ghostify.convert(model, ratio=4 / 3, dw_size=1, init=init, cheap="dw", calib_data=data,
                             scatter=True).eval()
    g = ghost.get_submodule("conv")
    assert g.intrinsic_channels == 6 and g.cheap.num_ghosts == 2
    # planted: every ghost is a scaled copy of an intrinsic filter, so both inits reproduce it
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), model(x), rtol=1e-4, atol=1e-4)
    # MACs by hand: stem 3*6*9 + conv 6*6*9 (primary) + 6 (dw 1x1, one slot per intrinsic map), per position
    macs = ghostify.count(ghost, torch.zeros(1, 3, 12, 12)).macs
    assert macs == 144 * (3 * 6 * 9 + 6 * 6 * 9 + 6)
    path = tmp_path / "frac.safetensors"
    ghostify.save(ghost, path)
    back = ghostify.load(path, model=Planted()).eval()
    assert back.get_submodule("conv").ratio == pytest.approx(4 / 3)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ghost(x))


def test_fixed_order_mix_reaches_the_best_rank_m_error():
    """A layer whose channel order cannot move (fixed_order) keeps channels 0..3 as its intrinsic
    maps, yet its mix fit is still the best rank-4 map: here channels 0-3 are weak (0.1 x) and
    4-7 carry the signal, so regressing 4-7 on a refit of 0-3 (the old fixed-order path) loses
    almost everything, while the rank-4 map loses only the tail of the spectrum."""
    from ghostify.init.calib import fit_layer

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 1)
    with torch.no_grad():
        conv.weight[:4] *= 0.1
    ghost = GhostConv2d.from_conv(conv, 2, 1, "mix", cheap_bias=True)
    xs = [torch.randn(4, 6, 5, 5) for _ in range(3)]
    with torch.no_grad():
        ys = [conv(x) for x in xs]
        fit_layer(conv, ghost, xs, ys, positions=25, ridge=1e-10, fixed_order=True)
        yg = torch.cat([ghost(x) for x in xs]).permute(0, 2, 3, 1).reshape(-1, 8).double()
    y = torch.cat(ys).permute(0, 2, 3, 1).reshape(-1, 8).double()
    centred = y - y.mean(0)
    best = (torch.linalg.eigvalsh(centred.T @ centred)[:4].sum() / (y**2).sum()).sqrt().item()
    assert ((yg - y).norm() / y.norm()).item() == pytest.approx(best, rel=1e-3)
    assert best < 0.1
    assert ghost.channel_map.tolist() == list(range(8))  # the order stayed


@pytest.mark.parametrize("bias", [True, False])
def test_mix_from_the_normal_equations_equals_the_fit_on_the_intrinsic_maps(bias):
    # The mix is fitted from the patches' normal equations projected on the intrinsic filters; that must be
    # the ridge least-squares fit of the ghost channels on the intrinsic maps themselves (all positions here).
    from ghostify.init.calib import fit_layer
    from ghostify.init.fitting import ridge_solve

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=bias)
    ghost = GhostConv2d.from_conv(conv, 2, 1, "mix", cheap_bias=True)
    xs = [torch.randn(4, 4, 32, 32) for _ in range(2)]
    ys = [conv(x).detach() + 0.1 * torch.randn(4, 8, 32, 32) for x in xs]  # not exactly rank 4
    with torch.no_grad():
        fit_layer(conv, ghost, xs, ys, positions=32 * 32)
        intrinsic, slots = ghost.channel_map[:4].tolist(), ghost.channel_map[4:].tolist()
        z = torch.cat([ghost.primary(x).double().permute(0, 2, 3, 1).reshape(-1, 4) for x in xs])
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
        t = torch.cat([y.double().permute(0, 2, 3, 1).reshape(-1, 8) for y in ys])[:, slots]
        expected = z @ ridge_solve(z.T @ z, z.T @ t, 1e-6)
        got = torch.cat([ghost(x).double().permute(0, 2, 3, 1).reshape(-1, 8) for x in xs])[:, slots]
    assert sorted(intrinsic + slots) == list(range(8))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_calib_augment_fits_on_the_images_and_their_augmented_views_interleaved(chain_net):
    from ghostify.augment import augmented_views

    torch.manual_seed(0)
    images = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    views = augmented_views(images, 24, batch_size=8)
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 3  # 24 views of 16 images: a second epoch
    torch.testing.assert_close(augmented_views(images, 24, batch_size=8)[2], views[2])  # seeded
    assert not any(torch.equal(v, x) for v in torch.cat(views) for x in torch.cat(images))
    kw = dict(ratio=2, init="calib")
    with_views = ghostify.convert(chain_net, calib_data=images, calib_augment=24, **kw)
    by_hand = ghostify.convert(chain_net, calib_data=[views[0], images[0], views[1], images[1], views[2]], **kw)
    without = ghostify.convert(chain_net, calib_data=images, **kw)
    for (name, p), q, r in zip(with_views.named_parameters(), by_hand.parameters(), without.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert any(not torch.equal(p, r) for p, r in zip(with_views.parameters(), without.parameters()))
    from ghostify.init.calib import calibration_batches

    with pytest.raises(ghostify.GhostifyError, match=r"\(N, C, H, W\) batches; .* \(8, 5\): leave calib_augment"):
        calibration_batches([torch.randn(8, 5)], augment=4)
