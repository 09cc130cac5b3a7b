"""Sweeps: resume, failing points, outputs (JSON/CSV round trip, a valid PNG), Pareto front, CLI."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner

from ghostify.cli import cli
from ghostify.tradeoffs.sweep import Sweep, pareto_front, read_csv, read_results, write_csv

SIZE = (1, 3, 16, 16)


@pytest.fixture
def labelled():
    return [(torch.randn(8, *SIZE[1:]), torch.randint(0, 5, (8,))) for _ in range(2)]


def _sweep(net, grid, folder, data, **kw):
    return Sweep(net, grid, folder, eval_data=data, input_size=SIZE, meta={"model": "chain", "eval": "random"}, **kw)


def test_rerun_skips_finished_points(chain_net, labelled, tmp_path):
    rows = _sweep(chain_net, {"ratio": [2, 4]}, tmp_path, labelled).run(progress=False)
    assert [r["point"] for r in rows] == ["original", '{"ratio": 2}', '{"ratio": 4}']
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["macs_ratio"] == 1 and rows[0]["agree_top1"] == 1 and rows[2]["macs_ratio"] < rows[1]["macs_ratio"]

    def must_not_run(settings):
        raise AssertionError(f"point {settings} was measured again")

    again = _sweep(chain_net, {"ratio": [2, 4]}, tmp_path, labelled, runner=must_not_run).run(progress=False)
    assert again == rows
    # a larger grid measures only the new point
    seen = []
    more = _sweep(chain_net, {"ratio": [2, 3, 4]}, tmp_path, labelled,
                  runner=lambda s: seen.append(s) or {"macs_ratio": 0.5}).run(progress=False)
    assert seen == [{"ratio": 3}] and len(more) == 4


def test_resume_refuses_another_sweeps_folder(chain_net, labelled, tmp_path):
    _sweep(chain_net, {"ratio": [2]}, tmp_path, labelled).run(progress=False)
    other = Sweep(chain_net, {"ratio": [2]}, tmp_path, eval_data=labelled, input_size=SIZE,
                  meta={"model": "another", "eval": "random"})
    with pytest.raises(Exception, match="another model"):
        other.run(progress=False)


def test_a_failing_point_is_recorded_and_the_sweep_completes(chain_net, labelled, tmp_path):
    rows = _sweep(chain_net, {"ratio": [2], "dw_size": [2, 3]}, tmp_path, labelled).run(progress=False)
    status = {r["point"]: r for r in rows}
    bad = status['{"dw_size": 2, "ratio": 2}']
    assert bad["status"] == "error" and "dw_size" in bad["error"]
    assert status['{"dw_size": 3, "ratio": 2}']["status"] == "ok"
    assert (tmp_path / "plot.png").exists() and "error: " in (tmp_path / "summary.md").read_text()
    # the failed point is retried on rerun, the finished ones are not
    seen = []
    _sweep(chain_net, {"ratio": [2], "dw_size": [2, 3]}, tmp_path, labelled,
           runner=lambda s: seen.append(s) or {}).run(progress=False)
    assert seen == [{"ratio": 2, "dw_size": 2}]


def test_json_and_csv_round_trip(chain_net, labelled, tmp_path):
    rows = _sweep(chain_net, {"ratio": [2, 4], "init": ["copy"]}, tmp_path, labelled).run(progress=False)
    assert read_results(tmp_path)["rows"] == json.loads(json.dumps(rows))
    back = read_csv(tmp_path / "results.csv")
    assert len(back) == len(rows)
    for r, b in zip(rows, back):
        for key in ("point", "status", "ratio", "init", "macs", "macs_ratio", "top1", "agree_top1", "kl"):
            assert b[key] == (r.get(key) if not isinstance(r.get(key), float) else pytest.approx(r[key])), key
    assert read_csv(write_csv(back, tmp_path / "again.csv")) == back


def test_plot_is_a_valid_png_with_latency_panel(chain_net, labelled, tmp_path):
    _sweep(chain_net, {"ratio": [2, 4]}, tmp_path, labelled, latency=True, repeats=2).run(progress=False)
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (990, 378)  # two panels: 11 x 4.2 inches at 90 dpi
    rows = read_results(tmp_path)["rows"]
    assert all(r["latency_ratio"] > 0 for r in rows)
    assert "Pareto-optimal points (top1 against latency)" in (tmp_path / "summary.md").read_text()


def test_pareto_front_keeps_undominated_points():
    rows = [{"c": 1.0, "m": 0.9}, {"c": 0.6, "m": 0.95}, {"c": 0.5, "m": 0.7}, {"c": 0.8, "m": 0.6},
            {"c": 0.3, "m": None}]
    assert [r["c"] for r in pareto_front(rows, "c", "m")] == [0.5, 0.6]


def test_allocation_points_beside_uniform_ones(chain_net, labelled, tmp_path):
    data = [torch.randn(8, *SIZE[1:]) for _ in range(3)]
    rows = _sweep(chain_net, {"ratio": [2], "init": ["calib"]}, tmp_path, labelled, calib_data=data,
                  extra_points=[{"init": "calib", "target_macs": 0.8}], alloc_ratios=(2, 4)).run(progress=False)
    budget = rows[-1]
    assert budget["status"] == "ok", budget.get("error")
    assert (rows[1]["cheap"], rows[1]["dw_size"]) == ("mix", 1)  # the row records what calib's default resolved to
    assert budget["target_macs"] == 0.8 and budget["macs_ratio"] <= 0.8
    assert list(tmp_path.glob("sensitivity-*.json"))  # cached for the next run


RESUMED = """
import sys, torch
import ghostify.tradeoffs.sweep
from conftest import ChainNet
from ghostify.tradeoffs.sweep import Sweep

