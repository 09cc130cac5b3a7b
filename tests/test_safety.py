"""Safety: no file runs code, no command loses a user's data, nothing hangs, no result is silently wrong.

Each test stands for one defect of issue 11 (the number in its docstring) and fails without its fix.
Files that would run code carry a command that creates a canary file; the canary must never exist.
"""
from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from torch import nn
from torch.testing import assert_close

import ghostify
from ghostify import GhostifyError
from ghostify.cli import cli
from ghostify.train.run import RUN_MARKER, finetune
from ghostify.train.recipe import from_dict, to_dict

REPO = Path(__file__).resolve().parent.parent


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- crafted files ---------------------------------------------------------------------------------


class _RunsCommand:
    """Pickles as ``os.system(command)``: what a malicious .pt/.ckpt file does when unpickled."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "CANARY"
    yield path
    assert not path.exists(), "a file made ghostify run the code it names"


def r20_ghost_file(folder: Path) -> Path:
    """A real converted model whose architecture is one of ghostify's own builders (loads without trust)."""
    model = ghostify.get_model("ghostify.reference:resnet20", weights="none")
    return ghostify.save(ghostify.convert(model), folder / "r20-ghost.safetensors")


def rewrite_meta(src: Path, dst: Path, edit) -> Path:
    state = safetensors.torch.load_file(str(src))
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["ghostify"])
    edit(meta)
    safetensors.torch.save_file(state, str(dst), metadata={"ghostify": json.dumps(meta)})
    return dst


@pytest.fixture
def evil_safetensors(tmp_path, canary):
    def edit(meta):
        meta["arch"] = {"kind": "callable", "target": "os:system", "kwargs": {"command": f"touch {canary}"},
                        "name": "net"}

    return rewrite_meta(r20_ghost_file(tmp_path), tmp_path / "evil.safetensors", edit)


@pytest.fixture
def evil_pickle(tmp_path, canary):
    path = tmp_path / "evil.pt"
    torch.save({"arch": {"kind": "torchvision", "name": "resnet18"}, "state_dict": _RunsCommand(f"touch {canary}")},
               path)
    return path


def fake_cifar(root: Path, n_train=40, n_test=16) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3 * 32 * 32)).astype(np.uint8),
                b"labels": rng.integers(0, 10, n).tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    return root


def tiny_recipe(root: Path, **model) -> dict:
    """A fine-tuning recipe that runs in seconds: ResNet-20 on a fake CIFAR-10, one step."""
    return {"name": "tiny", "model": {"name": "ghostify.reference:resnet20", "weights": "none",
                                      "kwargs": {"in_channels": 3}, **model},
            "data": {"train": "cifar10:{root}", "val": "cifar10:{root}", "root": str(root), "val_limit": 16},
            "conversion": {"init": "copy"}, "train": {"steps": 1, "batch_size": 8, "log_every": 1}}


def checkpoint_naming(tmp_path, recipe: dict, step: int = 1) -> Path:
    """A well-formed fine-tuning checkpoint (loads with weights_only=True) carrying ``recipe``."""
    run = tmp_path / "stolen-run"
    run.mkdir(exist_ok=True)
    ckpt = {"format": "ghostify-finetune/1", "step": step, "recipe": to_dict(from_dict(recipe)), "model": {},
            "optimizer": {}, "scheduler": {}, "scaler": {}, "ema": None, "rng": {}, "best": None, "pre": {},
            "history": [], "train_seconds": 0.0, "world_size": 1, "loss_sums": [0.0] * 4}
    torch.save(ckpt, run / "last.ckpt")
    return run / "last.ckpt"


# -- 1. safetensors metadata runs no code ----------------------------------------------------------


def test_1_crafted_safetensors_runs_nothing_through_the_api(evil_safetensors, canary):
    for load in (ghostify.load, ghostify.get_model):
        with pytest.raises(GhostifyError, match=r"names the architecture 'os:system', which is code.*--trust-code"):
            load(str(evil_safetensors))


def _commands(model, good, tmp_path):
    data = ["--data", "photos:heldout", "--limit", "4"]
    return {
        "eval": ["eval", model, *data],
        "eval --baseline": ["eval", "ghostify.reference:resnet20", "--weights", "none", *data, "--baseline", model],
        "report": ["report", model],
        "report --baseline": ["report", good, "--baseline", model],
        "convert": ["convert", model],
        "inspect": ["inspect", model],
        "sweep": ["sweep", model, "--eval", "photos:heldout", "-o", tmp_path / "sw"],
        "sensitivity": ["sensitivity", model, "--init", "copy", "--eval", "photos:heldout"],
        "distill": ["distill", model, "--teacher", "ghostify.reference:resnet20", *data, "-o", tmp_path / "d.safetensors"],
        "distill --teacher": ["distill", good, "--teacher", model, *data, "-o", tmp_path / "d.safetensors"],
    }


