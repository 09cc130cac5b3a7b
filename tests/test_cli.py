"""The `ghostify` command line, through click's CliRunner."""
from __future__ import annotations

import json
import os
import urllib.error

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch.testing import assert_close

import ghostify
from ghostify.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *needles: str):
    """Exit status != 0, exactly one line on stderr, `Error: ...`, no traceback anywhere."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- informational commands ----------------------------------------------------------------------


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert ghostify.__version__ in result.stdout


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("convert", "inspect", "models", "env"):
        assert cmd in result.stdout


def test_models():
    result = run("models")
    assert result.exit_code == 0
    names = result.stdout.split()
    assert names == sorted(torchvision.models.list_models(module=torchvision.models))
    assert "resnet18" in names and "mobilenet_v2" in names


def test_env():
    result = run("env")
    assert result.exit_code == 0
    assert f"ghostify: {ghostify.__version__}" in result.stdout
    assert f"torch: {torch.__version__}" in result.stdout
    assert "cuda available:" in result.stdout


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_table():
    result = run("inspect", "resnet18", "--weights", "none")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "19 of 20 convs convert"
    assert any(line.startswith("conv1 ") and "stem" in line for line in lines)
    assert any(line.startswith("layer4.1.conv2 ") and "convert" in line for line in lines)


def test_inspect_json_with_selection_options():
    result = run("inspect", "torchvision.models:resnet18", "--weights", "none", "--json",
                 "--ratio", "4", "--dw-size", "5", "--exclude", "layer1.*",
                 "--override", "layer4.*:ratio=8,dw_size=1", "--override", "layer4.1.conv2:skip",
                 "--override", "conv1:ratio=2")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    e = {x["name"]: x for x in plan["entries"]}
    assert len(e) == 20 and plan["traced"]
    assert e["conv1"]["action"] == "convert" and e["conv1"]["spec"]["ratio"] == 2  # exact name converts the stem
    assert e["conv1"]["spec"]["dw_size"] == 5
    assert e["layer1.0.conv1"]["action"] == "skip" and "--exclude layer1.*" in e["layer1.0.conv1"]["reason"]
    assert e["layer2.0.conv1"]["spec"] == {"ratio": 4, "dw_size": 5, "init": "copy", "cheap": "dw", "round_to": 1}
    assert (e["layer4.0.conv1"]["spec"]["ratio"], e["layer4.0.conv1"]["spec"]["dw_size"]) == (8, 1)
    assert e["layer4.1.conv2"]["action"] == "skip"


def test_include():
    result = run("inspect", "resnet18", "--weights", "none", "--json", "--include", "layer3.*",
                 "--include", "layer4.0.conv1")
    assert result.exit_code == 0, result.output
    converted = [x["name"] for x in json.loads(result.stdout)["entries"] if x["action"] == "convert"]
    assert converted == ["layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv1",
                         "layer3.1.conv2", "layer4.0.conv1"]


# -- convert -------------------------------------------------------------------------------------


def test_convert_json_report():
    result = run("convert", "resnet18", "--weights", "none", "--input-size", "64", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    for key in ("macs_before", "macs_after", "params_before", "params_after", "converted", "skipped"):
        assert key in d
    assert d["input_size"] == [1, 3, 64, 64]
    model = torchvision.models.resnet18().eval()
    assert d["macs_before"] == ghostify.count(model, torch.randn(1, 3, 64, 64)).macs
    assert d["params_before"] == 11689512  # resnet18
    assert d["macs_after"] < d["macs_before"] and d["params_after"] < d["params_before"]
    assert len(d["converted"]) == 19
    assert [s["name"] for s in d["skipped"]] == ["conv1"]
    assert any(layer["folded"] for layer in d["layers"])
    assert "converted 19 of 20 convs" in result.stderr


def test_convert_table():
    result = run("convert", "resnet18", "--weights", "none", "--input-size", "3,32,32", "--ratio", "4",
                 "--no-fold")
    assert result.exit_code == 0, result.output
    assert "input (1, 3, 32, 32)" in result.stdout and "19 convs converted" in result.stdout
    assert "order folded" not in result.stdout  # --no-fold


def test_convert_writes_a_loadable_file(tmp_path):
    model = torchvision.models.resnet18().eval()
    weights = tmp_path / "r18.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "ghost.safetensors"
    result = run("convert", "resnet18", "--weights", str(weights), "--input-size", "1,3,32,32", "-o", str(out),
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)
    assert sorted(os.listdir(tmp_path)) == ["ghost.safetensors", "r18.pth"]  # no temp files left
    loaded = ghostify.load(out)
    # the same conversion through the API, from the same weights, gives the same model
    # (the function by its module path: see test_public_names_survive_submodule_imports in test_convert.py)
    from ghostify.conversion.rewrite import convert as api_convert

    expected = api_convert(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded(x), expected(x))
    assert torch.equal(loaded.get_submodule("conv1").weight, model.conv1.weight)  # the stem is kept as is


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "ghost.safetensors"
    out.write_bytes(b"precious bytes")
    result = run("convert", "resnet18", "--weights", "none", "--input-size", "32", "-o", str(out))
    assert_one_line_error(result, "exists", "--force")
    assert out.read_bytes() == b"precious bytes"
    result = run("convert", "resnet18", "--weights", "none", "--input-size", "32", "-o", str(out), "--force",
                 "--no-fold")
    assert result.exit_code == 0, result.output
    loaded = ghostify.load(out)
    assert loaded.ghostify_info.folded == []


# -- errors --------------------------------------------------------------------------------------


def test_unknown_model():
    line = assert_one_line_error(run("convert", "resnet1800", "--weights", "none"), "unknown model 'resnet1800'")
    assert "resnet18" in line  # a suggestion


@pytest.mark.parametrize("args,needle", [
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "0.5"], "--ratio"),
    (["--ratio", "two"], "--ratio"),
    (["--dw-size", "4"], "--dw-size"),
    (["--dw-size", "0"], "--dw-size"),
    (["--override", "layer4"], "--override"),
    (["--override", "layer4.*:ratio=two"], "ratio must be a number >= 1"),
    (["--override", "layer4.*:dw_size=3.5"], "dw_size must be an integer"),
    (["--override", "layer4.*:speed=1"], "speed=1"),
    (["--init", "magic"], "unknown init 'magic'"),
])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_options(command, args, needle):
    assert_one_line_error(run(command, "resnet18", "--weights", "none", *args), needle)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.safetensors"
    assert_one_line_error(run("convert", str(path)), "does not exist")
    assert not path.exists()


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(1024))
    assert_one_line_error(run("convert", str(path)), str(path))
    assert_one_line_error(run("inspect", str(path)), str(path))


@pytest.mark.parametrize("size", ["1,1,28,28", "2,32"])
def test_wrong_input_size(size):
    assert_one_line_error(run("convert", "resnet18", "--weights", "none", "--input-size", size), "--input-size")


def test_default_weights_without_network(monkeypatch, tmp_path):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    assert_one_line_error(run("convert", "resnet18", "--input-size", "32"), "--weights none")


def test_inspect_with_calibration_shows_each_layers_error():
    ckpt = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "resnet20_mnist.pt")
    result = run("inspect", ckpt, "--init", "calib", "--cheap", "dw", "--calib-data", "mnist-sample:calib",
                 "--calib-size", "160", "--include", "layer3.*")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "held-out err" in lines[1]
    row = next(line for line in lines if line.startswith("layer3.0.conv1 "))
    errs = [float(t) for t in row.split() if t.replace(".", "", 1).isdigit() and "." in t]
    assert len(errs) == 2 and all(0 <= e < 1 for e in errs)  # calib and held-out relative errors
    assert row.split()[3:8] == ["convert", "2", "3", "calib", "dw"]  # the explicit --cheap wins, with its 3x3 kernel
    as_json = json.loads(run("inspect", ckpt, "--init", "calib", "--calib-data", "mnist-sample:calib",
                             "--calib-size", "160", "--include", "layer3.*", "--json").stdout)
    converted = [e for e in as_json["entries"] if e["action"] == "convert"]
    assert set(as_json["layer_info"]) == {e["name"] for e in converted}
    assert {(e["spec"]["cheap"], e["spec"]["dw_size"]) for e in converted} == {("mix", 1)}  # calib's default
    copied = json.loads(run("inspect", ckpt, "--include", "layer3.*", "--json").stdout)["entries"]
    assert {(e["spec"]["cheap"], e["spec"]["dw_size"]) for e in copied if e["spec"]} == {("dw", 3)}  # copy's


def test_convert_calib_augment_fits_on_more_views(tmp_path):
    ckpt = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "resnet20_mnist.pt")
    args = ["convert", ckpt, "--init", "calib", "--calib-data", "mnist-sample:calib", "--calib-size", "128",
            "--include", "layer3.*"]  # two batches of 64, then two of views, interleaved; the last one held out
    plain, views = tmp_path / "plain.safetensors", tmp_path / "views.safetensors"
    assert run(*args, "-o", str(plain)).exit_code == 0
    result = run(*args, "--calib-augment", "128", "-o", str(views))
    assert result.exit_code == 0, result.output
    a, b = ghostify.load(plain), ghostify.load(views)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # fitted on other data
    assert run(*args, "--calib-augment", "-1").exit_code != 0
    for command in ("convert", "inspect"):  # views of no data: refused, not silently ignored
        assert_one_line_error(run(command, ckpt, "--init", "calib", "--calib-augment", "8"), "--calib-data SPEC")
