"""Training-free conversion of the MNIST reference models: accuracy on the 10k test set, no training.

Calibrates on the first --calib-size training images (never on test images) and reports,
per model, ratio, dw_size, init and cheap op: MACs ratio, test top-1, agreement with the
original, KL(original || converted) and conversion wall time.

    python benchmarks/training_free_mnist.py                       # full grid (about 40 min on 2 cores)
    python benchmarks/training_free_mnist.py --compact             # the README table (about 15 min)
    python benchmarks/training_free_mnist.py --quick               # ratio 2 only, 2,000 test images
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import ghostify
from ghostify.data import resolve_data
from ghostify.evaluation import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg_small"])
    ap.add_argument("--ratios", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--dw-sizes", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compact", action="store_true",
                    help="ratios 2 and 4; copy/dw3, calib/dw3, calib/mix1 (scatter) and calib/mix1 (no scatter)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.quick:
        args.ratios, args.test_size = [2], 2000
    torch.set_num_threads(args.threads)
    calib = resolve_data("mnist:train", batch_size=64, limit=args.calib_size)
    test = resolve_data("mnist:test", batch_size=500, limit=args.test_size)
    rows = []
    head = (f"{'model':10} {'ratio':>5} {'dw':>3} {'init':>6} {'cheap':>5} {'order':>7} {'MACs':>6} {'top1':>7} "
            f"{'agree':>7} {'KL':>7} {'sec':>6}")
    print(f"calibration: mnist:train first {args.calib_size}; test: mnist:test first {args.test_size}\n{head}")
    for name in args.models:
        model = ghostify.get_model(f"checkpoints/{name}_mnist.pt")
        base = evaluate(model, test, progress=False)
        x = torch.zeros(1, 1, 28, 28)
        macs0 = ghostify.count(model, x).macs
        print(f"{name:10} {'-':>5} {'-':>3} {'orig':>6} {'-':>5} {'-':>7} {1:6.3f} {base['top1']:7.4f}")
        grid = [(dw, init, cheap, scatter) for dw in args.dw_sizes for init, cheap in
                [("random", "dw"), ("copy", "dw"), ("calib", "dw"), ("copy", "mix"), ("calib", "mix")]
                for scatter in (False, True)]
        if args.compact:
            args.ratios = [2, 4]
            grid = [(3, "copy", "dw", False), (3, "calib", "dw", True), (1, "calib", "mix", True),
                    (1, "calib", "mix", False)]
        for ratio, (dw, init, cheap, scatter) in itertools.product(args.ratios, grid):
            t0 = time.perf_counter()
            ghost = ghostify.convert(model, ratio=ratio, dw_size=dw, init=init, cheap=cheap, scatter=scatter,
                                     calib_data=calib if init == "calib" else None)
            sec = time.perf_counter() - t0
            res = evaluate(ghost, test, baseline=model, progress=False)
            row = {"model": name, "ratio": ratio, "dw_size": dw, "init": init, "cheap": cheap, "scatter": scatter,
                   "macs_ratio": ghostify.count(ghost, x).macs / macs0, "orig_top1": base["top1"], **res,
                   "seconds": sec}
            rows.append(row)
            print(f"{name:10} {ratio:5d} {dw:3d} {init:>6} {cheap:>5} {'scatter' if scatter else 'fixed':>7} "
                  f"{row['macs_ratio']:6.3f} {res['top1']:7.4f} "
                  f"{res['agree_top1']:7.4f} {res['kl']:7.4f} {sec:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