@pytest.mark.parametrize("command", ["eval", "eval --baseline", "report", "report --baseline", "convert", "inspect",
                                     "sweep", "sensitivity", "distill", "distill --teacher"])
def test_1_crafted_safetensors_runs_nothing_through_the_cli(evil_safetensors, canary, tmp_path, command):
    good = r20_ghost_file(tmp_path / "good")
    one_line_error(run(*_commands(evil_safetensors, good, tmp_path)[command]), "os:system", "--trust-code")


def test_1_crafted_safetensors_runs_nothing_through_finetune(evil_safetensors, canary, tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    with pytest.raises(GhostifyError, match="os:system"):
        finetune(from_dict(tiny_recipe(root)), overrides=[f"model.name={evil_safetensors}"],
                 output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    # a resumed run's recipe is read from its checkpoint: a module:callable there is code from a file
    bad = tiny_recipe(root, name="os:system", kwargs={"command": f"touch {canary}"})
    res = run("finetune", "--resume", checkpoint_naming(tmp_path, bad), "--no-progress")
    one_line_error(res, "os:system", "--trust-code")
    # ... and so is the run's init.safetensors
    ckpt = checkpoint_naming(tmp_path, tiny_recipe(root))
    (ckpt.parent / "init.safetensors").write_bytes(evil_safetensors.read_bytes())
    one_line_error(run("finetune", "--resume", ckpt, "--no-progress"), "os:system", "--trust-code")


def test_1_callable_architectures_load_when_the_caller_says_so(tmp_path, chain_net, net_classes):
    ghost = ghostify.convert(chain_net)
    path = ghostify.save(ghost, tmp_path / "g.safetensors", arch="conftest:ChainNet")
    with pytest.raises(GhostifyError, match="conftest:ChainNet"):
        ghostify.load(path)
    x = torch.randn(2, 3, 8, 8)
    for loaded in (ghostify.load(path, trust_code=True), ghostify.load(path, arch=net_classes["ChainNet"]),
                   ghostify.load(path, arch="conftest:ChainNet"), ghostify.get_model(str(path), trust_code=True)):
        assert_close(loaded(x), ghost(x), rtol=0, atol=0)
    res = run("report", path, "--trust-code", "--input-size", "3,8,8")
    assert res.exit_code == 0, res.output
    # ghostify's own builders and torchvision names need no trust: the shipped checkpoints load as they are
    assert ghostify.get_model(str(REPO / "checkpoints" / "resnet20_mnist.pt")).ghostify_arch["target"] == \
        "ghostify.reference:resnet20"


def test_1_config_type_names_import_nothing(tmp_path, canary, monkeypatch):
    (tmp_path / "planted.py").write_text(f"open({str(canary)!r}, 'w').close()\nclass Block: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = {"global": {"ratio": 2}, "type": [["planted.Block", None]]}
    with pytest.raises(GhostifyError, match="planted.Block"):
        ghostify.GhostConfig.from_dict(d)
    assert "planted" not in sys.modules
    cfg = ghostify.GhostConfig.from_dict({"type": [["torch.nn.modules.conv.Conv2d", {"ratio": 4}]]})
    assert cfg.by_type == [(nn.Conv2d, {"ratio": 4})]


# -- 2. pickles run no code ------------------------------------------------------------------------


def test_2_crafted_pickle_runs_nothing_through_the_api(evil_pickle, canary):
    with pytest.raises(GhostifyError, match=r"pickled Python objects.*state dict.*ghostify.save.*--trust-code"):
        ghostify.get_model(str(evil_pickle))


@pytest.mark.parametrize("command", ["eval", "eval --baseline", "report --baseline", "convert", "inspect", "sweep",
                                     "sensitivity", "distill --teacher"])
def test_2_crafted_pickle_runs_nothing_through_the_cli(evil_pickle, canary, tmp_path, command):
    good = r20_ghost_file(tmp_path / "good")
    one_line_error(run(*_commands(evil_pickle, good, tmp_path)[command]), "pickled Python objects", "--trust-code")


def test_2_crafted_pickle_runs_nothing_through_finetune(evil_pickle, canary, tmp_path):
    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(fake_cifar(tmp_path / "cifar"))))
    res = run("finetune", recipe, "--set", f"model.name={evil_pickle}", "-o", tmp_path / "run", "--no-progress")
    one_line_error(res, "pickled Python objects")
    assert not (tmp_path / "run").exists()
    ckpt = tmp_path / "last.ckpt"
    torch.save(_RunsCommand(f"touch {canary}"), ckpt)
    one_line_error(run("finetune", "--resume", ckpt), "pickled Python objects")


def test_2_crafted_cifar_batch_runs_nothing(tmp_path, canary):
    from ghostify.train.run import build_dataset

    root = fake_cifar(tmp_path / "cifar")
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(_RunsCommand(f"touch {canary}")))
    with pytest.raises(GhostifyError, match="not a CIFAR-10 batch file"):
        build_dataset(f"cifar10:{root}", split="val", augment=False)
    assert len(build_dataset(f"cifar10:{root}", split="train", augment=False)) == 40  # real batches still read


