"""Recipes: YAML loading, --set overrides with type coercion, one-line errors for bad keys and values."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ghostify.cli import cli
from ghostify.errors import GhostifyError
from ghostify.train.recipe import REQUIRED, Recipe, apply_override, check_registries, from_dict, load_recipe, to_dict

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_all_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"mnist_resnet20_r2", "mnist_vgg_r2", "cifar10_resnet56_r2", "cifar10_vgg16_r2",
            "imagenet_resnet50_r2", "imagenet_resnet50_r4"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_loads_and_validates(path):
    cfg = load_recipe(path)
    assert cfg.name == path.stem
    assert from_dict(to_dict(cfg)) == cfg  # round-trips through a plain dict
    if cfg.model.weights == REQUIRED:  # a trained CIFAR checkpoint the user must name
        with pytest.raises(GhostifyError, match=r"model.weights.*--set model.weights=PATH"):
            check_registries(cfg)
        cfg = load_recipe(path, ["model.weights=r.pt"])
    check_registries(cfg)
    if "{root}" in cfg.data.train:
        with pytest.raises(GhostifyError, match=r"needs data.root: add --set data.root=PATH"):
            cfg.spec(cfg.data.train)
        assert "{root}" not in load_recipe(path, ["data.root=/d/"]).spec(cfg.data.train)


def test_overrides_coerce_to_field_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  name: adamw\n")
    cfg = load_recipe(path, ["train.batch_size=64", "train.epochs=2", "optim.lr=1e-3", "train.freeze_bn=yes",
                             "conversion.exclude=[layer1.*, fc]", "conversion.include=layer3.*",
                             "train.ema_decay=null", "train.ema_decay=0.999", "model.weights=none",
                             "conversion.overrides={'layer4.*': {ratio: 4}}", "data.val=null", "seed=7"])
    assert cfg.name == "r" and cfg.seed == 7
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 64 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.freeze_bn is True and cfg.train.ema_decay == 0.999
    assert cfg.conversion.exclude == ["layer1.*", "fc"] and cfg.conversion.include == ["layer3.*"]
    assert cfg.conversion.overrides == {"layer4.*": {"ratio": 4}}
    assert cfg.model.weights == "none" and cfg.data.val is None


def test_fractional_ratio_as_on_the_command_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("conversion:\n  ratio: 1.5\n  init: calib\n")
    c = load_recipe(path).conversion
    assert (c.ratio, c.init, c.cheap, c.dw_size) == (1.5, "calib", None, None)  # None: the init's default op
    two = apply_override(Recipe(), "conversion.ratio=2.0").conversion.ratio
    assert two == 2 and isinstance(two, int)  # as check_ratio gives it to convert


def test_recipe_conversion_resolves_the_cheap_op_like_convert(chain_net):
    import torch
    from torch.utils.data import TensorDataset

    from ghostify.train.session import convert_model as _convert

    calib = TensorDataset(torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long))

    def specs(*sets):
        ghost = _convert(from_dict({}, overrides=list(sets)), chain_net, calib)
        return {(e.spec.ratio, e.spec.init, e.spec.cheap, e.spec.dw_size) for e in ghost.ghostify_info.plan.converted}

    assert specs() == {(2, "copy", "dw", 3)}
    assert specs("conversion.init=calib", "conversion.ratio=1.5") == {(1.5, "calib", "mix", 1)}
    assert specs("conversion.init=calib", "conversion.cheap=dw") == {(2, "calib", "dw", 3)}  # explicit wins


def test_section_override_keeps_other_keys():
    cfg = apply_override(Recipe(), "optim={lr: 0.2}")
    assert cfg.optim.lr == 0.2 and cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9


@pytest.mark.parametrize("text, message", [
    ("train.epoch=2", r"unknown recipe key 'train.epoch' in section 'train' \(did you mean 'epochs'\?\); "
                      r"valid keys: epochs, steps, batch_size"),
    ("trian.epochs=2", r"unknown recipe key 'trian' at the top level \(did you mean 'train'\?\)"),
    ("train.batch_size=abc", r"recipe key 'train.batch_size': expected an integer, got 'abc'"),
    ("train.batch_size=1.5", r"expected an integer, got 1.5"),
    ("train.batch_size=0", r"'train.batch_size': must be >= 1, got 0"),
    ("optim.name=adam", r"'optim.name': 'adam' is not one of sgd, adamw"),
    ("schedule.name=linear", r"is not one of cosine, step, constant"),
    ("train.amp=fp8", r"is not one of auto, off, bf16, fp16"),
    ("conversion.dw_size=2", r"must be odd"),
    ("conversion.ratio=0.5", r"'conversion.ratio': must be a number >= 1 \(an integer, or a fraction > 1"),
    ("conversion.ratio=half", r"'conversion.ratio': expected a number, got 'half'"),
    ("loss.alpha=1.5", r"'loss.alpha': must be <= 1, got 1.5"),
    ("loss.temperature=0", r"'loss.temperature': must be > 0"),
    ("train.freeze_bn=maybe", r"'train.freeze_bn': expected true or false, got 'maybe'"),
    ("train.ema_decay=fast", r"expected a number or null, got 'fast'"),
    ("conversion.exclude={a: 1}", r"expected a list"),
    ("optim=3", r"'optim' is a section; set one of its keys"),
    ("optim.lr.x=3", r"'optim.lr' is a value, not a section"),
    ("epochs", r"--set 'epochs': expected KEY=VALUE"),
])
def test_bad_overrides_raise_one_line_errors(text, message):
    with pytest.raises(GhostifyError, match=message) as info:
        apply_override(Recipe(), text)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("optim:\n  lr: 0.1\n  warmup: 3\n")
    with pytest.raises(GhostifyError, match=r"unknown recipe key 'optim.warmup' in section 'optim'"):
        load_recipe(bad_key)
    not_yaml = tmp_path / "b.yaml"
    not_yaml.write_text("train: [1, 2\n")
    with pytest.raises(GhostifyError, match=r"is not valid YAML"):
        load_recipe(not_yaml)
    not_map = tmp_path / "c.yaml"
    not_map.write_text("train: 3\n")
    with pytest.raises(GhostifyError, match=r"recipe section 'train' must be a mapping"):
        load_recipe(not_map)
    with pytest.raises(GhostifyError, match=r"does not exist; shipped recipes: .*mnist_resnet20_r2.yaml"):
        load_recipe(tmp_path / "missing.yaml")


def test_registry_names_are_checked():
    with pytest.raises(GhostifyError, match=r"'conversion.init': 'calibrated' is not one of .*calib.*copy"):
        check_registries(from_dict({"conversion": {"init": "calibrated"}}))
    with pytest.raises(GhostifyError, match=r"'conversion.cheap': 'conv' is not one of .*dw.*mix"):
        check_registries(from_dict({"conversion": {"cheap": "conv"}}))
    with pytest.raises(GhostifyError, match=r"loss.teacher=false there is no KD term; set loss.alpha=1"):
        check_registries(from_dict({"loss": {"teacher": False}}))


def test_cli_print_recipe_and_errors():
    runner = CliRunner()
    res = runner.invoke(cli, ["finetune", str(RECIPES[0]), "--set", "train.epochs=5", "--print-recipe"])
    assert res.exit_code == 0, res.output
    assert "epochs: 5.0" in res.output
    res = runner.invoke(cli, ["finetune", "recipes/mnist_resnet20_r2.yaml", "--set", "train.bogus=1"])
    assert res.exit_code != 0
    assert "unknown recipe key 'train.bogus'" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["finetune"])
    assert res.exit_code != 0 and "give a RECIPE" in res.output
