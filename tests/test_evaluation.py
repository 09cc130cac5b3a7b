"""ghostify.layer_errors: per-layer fidelity of a converted model, each layer alone."""
import pytest
import torch

import ghostify


@pytest.mark.parametrize("weighting", ["none", "bn"])
def test_layer_errors_match_a_hand_computation_with_and_without_folding(chain_net, bn_randomizer, weighting):
    model = bn_randomizer(chain_net).eval()
    data = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    folded = ghostify.convert(model, ratio=2, dw_size=3, init="copy")
    plain = ghostify.convert(model, ratio=2, dw_size=3, init="copy", fold=False)
    assert "conv1" in ghostify.conversion_info(folded).folded  # the folded path is exercised
    inputs = []
    handle = model.conv1.register_forward_hook(lambda m, a, o: inputs.append((a[0], o)))
    bn = model.bn1  # the BatchNorm that reads conv1
    w = ((bn.weight / (bn.running_var + bn.eps).sqrt()).abs()[None, :, None, None] ** 2
         if weighting == "bn" else torch.ones(1))
    with torch.no_grad():
        for x in data:
            model(x)
        handle.remove()
        num = sum((w * (plain.get_submodule("conv1")(x) - y).pow(2)).sum() for x, y in inputs)
        den = sum((w * y.pow(2)).sum() for _, y in inputs)
    expected = (num / den).sqrt().item()
    assert expected > 1e-3  # a real, non-zero error
    errs = {}
    for label, ghost in (("folded", folded), ("plain", plain)):
        errs[label] = ghostify.layer_errors(model, ghost, data, progress=False, weighting=weighting)
        assert set(errs[label]) == {"conv1", "conv2"}
        assert errs[label]["conv1"] == pytest.approx(expected, rel=1e-4)
    # conv2 reads folded conv1's output, its input weights permuted by the fold: the same layer error
    assert errs["folded"]["conv2"] == pytest.approx(errs["plain"]["conv2"], rel=1e-4)
    assert errs["plain"]["conv2"] > 1e-3
    assert model.training is False


def test_an_exact_layer_has_zero_error(chain_net):
    model = chain_net.eval()
    ghost = ghostify.convert(model, ratio=1, init="copy")  # ratio 1: the primary conv is the conv itself
    errs = ghostify.layer_errors(model, ghost, [torch.randn(2, 3, 8, 8)], progress=False)
    assert errs and all(e < 1e-6 for e in errs.values())
