"""One configuration object: the CLI's layer options and the recipe's conversion keys are LayerSpec's fields."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

import ghostify
from ghostify.cli import cli
from ghostify.config import LayerSpec, build_config
from ghostify.train.recipe import ConversionConfig, from_dict, ghost_config

FIELDS = [f for f in dataclasses.fields(LayerSpec)]


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_cli_layer_options_are_layer_spec_fields(command):
    params = {p.name: p for p in cli.commands[command].params}
    for f in FIELDS:
        assert params[f.name].opts == ["--" + f.name.replace("_", "-")]
        assert params[f.name].default == f.default and params[f.name].help == f.metadata["help"]


def test_recipe_conversion_keys_are_layer_spec_fields():
    conv = {f.name: f for f in dataclasses.fields(ConversionConfig)}
    for f in FIELDS:
        assert conv[f.name].default == f.default and conv[f.name].metadata == f.metadata


def test_recipe_builds_the_same_config_as_the_keywords(chain_net):
    cfg = from_dict({"conversion": {"ratio": 4, "init": "copy", "exclude": ["conv1"],
                                    "overrides": {"conv2": {"ratio": 2}}}})
    a = ghostify.make_plan(chain_net, ghost_config(cfg.conversion))
    b = ghostify.make_plan(chain_net, build_config(4, init="copy", exclude=["conv1"], overrides={"conv2": {"ratio": 2}}))
    assert a.to_dict() == b.to_dict()


def test_an_even_dw_size_is_refused_by_the_cli_as_by_the_api():
    with pytest.raises(ghostify.GhostifyError, match="odd"):
        LayerSpec(dw_size=2)
    r = CliRunner().invoke(cli, ["inspect", "resnet18", "--weights", "none", "--dw-size", "2"])
    assert r.exit_code != 0 and "odd" in r.output


def test_config_travels_unchanged_to_sensitivity(chain_net):
    import torch

    cfg = ghostify.GhostConfig(LayerSpec(init="copy")).exclude("conv2")
    data = [torch.randn(2, 3, 16, 16)]
    t = ghostify.sensitivity(chain_net, config=cfg, ratios=(2,), eval_data=data, input_size=(1, 3, 16, 16),
                             progress=False)
    assert "conv2" not in t.layers and t.layers and cfg.global_spec.ratio == 2 and cfg.excludes == ["conv2"]
