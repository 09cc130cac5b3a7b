"""benchmarks/imagenet_resnet50.py end to end on a tiny fake ImageNet: ghostify's ResNet-20 (3 channels), 32 px, 1 epoch."""
from __future__ import annotations

import json

import pytest
import torch

import ghostify
from benchmarks.imagenet_resnet50 import main

TINY = ["--model", "ghostify.reference:resnet20", "--set", "model.kwargs={in_channels: 3}", "--weights", "none",
        "--image-size", "32", "--calib", "9", "--batch-size", "6", "--workers", "0", "--device", "cpu"]


def test_imagenet_script_on_a_fake_imagefolder(tmp_path, fake_imagenet, capsys):
    root = fake_imagenet(tmp_path / "imagenet", classes=3, per_class=6, side=32)
    out = tmp_path / "out"
    argv = ["--train", str(root / "train"), "--val", str(root / "val"), "--out", str(out), *TINY]
    with ghostify.torch_threads(1):  # small ops on a shared machine: one thread is fastest
        results = main(argv)
    printed = capsys.readouterr().out
    assert "GhostNet paper" in printed and "AIMET" in printed and "| Ghost | 4 |" in printed

    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert "| Ghost | 2 |" in (out / "results.md").read_text()
    x = torch.zeros(1, 3, 32, 32)
    original = ghostify.count(ghostify.get_model("ghostify.reference:resnet20", weights="none", in_channels=3), x)
    assert saved["original"]["macs"] == original.macs and saved["original"]["params"] == original.params
    assert [r["ratio"] for r in saved["rows"]] == [2, 4]
    for r in saved["rows"]:
        run = out / f"r{r['ratio']}"
        ghost = ghostify.load(run / "final.safetensors")
        assert r["macs"] == ghostify.count(ghost, x).macs  # the row counts the model the run wrote
        assert r["macs"] < (0.6 if r["ratio"] == 2 else 0.35) * original.macs
        assert r["kd_steps"] == 3 and r["val_examples"] == 18  # 18 training images / batch 6; all 18 val images
        report = json.loads((run / "report.json").read_text())
        assert r["training_free_top1"] == report["before"]["top1"] and r["kd_top1"] == report["after"]["top1"]
        assert r["kd_agree_top1"] == report["after"]["agree_top1"]
        for key in ("training_free_top1", "training_free_agree_top1", "kd_top1", "kd_agree_top1"):
            assert 0 <= r[key] <= 1
        c = report["recipe"]["conversion"]
        assert (c["init"], c["calib_size"], c["ratio"]) == ("calib", 9, r["ratio"])
    assert saved["rows"][1]["macs"] < saved["rows"][0]["macs"]

    with pytest.raises(SystemExit, match="--out '.*out' is not empty"):  # the house rule, before any work
        main(argv)
    again = main(argv + ["--resume"])  # both runs are finished: read back, nothing retrained
    assert again["rows"] == results["rows"]
    with pytest.raises(SystemExit, match=r"other settings \(conversion.calib_size\)"):
        main(argv + ["--set", "conversion.calib_size=6", "--resume"])


def test_offline_weights_fail_before_any_work(tmp_path, fake_imagenet, monkeypatch):
    import torchvision

    root = fake_imagenet(tmp_path / "imagenet", classes=2, per_class=1, side=8)

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(SystemExit, match="IMAGENET1K_V1 weights of resnet50.*--weights none.*--weights PATH"):
        main(["--train", str(root / "train"), "--val", str(root / "val"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
