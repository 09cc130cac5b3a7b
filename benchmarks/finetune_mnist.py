"""Fine-tuning the MNIST reference models: KD from the original against training the Ghost net from scratch.

Per model and ratio: test top-1 of the original, of the converted model before fine-tuning
(calibrated init, 1x1 mix cheap op, on the first 512 training images), after one epoch of
KD fine-tuning on mnist:train (the shipped recipe), and of the same Ghost architecture
trained from scratch (random weights everywhere, labels only, lr 0.1) for the same number
of steps. Wall time per epoch. Each run writes a normal run directory under --out.

    python benchmarks/finetune_mnist.py                                   # all 8 runs (about 2 h on 2 busy cores)
    python benchmarks/finetune_mnist.py --runs resnet20:2 vgg_small:2     # a subset
    python benchmarks/finetune_mnist.py --steps 50                        # the same at 50 steps
    python benchmarks/finetune_mnist.py --quick                           # check that it runs (figures mean nothing)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ghostify.train.run import finetune
from ghostify.train.recipe import load_recipe

RECIPES = {"resnet20": "recipes/mnist_resnet20_r2.yaml", "vgg_small": "recipes/mnist_vgg_r2.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["resnet20:2", "vgg_small:2", "resnet20:4", "vgg_small:4"],
                    help="MODEL:RATIO pairs, run in this order")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps instead of --epochs")
    ap.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test images (default all)")
    ap.add_argument("--scratch-lr", type=float, default=0.1)
    ap.add_argument("--no-scratch", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is robust on a shared VM)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe overrides for every run")
    ap.add_argument("--out", default="runs/bench_finetune_mnist")
    ap.add_argument("--json", default=None, help="write the rows here (default OUT/results.json)")
    ap.add_argument("--quick", action="store_true", help="check that the script runs: 5 steps, 500 test images")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.steps, args.test_size = args.runs[:1], 5, 500
        args.overrides = args.overrides + ["conversion.calib_size=128"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    length = [f"train.steps={args.steps}"] if args.steps else [f"train.epochs={args.epochs}"]
    common = length + ([f"data.val_limit={args.test_size}"] if args.test_size else []) + args.overrides
    for run in args.runs:
        name, ratio = run.split(":")
        sets = common + [f"conversion.ratio={ratio}", "train.checkpoint_every=1000"]
        t0 = time.perf_counter()
        kd = finetune(RECIPES[name], overrides=sets, output_dir=out / f"{name}_r{ratio}_kd", force=True).report
        row = {"model": name, "ratio": int(ratio), "macs_ratio": kd["macs_after"] / kd["macs_before"],
               "params_ratio": kd["params_after"] / kd["params_before"], "steps": kd["steps"],
               "original": kd["original"]["top1"], "before": kd["before"]["top1"], "kd": kd["after"]["top1"],
               "kd_agree": kd["after"].get("agree_top1"), "kd_seconds_per_epoch": kd["seconds_per_epoch"],
               "kd_run_seconds": time.perf_counter() - t0}
        if not args.no_scratch:
            cfg = load_recipe(RECIPES[name])
            scratch_sets = sets + [f"model.name=ghostify.reference:{name}", "model.weights=none",
                                   "conversion.init=random", "loss.teacher=false", "loss.alpha=1",
                                   f"optim.lr={args.scratch_lr}", f"train.steps={kd['steps']}"]
            assert cfg.conversion.cheap and cfg.conversion.dw_size  # same Ghost layers as the KD run
            t0 = time.perf_counter()
            sc = finetune(RECIPES[name], overrides=scratch_sets, output_dir=out / f"{name}_r{ratio}_scratch",
                          force=True).report
            assert sc["macs_after"] == kd["macs_after"], "the scratch net must be the same architecture"
            row.update(scratch=sc["after"]["top1"], scratch_seconds_per_epoch=sc["seconds_per_epoch"],
                       scratch_run_seconds=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
        path = Path(args.json or out / "results.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"
    lines = ["| model | ratio | MACs ratio | steps | original | converted, no training | KD fine-tuned "
             "| from scratch, same steps | s/epoch KD (scratch) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sc = r.get("scratch_seconds_per_epoch")
        secs = f"{r['kd_seconds_per_epoch'][0]:.0f}" + (f" ({sc[0]:.0f})" if sc else "")
        lines.append(f"| {r['model']} | {r['ratio']} | {r['macs_ratio']:.3f} | {r['steps']} | {pct(r['original'])} | "
                     f"{pct(r['before'])} | {pct(r['kd'])} | {pct(r.get('scratch'))} | {secs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
