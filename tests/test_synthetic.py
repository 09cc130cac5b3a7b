"""The synthetic data source: inputs optimised to reproduce a model's BN statistics."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ghostify
from ghostify.cli import cli
from ghostify.zoo.synthetic import bn_statistics_loss, synthesize


@pytest.fixture
def net(chain_net):
    """ChainNet whose BN layers hold the statistics of a 'training set' unlike the noise we start from."""
    for m in chain_net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    chain_net.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(8):
            chain_net(0.8 + 2.5 * torch.randn(16, 3, 12, 12, generator=gen).cumsum(-1) / 3)
    return chain_net.eval()


def test_synthetic_batches_move_toward_the_bn_statistics(net):
    model = net
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise = synthesize(model, 16, (3, 12, 12), batch_size=16, steps=0, progress=False)
    made = synthesize(model, 16, (3, 12, 12), batch_size=16, steps=80, lr=0.05, progress=False)
    assert made.shape == noise.shape == (16, 3, 12, 12)
    assert bn_statistics_loss(model, made) < 0.3 * bn_statistics_loss(model, noise)
    # the model is untouched: same weights and statistics, eval mode, no gradients left on it
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_synthetic_source_through_resolve_data(net):
    model = net
    src = ghostify.resolve_data("synthetic:3", batch_size=4, limit=10, model=model, input_size=(3, 12, 12))
    shapes = [tuple(x.shape) for x, y in src]
    assert shapes == [(4, 3, 12, 12), (4, 3, 12, 12), (2, 3, 12, 12)] and src.name == "synthetic:3"
    assert all(y is None for _, y in src)


@pytest.mark.parametrize("spec, kwargs, needle", [
    ("synthetic", {}, "input_size"),
    ("synthetic:many", {"model": "net", "input_size": (3, 8, 8)}, "STEPS must be an integer"),
])
def test_synthetic_source_errors(spec, kwargs, needle, net):
    if kwargs.get("model") == "net":
        kwargs["model"] = net
    with pytest.raises(ghostify.GhostifyError, match=needle):
        ghostify.resolve_data(spec, **kwargs)


def test_synthetic_needs_batchnorm():
    with pytest.raises(ghostify.GhostifyError, match="BatchNorm"):
        synthesize(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, (3, 8, 8), steps=1, progress=False)


def test_cli_calibrates_on_synthetic_data():
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--weights", "none", "--input-size", "1,3,32,32",
                                      "--init", "calib", "--calib-data", "synthetic:2", "--calib-size", "8",
                                      "--include", "layer4.*", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["layers"] and any(r.get("info", {}).get("calib_error") is not None for r in rep["layers"])