out, target, reuse = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "reuse"
if reuse:  # the second process must find the first one's table
    def measured_again(*args, **kwargs):
        raise AssertionError("the sensitivity table was measured again")
    ghostify.tradeoffs.sweep.sensitivity = measured_again
torch.manual_seed(0)
net, data = ChainNet().eval(), [torch.randn(8, 3, 16, 16) for _ in range(3)]
rows = Sweep(net, {"ratio": [2], "init": ["calib"]}, out, eval_data=data[:1], calib_data=data, input_size=(1, 3, 16, 16),
             meta={"model": "chain"}, extra_points=[{"init": "calib", "target_macs": target}], alloc_ratios=(2, 4),
             ).run(progress=False)
print(rows[-1]["status"], rows[-1].get("error"))
"""


def test_a_resumed_sweep_reuses_the_sensitivity_table_of_another_process(tmp_path):
    """The cache file's name must not depend on the process (``hash()`` of a string does: PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "resumed.py"
    script.write_text(RESUMED)
    tests = Path(__file__).resolve().parent

    def run(target, mode, seed):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "sw"), target, mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip()

    assert run("0.8", "first", "1") == "ok None"
    (cached,) = (tmp_path / "sw").glob("sensitivity-*.json")
    before = cached.read_bytes()
    assert run("0.9", "reuse", "2") == "ok None"  # a new budget point, allocated from the cached table
    assert list((tmp_path / "sw").glob("sensitivity-*.json")) == [cached] and cached.read_bytes() == before
    rows = read_results(tmp_path / "sw")["rows"]
    assert [r.get("target_macs") for r in rows if r["status"] == "ok"] == [None, None, 0.8, 0.9]


def test_cli_sweep_prints_table_and_writes_outputs(tmp_path):
    out = tmp_path / "sw"
    r = CliRunner().invoke(cli, ["sweep", "conftest:ChainNet", "--weights", "none", "--input-size", "3,16,16",
                                 "--ratios", "2,4", "--eval", "photos:heldout", "--eval-limit", "6", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "| original" in r.stdout and "ratio=4" in r.stdout
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "summary.md", "plot.png"}


def test_cli_report_with_per_layer_latency(chain_net, tmp_path):
    import ghostify

    path = ghostify.save(ghostify.convert(chain_net), tmp_path / "g.safetensors", arch="conftest:ChainNet")
    r = CliRunner().invoke(cli, ["report", str(path), "--latency", "--per-layer", "--repeats", "2",
                                 "--input-size", "3,16,16", "--trust-code"])  # the file names conftest:ChainNet
    assert r.exit_code == 0, r.output
    assert "latency batch 1 (ms)" in r.stdout and "per-layer latency inside the model" in r.stdout
    assert "conv1" in r.stdout.split("per-layer latency")[1] and "rebuilt from the recorded architecture" in r.stderr