def test_2_whole_pickled_model_needs_trust(tmp_path):
    net = ghostify.get_model("ghostify.reference:resnet20", weights="none")
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(GhostifyError, match="torch.save\\(model.state_dict\\(\\)\\).*--trust-code"):
        ghostify.get_model(str(tmp_path / "whole.pt"))
    x = torch.randn(1, 1, 28, 28)
    assert_close(ghostify.get_model(str(tmp_path / "whole.pt"), trust_code=True)(x), net(x))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-step run (shared: the tests only read it or resume it to its end)."""
    tmp = tmp_path_factory.mktemp("tiny")
    return finetune(from_dict(tiny_recipe(fake_cifar(tmp / "cifar"))), output_dir=tmp / "run", progress=False).run_dir


def test_2_checkpoints_hold_only_data(tiny_run):
    """A fine-tuning checkpoint loads with weights_only=True (RNG states as tensors): resume needs no pickle."""
    ckpt = torch.load(tiny_run / "last.ckpt", weights_only=True)
    assert ckpt["step"] == 1 and isinstance(ckpt["rng"]["numpy"][1], torch.Tensor)


# -- 3, 4, 11. --force replaces only a ghostify run, and only once the new one has started ----------


def test_3_force_never_deletes_a_project_folder(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "thesis.tex").write_text("years of work")
    (proj / "recipe.yaml").write_text("name: mine\n")
    before = sorted(p.relative_to(proj) for p in proj.rglob("*"))
    monkeypatch.chdir(proj)
    one_line_error(run("finetune", "recipe.yaml", "-o", ".", "--force"), "current folder")
    one_line_error(run("finetune", "recipe.yaml", "-o", "src/..", "--force"), "current folder")
    monkeypatch.chdir(proj / "src")
    one_line_error(run("finetune", "../recipe.yaml", "-o", "..", "--force"), "parent of the current folder")
    monkeypatch.chdir(tmp_path)
    one_line_error(run("finetune", "proj/recipe.yaml", "-o", "proj", "--force"), "holding the recipe")
    one_line_error(run("finetune", "proj/recipe.yaml", "-o", "/", "--force"), "root")
    monkeypatch.setenv("HOME", str(proj))
    one_line_error(run("finetune", "proj/recipe.yaml", "-o", str(proj), "--force"), "home folder")
    # a folder holding a recipe.yaml is not a run: only ghostify's marker makes one
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "recipe.yaml").write_text("name: x\n")
    one_line_error(run("finetune", "proj/recipe.yaml", "-o", "other", "--force"), "not a ghostify run")
    assert sorted(p.relative_to(proj) for p in proj.rglob("*")) == before
    assert (tmp_path / "other" / "recipe.yaml").read_text() == "name: x\n"


def test_4_force_validates_before_replacing_and_11_a_failed_set_up_leaves_nothing(tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    keep = tmp_path / "runs" / "keep"
    first = finetune(from_dict(tiny_recipe(root)), output_dir=keep, progress=False)
    assert first.run_dir == keep and json.loads((keep / RUN_MARKER).read_text())["run_id"]
    before = {p.name: p.read_bytes() for p in keep.iterdir() if p.is_file()}
    for bad in ("model.name=typo_model", f"model.weights={tmp_path / 'missing.pt'}", "data.root=/nonexistent"):
        with pytest.raises(GhostifyError):
            finetune(from_dict(tiny_recipe(root)), overrides=[bad], output_dir=keep, force=True, progress=False)
        assert {p.name: p.read_bytes() for p in keep.iterdir() if p.is_file()} == before, bad
        assert sorted(p.name for p in keep.parent.iterdir()) == ["keep"], bad  # no half-made sibling either
    # a new run whose set-up fails leaves no folder, so the rerun is not blocked
    with pytest.raises(GhostifyError):
        finetune(from_dict(tiny_recipe(root)), overrides=["model.name=typo_model"], output_dir=tmp_path / "new",
                 progress=False)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))
    finetune(from_dict(tiny_recipe(root)), overrides=["seed=5"], output_dir=keep, force=True, progress=False)
    assert "seed: 5" in (keep / "recipe.yaml").read_text()
    assert sorted(p.name for p in keep.parent.iterdir()) == ["keep"]
    # 11: every file of a run has the permissions of an ordinary new file, like a saved model
    plain = tmp_path / "plain"
    plain.write_text("x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in keep.iterdir()}
    assert set(modes.values()) == {stat.S_IMODE(plain.stat().st_mode)}, modes


def test_4_an_interrupted_replacement_is_undone(tmp_path):
    """Killed between moving the old run aside and putting the new one in place: the next start restores it."""
    old = tmp_path / ".keep.ghostify-old"
    old.mkdir()
    (old / RUN_MARKER).write_text('{"run_id": "1f"}')
    (old / "final.safetensors").write_bytes(b"the model")
    with pytest.raises(GhostifyError, match="exists and is not empty"):
        finetune(from_dict({}), output_dir=tmp_path / "keep", progress=False)
    assert (tmp_path / "keep" / "final.safetensors").read_bytes() == b"the model" and not old.exists()


# -- 5. NaN, Inf and huge weights ------------------------------------------------------------------


def convert_in_a_child(prepare: str) -> str:
    """Convert a ChainNet ``net`` after running ``prepare`` on it, in a child process with a time limit (a hang
    fails the test instead of stalling the suite). Prints ``ok FINITE`` or ``error SECONDS MESSAGE``."""
    script = ("import time, torch, ghostify, sys\n"
              f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "from conftest import ChainNet\n"
              "net = ChainNet().eval()\n" + prepare +
              "convert = ghostify.convert  # imported first: the time is the call's\n"
              "t = time.perf_counter()\n"
              "try:\n"
              "    g = convert(net)\n"
              "    print('ok', bool(torch.isfinite(g.get_submodule('conv1').cheap.conv.weight).all()))\n"
              "except ghostify.GhostifyError as e:\n"
              "    print(f'error {time.perf_counter() - t:.3f}', e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.stdout.strip() + out.stderr[-2000:]


def test_5_nan_weights_error_at_once_naming_the_layer():
    out = convert_in_a_child("torch.nn.init.constant_(net.conv2.weight, float('nan'))\n")
    _, seconds, message = out.split(" ", 2)
    assert "layer 'conv2'" in message and "NaN or Inf" in message
    assert float(seconds) < 1.0


@pytest.mark.parametrize("scale,dtype,expected", [("1e30", "float32", "ok True"),
                                                  ("1e200", "float64", "error")])
def test_5_huge_weights_convert_or_error_but_never_hang(scale, dtype, expected):
    out = convert_in_a_child(f"net = net.to(torch.{dtype})\ntorch.nn.init.constant_(net.conv1.weight, {scale})\n"
                             "torch.nn.init.normal_(net.conv1.weight[:8], std=float(net.conv1.weight[0, 0, 0, 0]))\n")
    assert out.startswith(expected), out
    assert expected == "ok True" or ("layer 'conv1'" in out and "too large" in out)


def test_5_select_intrinsic_terminates_on_nan():
    from ghostify.init.fitting import select_intrinsic

    gram = torch.full((16, 16), float("nan"))
    script = ("import torch; from ghostify.init.fitting import select_intrinsic; "
              "print(sorted(select_intrinsic(torch.full((16, 16), float('nan')), 8)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert len(json.loads(out.stdout)) == 8 and len(set(json.loads(out.stdout))) == 8
    assert len(select_intrinsic(gram[:4, :4].nan_to_num(1.0), 2)) == 2


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "loss.temperature=-.inf",
                                      "optim.betas=[0.9, .nan]"])
def test_5_recipes_reject_non_finite_numbers(override):
    with pytest.raises(GhostifyError, match="finite"):
        from_dict({}, [override])


# -- 6, 7. outputs: checked first, written atomically, never over a file without --force ------------


def test_6_save_plan_without_a_budget_writes_the_plan_and_the_model(tmp_path):
    plan, out = tmp_path / "plan.json", tmp_path / "g.safetensors"
    res = run("convert", "conftest:ChainNet", "--weights", "none", "--input-size", "3,8,8", "--save-plan", plan,
              "-o", out)
    assert res.exit_code == 0, res.output
    assert [e["name"] for e in json.loads(plan.read_text())["entries"]] == ["stem", "conv1", "conv2"]
    assert ghostify.load(out, arch="conftest:ChainNet").ghostify_info.plan.to_dict() == json.loads(plan.read_text())


def _fifo(tmp_path):
    path = tmp_path / "device"
    os.mkfifo(path)
    return path


def test_7_no_output_is_overwritten_without_force(tmp_path):
    chain = ["conftest:ChainNet", "--weights", "none", "--input-size", "3,8,8"]
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    one_line_error(run("convert", *chain, "--save-plan", taken), "exists", "--force")
    sens = ["sensitivity", *chain, "--init", "copy", "--eval", "photos:heldout", "--eval-limit", "4"]
    one_line_error(run(*sens, "-o", taken), "exists", "--force")
    one_line_error(run(*sens, "--plot", taken), "exists", "--force")
    assert taken.read_text() == "mine"
    res = run(*sens, "-o", taken, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads(taken.read_text())["method"] == "alone"
    # a folder that holds other files is not a sweep folder
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "summary.md").write_text("my notes")
    one_line_error(run("sweep", *chain, "--eval", "photos:heldout", "-o", folder), "no sweep")
    assert [p.name for p in folder.iterdir()] == ["summary.md"] and (folder / "summary.md").read_text() == "my notes"


def test_11_a_model_output_must_be_named_safetensors(tmp_path):
    """``-o x.pt`` would hold a safetensors file that nothing reads back as .pt: refused, nothing written."""
    chain = ["conftest:ChainNet", "--weights", "none", "--input-size", "3,8,8"]
    one_line_error(run("convert", *chain, "-o", tmp_path / "x.pt"), ".safetensors")
    assert list(tmp_path.iterdir()) == []
    assert run("convert", *chain, "-o", tmp_path / "x.safetensors").exit_code == 0
    assert isinstance(ghostify.load(tmp_path / "x.safetensors", trust_code=True), nn.Module)


def test_7_non_regular_files_are_refused_even_with_force(tmp_path):
    fifo = _fifo(tmp_path)
    chain = ["conftest:ChainNet", "--weights", "none", "--input-size", "3,8,8"]
    for args in (["-o", fifo], ["--save-plan", fifo]):
        one_line_error(run("convert", *chain, *args, "--force"), "not a regular file")
    with pytest.raises(GhostifyError, match="not a regular file"):
        ghostify.save(ghostify.convert(ghostify.get_model("conftest:ChainNet", weights="none")), fifo, force=True)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_7_outputs_are_checked_before_the_work(tmp_path, monkeypatch):
    import ghostify.conversion.rewrite

    def must_not_run(*a, **k):
        raise AssertionError("the conversion ran before the output was checked")

    monkeypatch.setattr(ghostify.conversion.rewrite, "convert", must_not_run)
    (tmp_path / "file").write_text("x")
    chain = ["conftest:ChainNet", "--weights", "none", "--input-size", "3,8,8"]
    one_line_error(run("convert", *chain, "-o", tmp_path / "file" / "g.safetensors"), "is not a folder")
    one_line_error(run("convert", *chain, "-o", tmp_path / "g.pt"), ".safetensors")
    one_line_error(run("convert", *chain, "-o", ""), "empty")
    one_line_error(run("convert", *chain, "--save-plan", tmp_path / "file" / "p.json"), "is not a folder")


def test_7_one_atomic_writer_and_stale_temps_are_removed(tmp_path, chain_net):
    """11: a killed save's temp file (its writer is gone) is removed by the next save of that name."""
    import ast

    writers = []
    for path in sorted((REPO / "ghostify").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("mkstemp", "replace") and \
                    getattr(node.value, "id", None) in ("tempfile", "os"):
                writers.append(path.name)
    assert set(writers) == {"outputs.py"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.safetensors.{dead.pid}.x1y2.tmp"
    stale.write_bytes(b"\0" * 1024)
    live = tmp_path / f".m.safetensors.{os.getppid()}.a1b2.tmp"  # a writer that is still running: left alone
    live.write_bytes(b"partial")
    ghostify.save(ghostify.convert(chain_net), tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", live.name])


# -- 8. silent wrong results -----------------------------------------------------------------------


def test_8_sweep_resume_checks_the_weights(tmp_path, net_classes):
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(tmp_path / f"w{seed}.pt")
        torch.save(net_classes["ChainNet"]().state_dict(), files[-1])
    out = tmp_path / "sw"
    args = ["sweep", "conftest:ChainNet", "--input-size", "3,16,16", "--ratios", "2", "--eval", "photos:heldout",
            "--eval-limit", "4", "-o", out]
    assert run(*args, "--weights", files[0]).exit_code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    files[0].write_bytes(files[1].read_bytes())  # same path, other weights
    one_line_error(run(*args, "--weights", files[0]), "another weights_digest")
    one_line_error(run(*args, "--weights", files[1]), "another weights")
    one_line_error(run(*args, "--weights", files[1], "--repeats", "3"), "another")
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_8_report_baseline_must_be_the_original(tmp_path):
    import torchvision

    path = ghostify.save(ghostify.convert(torchvision.models.resnet18()), tmp_path / "r18.safetensors")
    one_line_error(run("report", path, "--baseline", "vgg11", "--baseline-weights", "none", "--input-size", "64"),
                   "not the model", "converted from")
    res = run("report", path, "--baseline", "resnet18", "--baseline-weights", "none", "--input-size", "64")
    assert res.exit_code == 0, res.output


def test_8_a_plan_from_another_model_or_an_empty_plan_is_refused(tmp_path):
    chain = ["--weights", "none", "--input-size", "3,16,16"]
    plan = tmp_path / "plan.json"
    assert run("convert", "conftest:ResidualNet", *chain, "--save-plan", plan).exit_code == 0
    one_line_error(run("convert", "conftest:ChainNet", *chain, "--plan", plan), "made for another model")
    plan.write_text(json.dumps({"entries": []}))
    one_line_error(run("convert", "conftest:ChainNet", *chain, "--plan", plan), "empty")
    with pytest.raises(GhostifyError, match="make the plan from this model"):
        ghostify.convert(ghostify.get_model("conftest:ChainNet", weights="none"),
                         plan=ghostify.make_plan(ghostify.get_model("conftest:BlocksNet", weights="none")))


def test_8_resume_refuses_changes_it_would_ignore(tmp_path, tiny_run):
    ckpt = tiny_run / "last.ckpt"
    one_line_error(run("finetune", "--resume", ckpt, "--set", "optim.lr=0.5"), "cannot change optim.lr")
    one_line_error(run("finetune", "--resume", ckpt, "-o", tmp_path / "elsewhere"), "cannot change the run folder")
    res = run("finetune", "--resume", ckpt, "-o", tiny_run, "--set", "optim.lr=0.01", "--no-progress")
    assert res.exit_code == 0, res.output  # repeating what the run uses is fine


@pytest.mark.parametrize("attach", ["hook", "pre_hook", "spectral_norm", "parametrization"])
def test_8_hooks_and_parametrizations_are_not_dropped_silently(chain_net, attach):
    conv = chain_net.conv1
    if attach == "hook":
        conv.register_forward_hook(lambda m, i, o: o * 2)
    elif attach == "pre_hook":
        conv.register_forward_pre_hook(lambda m, i: None)
    elif attach == "spectral_norm":
        nn.utils.spectral_norm(conv)
    else:
        nn.utils.parametrizations.weight_norm(conv)
    with pytest.raises(GhostifyError, match=r"layer 'conv1' has .* --exclude 'conv1'"):
        ghostify.convert(chain_net)
    assert len(ghostify.convert(chain_net, exclude=["conv1"]).ghostify_info.plan.converted) == 1


@pytest.mark.parametrize("tamper", [lambda f: f[:1], lambda f: f + ["stem"], lambda f: [], lambda f: f + f[:1]])
def test_8_a_tampered_folded_list_does_not_load(tmp_path, chain_net, tamper):
    path = ghostify.save(ghostify.convert(chain_net), tmp_path / "g.safetensors", arch="conftest:ChainNet")

    def edit(meta):
        assert meta["folded"] == ["conv1", "conv2"]
        meta["folded"] = tamper(meta["folded"])

    bad = rewrite_meta(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(GhostifyError, match="folded"):
        ghostify.load(bad, trust_code=True)


def test_8_json_never_holds_nan(tmp_path, net_classes):
    net = net_classes["ChainNet"]()
    with torch.no_grad():
        net.fc.bias.fill_(float("nan"))
    torch.save(net.state_dict(), tmp_path / "nan.pt")
    res = run("eval", "conftest:ChainNet", "--weights", tmp_path / "nan.pt", "--baseline", "conftest:ChainNet",
              "--baseline-weights", "none", "--data", "photos:heldout", "--limit", "4", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
    assert out["kl"] is None


CHAIN = ["conftest:ChainNet", "--weights", "none", "--input-size", "3,16,16"]


@pytest.mark.parametrize("args", [["report", "R20", "--batch-sizes", "0"], ["report", "R20", "--batch-sizes", "1,-2"],
                                  ["sweep", *CHAIN, "--eval", "photos:heldout", "--eval-limit", "2", "-o", "OUT",
                                   "--batch-sizes", "0"],
                                  ["sweep", *CHAIN, "--eval", "photos:heldout", "--eval-limit", "2", "-o", ""],
                                  ["sensitivity", *CHAIN, "--init", "copy", "--eval", "photos:heldout",
                                   "--eval-limit", "2", "-o", ""],
                                  ["convert", *CHAIN, "-o", ""], ["convert", *CHAIN, "--save-plan", ""],
                                  ["finetune", "RECIPE", "-o", ""]])
def test_8_zero_batch_sizes_and_empty_paths_are_refused(tmp_path, monkeypatch, args):
    import yaml

    monkeypatch.chdir(tmp_path)  # where a run or sweep that ignored the empty path would land
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe(fake_cifar(tmp_path / "cifar"))))
    subst = {"R20": r20_ghost_file(tmp_path / "r20"), "OUT": tmp_path / "out", "RECIPE": "tiny.yaml"}
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(run(*[subst.get(a, a) for a in args]))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- 9. a converted model is not converted again ---------------------------------------------------


def test_9_reconverting_is_refused_and_the_file_kept(tmp_path):
    path = r20_ghost_file(tmp_path)
    before = path.read_bytes()
    one_line_error(run("convert", path, "-o", tmp_path / "again.safetensors", "--input-size", "1,28,28"),
                   "already converted")
    one_line_error(run("convert", path, "-o", path, "--force", "--input-size", "1,28,28"), "already converted")
    assert path.read_bytes() == before and not (tmp_path / "again.safetensors").exists()


# -- 10. small calibration sets --------------------------------------------------------------------


def test_10_budgets_and_proxy_work_with_one_calibration_batch(chain_net, capsys):
    one_batch = [torch.randn(32, 3, 16, 16)]  # nothing left to hold out
    t = ghostify.sensitivity(chain_net, method="proxy", calib_data=one_batch, input_size=(1, 3, 16, 16),
                             progress=False)
    assert t.rows and all(r.loss == pytest.approx(r.metrics["calib_error"] ** 2) for r in t.rows)
    assert "no batch was held out" in capsys.readouterr().err
    # --target-macs with --calib-size <= 64: the CLI's one batch of 64 goes to the allocator
    alloc = ghostify.allocate(chain_net, target_macs=0.9, ratios=(2,), calib_data=[torch.randn(64, 3, 16, 16)],
                              input_size=(1, 3, 16, 16), progress=False)
    assert alloc.plan.converted


# -- 11. the smaller items -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../..", "a/b", "..", ""])
def test_11_recipe_name_cannot_escape_runs(name):
    with pytest.raises(GhostifyError, match="not a plain name"):
        from_dict({"name": name})


def test_11_a_tampered_plan_cannot_ask_for_huge_allocations(tmp_path):
    path = r20_ghost_file(tmp_path)

    def edit(meta):
        meta["plan"]["entries"][1]["spec"]["dw_size"] = 100001

    bad = rewrite_meta(path, tmp_path / "bad.safetensors", edit)
    t = time.perf_counter()
    with pytest.raises(GhostifyError, match="plan is corrupt"):
        ghostify.load(bad)
    assert time.perf_counter() - t < 30


@pytest.mark.parametrize("drop", ["folded", "plan"])
def test_11_corrupt_metadata_is_diagnosed_not_a_key_error(tmp_path, drop):
    bad = rewrite_meta(r20_ghost_file(tmp_path), tmp_path / "bad.safetensors", lambda meta: meta.pop(drop))
    one_line_error(run("report", bad), "corrupt ghostify metadata")


def test_11_incomplete_checkpoint_is_diagnosed(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"format": "ghostify-finetune/1", "step": 3}, ckpt)
    one_line_error(run("finetune", "--resume", ckpt), "incomplete or corrupt", "recipe")


# -- 12. dilated convs: the copy init's fit works on the kernel, not its dilated extent --------------


def _fit_dw_kernels_on_the_dilated_grid(w, parents, targets, d, stride, dilation):
    """The implementation before issue 11 (filters drawn on the dilated input grid), in float64."""
    import math

    import torch.nn.functional as F

    (sh, sw), (dh, dw_), r = tuple(stride), tuple(dilation), d // 2
    wd = w.detach().double()
    n, cin, kh, kw = wd.shape
    ph, pw = dh * (kh - 1) + 1, dw_ * (kw - 1) + 1
    g = len(parents)

    def on_grid(idx, pad_h, pad_w):
        out = wd.new_zeros(len(idx), cin, ph + 2 * pad_h, pw + 2 * pad_w)
        out[:, :, pad_h: pad_h + ph: dh, pad_w: pad_w + pw: dw_] = wd[idx]
        return out

    def correlate(big, small):
        out = F.conv2d(big.reshape(1, -1, *big.shape[-2:]), small, stride=(sh, sw), groups=len(small))
        return out.reshape(len(small), -1)

    rhs = correlate(on_grid(targets, sh * r, sw * r), on_grid(parents, 0, 0)).reshape(g, d * d, 1)
    uniq, inv = torch.unique(parents, return_inverse=True)
    auto = correlate(on_grid(uniq, sh * (d - 1), sw * (d - 1)), on_grid(uniq, 0, 0))
    auto = auto.reshape(len(uniq), 2 * d - 1, 2 * d - 1)
    vh, vw = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    vh, vw = vh.reshape(-1), vw.reshape(-1)
    gram = auto[:, vh[:, None] - vh[None, :] + d - 1, vw[:, None] - vw[None, :] + d - 1][inv]
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
    k = torch.linalg.solve(gram + ridge * torch.eye(d * d, dtype=gram.dtype), rhs)
    tt = (wd[targets] ** 2).sum()
    err = tt - 2 * (k * rhs).sum() + (k.transpose(1, 2) @ gram @ k).sum()
    return k.reshape(g, d, d), math.sqrt(max(err.item(), 0.0) / tt.item())


@pytest.mark.parametrize("kernel", [(3, 3), (2, 5)])
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
@pytest.mark.parametrize("dilation", [(1, 1), (3, 1), (4, 6), (12, 12)])
@pytest.mark.parametrize("d", [3, 5])
def test_12_the_undilated_fit_equals_the_dilated_one(kernel, stride, dilation, d):
    from ghostify.init.fitting import fit_dw_kernels

    w = torch.randn(10, 4, *kernel)
    parents, targets = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([5, 6, 7, 8, 9])
    want, want_res = _fit_dw_kernels_on_the_dilated_grid(w, parents, targets, d, stride, dilation)
    got, got_res = fit_dw_kernels(w, parents, targets, d, stride, dilation)
    assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 correlations against float64 ones
    assert got_res == pytest.approx(want_res, rel=1e-5, abs=1e-7)


def test_12_the_fit_does_not_grow_with_the_dilation():
    """At dilation 10^5 the filters drawn on the input grid would take terabytes; on the kernel grid nothing.

    There only the zero lag lies on the lattice, so each kernel is the scalar fit at its centre tap."""
    from ghostify.init.fitting import fit_dw_kernels

    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    parents, targets = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    k, _ = fit_dw_kernels(w, parents, targets, 3, (1, 1), (100_000, 100_000))
    p, t = w[parents].flatten(1), w[targets].flatten(1)
    want = torch.zeros(3, 3, 3, dtype=torch.float64)
    want[:, 1, 1] = (p * t).sum(1) / (p * p).sum(1)
    assert_close(k, want)


def test_12_dilated_convs_convert_exactly():
    """A dilated conv's Ghost layer keeps its intrinsic channels bit-exact (the fit only sets the ghosts)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=24, dilation=24))
    ghost = ghostify.convert(net.eval(), fold=False)
    layer = ghost.get_submodule("2")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out, ref = ghost(x), net(x)
    m = layer.intrinsic_channels
    assert_close(out[:, layer.channel_map[:m]], ref[:, layer.channel_map[:m]], rtol=1e-5, atol=1e-6)
