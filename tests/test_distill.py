"""Few-shot distillation (ghostify.distill, ghostify distill): it lowers the KL to the teacher on held-out inputs,
resumes exactly, writes a model that loads back, refuses to overwrite; the augmentations keep shapes and mix
convexly."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import cli
from ghostify.errors import GhostifyError
from ghostify.reference import resnet20
from ghostify.augment import AugmentConfig, augmentation, cutmix, mixup, random_resized_crop
from ghostify.train.distill import distill_dataset
from ghostify.train.loss import GhostLayerOutputs

from conftest import ChainNet

NO_AUG = AugmentConfig(crop_scale=1.0, flip=False, jitter=0.0, mix=0.0)


def _pair():
    """A ChainNet with sharp logits and its ratio-2 copy-init conversion (which disagrees with it)."""
    torch.manual_seed(1)
    net = ChainNet().eval()
    with torch.no_grad():
        net.fc.weight.mul_(8)
    return net, ghostify.convert(net, ratio=2, init="copy")


def test_distill_lowers_the_kl_to_the_teacher_on_held_out_inputs():
    net, ghost = _pair()
    train, held = torch.randn(64, 3, 12, 12), [torch.randn(64, 3, 12, 12)]
    before = ghostify.evaluate(ghost, held, baseline=net, progress=False)["kl"]
    fixed = ghostify.distill(ghost, net, train, steps=40, batch_size=16, lr=1e-2, augment={"mix": 0.5},
                             progress=False)
    after = ghostify.evaluate(fixed, held, baseline=net, progress=False)["kl"]
    assert after < 0.5 * before, (before, after)
    assert ghostify.evaluate(ghost, held, baseline=net, progress=False)["kl"] == before  # the student is untouched
    assert not fixed.training and not fixed._forward_hooks and not fixed.get_submodule("conv1")._forward_hooks


def test_resume_gives_the_weights_of_the_uninterrupted_run(tmp_path):
    net, ghost = _pair()
    data = torch.randn(48, 3, 12, 12)
    opts = dict(steps=10, batch_size=8, lr=1e-2, checkpoint_every=2, seed=5, progress=False)
    full = ghostify.distill(ghost, net, data, run_dir=tmp_path / "full", **opts)

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 5:  # checkpoints at 2, 4: step 5 is lost
            raise Killed

    with pytest.raises(Killed):
        ghostify.distill(ghost, net, data, run_dir=tmp_path / "cut", on_step=kill, **opts)
    resumed = ghostify.distill(ghost, net, data, resume=tmp_path / "cut" / "last.ckpt", **opts)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(GhostifyError, match=r"with its own settings; these differ: optim.lr"):
        ghostify.distill(ghost, net, data, resume=tmp_path / "cut" / "last.ckpt", **{**opts, "lr": 0.5})


def test_a_teacher_without_the_ghost_layers_convs_is_refused_with_the_fix():
    net, ghost = _pair()
    with pytest.raises(GhostifyError, match=r"teacher has no conv 'conv1'.*feature_weight=0"):
        ghostify.distill(ghost, torch.nn.Sequential(), torch.randn(16, 3, 12, 12), steps=1, progress=False)
    with pytest.raises(GhostifyError, match=r"teacher has no conv 'conv1'"):
        GhostLayerOutputs(ghost, torch.nn.Sequential())
    assert not any(m._forward_hooks for m in ghost.modules())  # the hooks set before the refusal are gone
    with GhostLayerOutputs(ghost, net) as outs, pytest.raises(GhostifyError, match="run the student and the teacher"):
        outs.loss()


def test_cli_writes_a_model_that_loads_back_and_refuses_to_overwrite(tmp_path):
    torch.manual_seed(0)
    net = resnet20().eval()
    torch.save(net.state_dict(), tmp_path / "r20.pt")
    ghostify.save(ghostify.convert(net, ratio=2, init="copy"), tmp_path / "ghost.safetensors")
    out = tmp_path / "fixed.safetensors"
    args = ["distill", str(tmp_path / "ghost.safetensors"), "--teacher", "ghostify.reference:resnet20", "--teacher-weights",
            str(tmp_path / "r20.pt"), "--data", "mnist-sample", "--limit", "32", "--steps", "3", "--batch-size", "8",
            "--val-data", "mnist-sample:heldout", "--val-limit", "16", "--no-progress", "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    fixed = ghostify.load(out)
    state = fixed.state_dict()
    assert (tmp_path / "fixed.run" / "last.ckpt").is_file()
    assert '"agree_top1"' in (tmp_path / "fixed.run" / "report.json").read_text()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fixed(x), ghostify.load(tmp_path / "fixed.run" / "final.safetensors")(x))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and "exists; pass --force" in res.output
    assert all(torch.equal(v, ghostify.load(out).state_dict()[k]) for k, v in state.items())


def test_augmentations_keep_shapes_and_are_seeded_per_example():
    x = torch.randn(3, 20, 24)
    assert random_resized_crop(x, 0.3).shape == x.shape
    assert augmentation(AugmentConfig(), size=16)(x).shape == (3, 16, 16)
    ds = distill_dataset(torch.randn(10, 3, 20, 20), augment=AugmentConfig(mix=1.0), seed=3)
    assert ds[4][0].shape == (3, 20, 20) and torch.equal(ds[4][0], ds[4][0])
    ds.set_epoch(1)
    assert not torch.equal(ds[4][0], distill_dataset(torch.randn(10, 3, 20, 20), augment=AugmentConfig(mix=1.0),
                                                     seed=3)[4][0])


def test_mixing_is_a_convex_combination_of_two_examples():
    a, b = torch.randn(2, 6, 6), torch.randn(2, 6, 6)
    torch.testing.assert_close(mixup(a, b, 0.3), 0.3 * a + 0.7 * b)
    cut = cutmix(a, b, 0.5)
    from_b = (cut == b) & (cut != a)
    assert torch.all((cut == a) | (cut == b)) and 0 < from_b[0].sum() < 36
    base = torch.randn(5, 2, 6, 6)
    ds = distill_dataset(base, augment=AugmentConfig(crop_scale=1.0, flip=False, jitter=0.0, mix=1.0, cutmix=0.5))
    for i in range(len(base)):
        out, a = ds[i][0], base[i]
        ok = False
        for j in range(len(base)):
            d = a - base[j]
            if j == i:
                continue
            lam = float((out - base[j]).flatten() @ d.flatten() / d.pow(2).sum())  # least-squares mixup weight
            ok |= 0 <= lam <= 1 and torch.allclose(out, lam * a + (1 - lam) * base[j], atol=1e-5)
            ok |= bool(torch.all((out == a) | (out == base[j])))  # cutmix: every value from one of the two
        assert ok, i
    plain = distill_dataset(base, augment=NO_AUG)
    assert all(torch.equal(plain[i][0], base[i]) for i in range(len(base)))
