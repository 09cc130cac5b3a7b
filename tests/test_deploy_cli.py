"""The deploy commands: ``ghostify export``, ``report --latency --runtime``, ``convert --skip-slower --runtime``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close

import ghostify
from ghostify.cli import cli

ort = pytest.importorskip("onnxruntime")

SIZE = "1,3,64,64"


@pytest.fixture(scope="module")
def ghost_file(tmp_path_factory):
    """A ResNet-18 converted at ratio 2 (BN statistics randomised so folding them matters), saved by ghostify."""
    torch.manual_seed(0)
    original = ghostify.get_model("resnet18", weights="none").eval()
    for m in original.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ghost") / "ghost.safetensors"
    ghostify.save(ghostify.convert(original, ratio=2), path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_export_onnx_runs_in_onnxruntime_as_the_model(ghost_file, tmp_path):
    out = tmp_path / "ghost.onnx"
    result = invoke("export", ghost_file, "-o", out, "--input-size", SIZE, "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)
    assert check["path"] == str(out) and check["fused"] and check["fusions"] and check["cats_left"] is not None
    assert check["max_rel_err"] <= 1e-4 and check["top1_agreement"] == 1.0
    x = torch.randn(2, 3, 64, 64)  # another batch size than exported: the file is fixed at batch 1
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = ghostify.load(ghost_file).eval()
    with torch.no_grad():
        for xi in x.split(1):
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0])
            assert_close(got, model(xi), rtol=1e-4, atol=1e-4)


def test_export_summary_names_errors_agreement_fusions_and_cats(ghost_file, tmp_path):
    result = invoke("export", ghost_file, "-o", tmp_path / "g.onnx", "--input-size", SIZE, "--dynamic-batch")
    assert result.exit_code == 0, result.output
    for fragment in ("max abs error", "max relative error", "top-1 agreement 100.0%", "fusions:", "Ghost cats left"):
        assert fragment in result.stdout
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": torch.randn(3, 3, 64, 64).numpy()})[0].shape == (3, 1000)


def test_export_pt2_of_an_unconverted_model_by_name(tmp_path):
    out = tmp_path / "r.pt2"
    result = invoke("export", "resnet18", "--weights", "none", "-o", out, "--input-size", SIZE, "--no-fuse")
    assert result.exit_code == 0, result.output
    assert "fusions: off (--no-fuse)" in result.stdout
    program = torch.export.load(str(out)).module()
    assert program(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_export_refuses_to_overwrite_without_force(ghost_file, tmp_path):
    out = tmp_path / "g.onnx"
    out.write_bytes(b"keep me")
    one_line_error(invoke("export", ghost_file, "-o", out, "--input-size", SIZE), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert invoke("export", ghost_file, "-o", out, "--input-size", SIZE, "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_export_fails_above_the_tolerance_and_writes_nothing(ghost_file, tmp_path):
    out = tmp_path / "g.onnx"
    one_line_error(invoke("export", ghost_file, "-o", out, "--input-size", SIZE, "--tolerance", 0),
                   "export check failed", "nothing written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size, fragment", [("1,1,64,64", "pass --input-size"), ("1,3,x", "--input-size '1,3,x'")])
def test_export_wrong_input_size_is_one_line(ghost_file, tmp_path, size, fragment):
    one_line_error(invoke("export", ghost_file, "-o", tmp_path / "g.onnx", "--input-size", size), fragment)
    assert list(tmp_path.iterdir()) == []


def test_export_wrong_suffix_is_one_line(ghost_file, tmp_path):
    one_line_error(invoke("export", ghost_file, "-o", tmp_path / "g.bin"), "must end in .onnx or .pt2")


@pytest.mark.parametrize("argv", [["export", "resnet18", "--weights", "none", "-o", "{tmp}/m.onnx"],
                                  ["report", "{ghost}", "--latency", "--runtime", "ort"]])
def test_missing_onnxruntime_is_one_line_naming_the_extra(ghost_file, tmp_path, argv):
    argv = [a.format(tmp=tmp_path, ghost=ghost_file) for a in argv]
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            f"from ghostify.cli import main; main({argv!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "pip install 'ghostify[deploy]'" in out.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_report_latency_in_onnxruntime(ghost_file):
    result = invoke("report", ghost_file, "--latency", "--runtime", "ort", "--repeats", 2, "--threads", 1,
                    "--input-size", SIZE, "--json")
    assert result.exit_code == 0, result.output
    lat = json.loads(result.stdout)["latency"]["batch 1"]
    assert lat["before"]["repeats"] == lat["after"]["repeats"] == 2 and lat["after"]["median_ms"] > 0


def test_report_runtime_needs_latency(ghost_file):
    one_line_error(invoke("report", ghost_file, "--runtime", "ort"), "add --latency")


def test_convert_skip_slower_in_onnxruntime(tmp_path):
    result = invoke("convert", "resnet18", "--weights", "none", "--init", "copy", "--input-size", "1,3,32,32",
                    "--include", "layer1.0.*", "--skip-slower", "--runtime", "ort", "--threads", 1,
                    "--save-plan", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    assert "--skip-slower:" in result.stderr
    entries = {e["name"]: e for e in json.loads((tmp_path / "plan.json").read_text())["entries"]}
    decided = [entries[n] for n in ("layer1.0.conv1", "layer1.0.conv2")]
    assert all(e["action"] == "convert" or "in ort" in e["reason"] for e in decided)


def test_convert_runtime_without_a_latency_option_is_one_line():
    one_line_error(invoke("convert", "resnet18", "--weights", "none", "--runtime", "ort"), "--skip-slower")
