"""``benchmarks/foldable_ghosts.py``: the probe of ghosts that fold into the next conv."""
import torch
from torch import nn

from benchmarks.foldable_ghosts import best_positive_pairs, relu_inputs


def test_best_positive_pair_is_chosen_on_fit_and_measured_on_test():
    """Channel 1 is 2x channel 0 on the fit data; on the test data it is 2x channel 0 plus (0, 0, 3): the fitted
    c = 2 leaves a residual of 3 / ||(2, 4, 3)|| = 3 / sqrt(29). Channel 0's best partner is channel 1
    (c = 0.5), exact on the fit data; on the test data 0.5 x (2, 4, 3) misses (1, 2, 0) by (0, 0, 1.5), a residual
    of 1.5 / sqrt(5). Channel 2 only correlates negatively with the others: c = 0 keeps it whole (1.0),
    and a channel with no energy on the test data loses nothing (0.0)."""
    fit = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [-1.0, -2.0, 0.5], [1.0, 1.0, 1.0]])
    test = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 3.0], [-1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    res = best_positive_pairs(fit, test)
    torch.testing.assert_close(res[:2], torch.tensor([1.5 / 5 ** 0.5, 3 / 29 ** 0.5]))
    assert res[2].item() == 1.0 and res[3].item() == 0.0


def test_relu_inputs_are_the_maps_the_next_layer_sees():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                        nn.Conv2d(6, 2, 1)).eval()
    xs = [torch.randn(2, 3, 5, 5), torch.randn(3, 3, 5, 5)]
    maps = relu_inputs(net, xs)
    assert [m.shape for m in maps] == [(4, 5 * 25), (6, 5 * 25)]  # all positions: fewer than 20,000
    with torch.no_grad():
        first = torch.cat([net[:3](x) for x in xs]).transpose(0, 1).flatten(1)
    # the same positions, sub-sampled in a seeded order: compare as sorted sets per channel
    torch.testing.assert_close(maps[0].sort(1).values, first.sort(1).values)
    assert not any(h for h in net[2]._forward_hooks.values())  # hooks removed
