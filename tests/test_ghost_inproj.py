"""benchmarks/ghost_inproj.py on a tiny net: the prototype's MACs stay within Tucker-2's and it is exact where
the conv is exactly low-rank on both modes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("tensorly", reason="the peers extra is not installed: pip install -e '.[peers]'")

import ghostify  # noqa: E402
from benchmarks import peer_methods as P  # noqa: E402
from benchmarks.ghost_inproj import intrinsic_count, project_and_ghost  # noqa: E402
from ghostify import GhostConv2d  # noqa: E402


def test_intrinsic_count_by_hand():
    # Tucker (9, 9) of a 16 -> 16 3x3 conv: 9*9*9 + 9*16 = 873 MACs per position after the projection;
    # m = 10: 9*9*10 + 10*6 = 870, m = 11: 891
    assert intrinsic_count(9, 9, 16, 9, 1) == 10
    assert intrinsic_count(9, 9, 16, 9, 4) == 8
    assert intrinsic_count(1, 1, 16, 9, 8) == 0  # not even 8 maps fit: the layer stays Tucker-2


@pytest.mark.parametrize("refit", [True, False])
def test_projected_ghost_is_exact_on_a_conv_of_low_rank_on_both_modes(refit):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    core = torch.randn(4, 4, 3, 3)
    u_out, u_in = torch.linalg.qr(torch.randn(16, 4))[0], torch.linalg.qr(torch.randn(16, 4))[0]
    net[2].weight.data = torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in)  # multilinear rank (4, 4)
    x0 = torch.zeros(1, 3, 8, 8)
    low = P.lowrank(net, x0, 0.5)  # the stem stays whole
    assert low.lowrank_layers == {"2": (9, 9)}
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    proto = project_and_ghost(low, net, calib, round_to=1, refit=refit)
    ghost = proto[2][1]
    assert isinstance(ghost, GhostConv2d) and ghost.intrinsic_channels == 10 and ghost.in_channels == 9
    assert ghostify.count(proto, x0).macs <= ghostify.count(low, x0).macs
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(proto(x), net(x), atol=1e-3, rtol=1e-3)


def test_the_fit_weights_each_channel_as_the_next_batchnorm_sees_it(monkeypatch):
    import benchmarks.ghost_inproj as G

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.BatchNorm2d(16)).eval()
    net[3].weight.data.uniform_(-2, 2)
    net[3].running_var.data.uniform_(0.5, 3)
    seen = []
    real = G.fit_layer
    monkeypatch.setattr(G, "fit_layer", lambda *a, **kw: seen.append(kw["scale"]) or real(*a, **kw))
    x0 = torch.zeros(1, 3, 8, 8)
    project_and_ghost(P.lowrank(net, x0, 0.5), net, [torch.randn(4, 3, 8, 8)], round_to=1)
    bn = net[3]
    by_hand = (bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).double()
    torch.testing.assert_close(seen[0], by_hand / by_hand.mean())  # one fitted conv, weighted as ghostify weights it
