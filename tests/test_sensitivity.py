"""Per-layer sensitivity: each conv converted alone, its MACs saved and its loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import ghostify
from ghostify.cli import cli
from ghostify.tradeoffs.sensitivity import SensitivityTable, sensitivity

SIZE = (1, 3, 16, 16)


@pytest.fixture
def data():
    return [torch.randn(8, *SIZE[1:]) for _ in range(3)]


def test_alone_equals_converting_that_layer_alone(chain_net, data, bn_randomizer):
    net = bn_randomizer(chain_net)
    ev = [torch.randn(16, *SIZE[1:])]
    t = sensitivity(net, ratios=(2, 4), calib_data=data, eval_data=ev, input_size=SIZE, progress=False)
    assert t.layers == ["conv1", "conv2"] and t.ratios == [2, 4] and t.measure == "kl"
    assert (t.settings["cheap"], t.settings["dw_size"]) == ("mix", 1)  # calib's default, as convert resolves it
    x0 = torch.zeros(*SIZE)
    base = ghostify.count(net, x0)
    for row in t.rows:
        alone = ghostify.convert(net, ratio=row.ratio, include=[row.name], init="calib", calib_data=data,
                                 sequential=False)
        counted = ghostify.count(alone, x0)
        assert row.macs_saved == base.macs - counted.macs > 0
        with torch.no_grad():
            ref, out = net(ev[0]), alone(ev[0])
        kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean").item()
        assert row.loss == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert row.metrics["heldout_error"] == pytest.approx(alone.ghostify_info.layer_info[row.name]["heldout_error"],
                                                             rel=1e-5)


def test_proxy_uses_calibration_error_only(chain_net, data):
    t = sensitivity(chain_net, ratios=(2,), calib_data=data, method="proxy", input_size=SIZE, progress=False)
    assert t.measure == "error" and t.method == "proxy"
    for row in t.rows:
        assert row.loss == pytest.approx(row.metrics["heldout_error"] ** 2)
        assert "kl" not in row.metrics


def test_top1_measure_needs_labels_and_misuse_is_explained(chain_net, data):
    with pytest.raises(ghostify.GhostifyError, match="labelled"):
        sensitivity(chain_net, calib_data=data, eval_data=data, measure="top1", input_size=SIZE, progress=False)
    with pytest.raises(ghostify.GhostifyError, match="eval_data"):
        sensitivity(chain_net, calib_data=data, method="alone", input_size=SIZE, progress=False)
    labelled = [(x, torch.randint(0, 5, (len(x),))) for x in data]
    t = sensitivity(chain_net, init="copy", eval_data=labelled, measure="top1", input_size=SIZE, progress=False)
    assert all(math.isfinite(r.loss) and "top1" in r.metrics for r in t.rows)


def test_table_round_trips_and_plots(chain_net, data, tmp_path):
    t = sensitivity(chain_net, ratios=(2, 4), init="copy", eval_data=data[:1], input_size=SIZE, progress=False)
    again = SensitivityTable.load(t.save(tmp_path / "s.json"))
    assert again == t and (again.settings["cheap"], again.settings["dw_size"]) == ("dw", 3)  # copy's default
    assert "conv1" in t.table() and "loss/GMAC" in t.table()
    png = t.plot(tmp_path / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sensitivity_writes_table_and_plot(tmp_path):
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    r = CliRunner().invoke(cli, ["sensitivity", "conftest:ChainNet", "--weights", "none", "--input-size", "3,16,16",
                                 "--ratio", "2,4", "--init", "copy", "--eval", "photos:heldout", "--eval-limit", "6",
                                 "-o", str(out), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    assert "conv2" in r.stdout and out.exists() and plot.read_bytes()[:4] == b"\x89PNG"
    assert SensitivityTable.load(out).settings["model"] == "conftest:ChainNet"


def test_context_rows_are_measured_moves_away_from_the_uniform_model(chain_net, data, bn_randomizer):
    net = bn_randomizer(chain_net).eval()
    ev = [torch.randn(16, *SIZE[1:])]
    t = sensitivity(net, ratios=(2, 4), method="context", reference=2, calib_data=data, eval_data=ev,
                    input_size=SIZE, progress=False)
    assert t.method == "context" and t.settings["reference"] == 2 and t.layers == ["conv1", "conv2"]

    def kl(overrides):
        g = ghostify.convert(net, ratio=2, init="calib", calib_data=data, overrides=overrides).eval()
        with torch.no_grad():
            ref, out = net(ev[0]), g(ev[0])
        return F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean").item()

    for row in t.rows:
        moved = {} if row.ratio == 2 else {row.name: {"ratio": row.ratio}}
        expected = kl(moved) - kl({row.name: None})  # the layer at its ratio, against it kept; the rest at ratio 2
        assert row.loss == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # the greedy allocation runs on the table as on any other
    a = ghostify.allocate(net, target_macs=0.9, table=t, ratios=(2, 4), input_size=SIZE, calib_data=data,
                          progress=False)
    assert a.predicted_cost_ratio <= 0.9


def test_context_needs_eval_data(chain_net, data):
    with pytest.raises(ghostify.GhostifyError, match="eval_data"):
        sensitivity(chain_net, method="context", calib_data=data, input_size=SIZE, progress=False)


def test_output_measure_ranks_a_trunk_by_the_relative_error_of_its_output(chain_trunk, data, bn_randomizer):
    trunk = bn_randomizer(chain_trunk)
    ev = [torch.randn(16, *SIZE[1:]), torch.randn(8, *SIZE[1:])]
    t = sensitivity(trunk, ratios=(2, 4), calib_data=data, eval_data=ev, measure="output", input_size=SIZE,
                    progress=False)
    assert t.method == "alone" and t.measure == "output" and t.layers == ["conv1", "conv2"] and t.baseline == {
        "output_error": 0.0}
    for row in t.rows:
        alone = ghostify.convert(trunk, ratio=row.ratio, include=[row.name], init="calib", calib_data=data,
                                 sequential=False)
        with torch.no_grad():
            num = sum((alone(x) - trunk(x)).pow(2).sum() for x in ev)
            den = sum(trunk(x).pow(2).sum() for x in ev)
        assert row.metrics["output_error"] == pytest.approx((num / den).sqrt().item(), rel=1e-4)
        assert row.loss == pytest.approx(row.metrics["output_error"] ** 2) and row.loss > 0
    assert "output_error" in t.table()
    a = ghostify.allocate(trunk, target_macs=0.9, table=t, ratios=(2, 4), input_size=SIZE, calib_data=data,
                          progress=False)
    assert a.predicted_cost_ratio <= 0.9


def test_logit_measures_refuse_a_trunk_and_name_the_output_measure(chain_trunk, data):
    for measure in ("kl", "agree"):
        with pytest.raises(ghostify.GhostifyError, match=r"returns \(8, 12, 16, 16\); use measure='output'"):
            sensitivity(chain_trunk, calib_data=data, eval_data=data[:1], measure=measure, input_size=SIZE,
                        progress=False)


def test_cli_sensitivity_measures_a_trunk_by_its_output(tmp_path):
    args = ["sensitivity", "conftest:ChainTrunk", "--weights", "none", "--input-size", "3,16,16", "--ratio", "2",
            "--init", "copy", "--eval", "photos:heldout", "--eval-limit", "6"]
    r = CliRunner().invoke(cli, [*args, "--measure", "kl"])
    assert r.exit_code != 0 and "use measure='output'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, [*args, "--measure", "output", "--calib-augment", "8"])  # no --calib-data
    assert r.exit_code != 0 and "give --calib-data SPEC too" in r.output and "Traceback" not in r.output
    out = tmp_path / "t.json"
    r = CliRunner().invoke(cli, [*args, "--measure", "output", "-o", str(out)])
    assert r.exit_code == 0, r.output
    t = SensitivityTable.load(out)
    assert t.measure == "output" and t.layers == ["conv1", "conv2"]
    assert all(row.loss == pytest.approx(row.metrics["output_error"] ** 2) and row.loss > 0 for row in t.rows)
