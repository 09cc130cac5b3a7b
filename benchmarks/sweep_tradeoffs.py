"""Trade-off sweeps for the README: uniform ratios against budgeted allocations at equal MACs, no training.

Two models, each with data split three ways (calibration / sensitivity / final evaluation):

* ``resnet20``: the MNIST ResNet-20 (``checkpoints/resnet20_mnist.pt``); calibration on the
  first 512 MNIST training images, sensitivity on training images 512..1535, accuracy and
  agreement on the 10,000 test images.
* ``mobilenet_v2``: ImageNet weights; calibration on ``photos:calib`` crops (seed 0),
  sensitivity on other crops of the same calibration photos (seed 1), agreement with the
  original on ``photos:heldout`` (photos never used for calibration or sensitivity).

Per model: a sweep of uniform ratios (``init=calib``, mix 1x1 cheap op; and ``init=copy``,
depthwise 3x3, for reference), then budgeted allocations (``ghostify.allocate``: greedy on
the sensitivity's KL per MAC saved, ratios 2/3/4 or keep) at the given MACs fractions *and*
at exactly the MACs of each uniform point. Outputs in ``sweeps/MODEL/`` (results.json/.csv,
summary.md, plot.png; rerunning resumes).

    python benchmarks/sweep_tradeoffs.py resnet20
    python benchmarks/sweep_tradeoffs.py mobilenet_v2 --targets 0.9 0.8
    python benchmarks/sweep_tradeoffs.py resnet20 --quick        # checks the script (tiny data)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import ghostify
from ghostify.zoo.data import resolve_data
from ghostify.tradeoffs.sensitivity import SensitivityTable, sensitivity
from ghostify.tradeoffs.sweep import Sweep, table

SETUPS = {
    "resnet20": dict(model="checkpoints/resnet20_mnist.pt", input_size=(1, 1, 28, 28), ratios=[2, 3, 4],
                     targets=[0.8, 0.7]),
    "mobilenet_v2": dict(model="mobilenet_v2", input_size=(1, 3, 224, 224), ratios=[2, 4], targets=[0.9, 0.8]),
}


def data_for(name: str, args):
    """(calibration, sensitivity, evaluation) data and their descriptions."""
    if name == "resnet20":
        n_cal, n_sens = (64, 128) if args.quick else (512, 1024)
        train = resolve_data("mnist:train", batch_size=64, limit=n_cal + n_sens)
        xs = torch.cat([x for x, _ in train])
        ys = torch.cat([y for _, y in train])
        calib = [xs[i:i + 64] for i in range(0, n_cal, 64)]
        sens = [(xs[i:i + 256], ys[i:i + 256]) for i in range(n_cal, n_cal + n_sens, 256)]
        test = resolve_data("mnist:test", batch_size=500, limit=500 if args.quick else None)
        return calib, sens, test, {"calib": f"mnist:train[:{n_cal}]", "sens": f"mnist:train[{n_cal}:{n_cal + n_sens}]",
                                   "eval": f"mnist:test ({test.num_examples})"}
    ghostify.install_offline_weights()
    n_cal, n_sens, n_eval = (32, 16, 16) if args.quick else (args.calib_size, 32, args.eval_size)
    calib = resolve_data("photos:calib", batch_size=32, limit=n_cal)
    sens = resolve_data("photos:calib", batch_size=32, limit=n_sens, seed=1)
    test = resolve_data("photos:heldout", batch_size=48, limit=n_eval)
    return calib, sens, test, {"calib": f"photos:calib ({n_cal} crops, seed 0)",
                               "sens": f"photos:calib ({n_sens} other crops, seed 1)",
                               "eval": f"photos:heldout ({test.num_examples} crops of {len(test.photos)} photos: "
                                       f"{', '.join(test.photos)})"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(SETUPS))
    ap.add_argument("--out", default=None, help="output folder (default sweeps/MODEL)")
    ap.add_argument("--targets", nargs="+", type=float, default=None, help="MACs fractions for the allocation")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sensitivity", default=None, help="a ready table (JSON) instead of measuring it")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--scatter", action="store_true",
                    help="calibrated points choose intrinsic channels freely where the order cannot fold")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = SETUPS[args.model]
    out = Path(args.out or f"sweeps/{args.model}")
    model = ghostify.get_model(setup["model"]).eval()
    calib, sens_data, test, desc = data_for(args.model, args)
    print(json.dumps(desc, indent=1), file=sys.stderr)
    spec = dict(dw_size=1, init="calib", cheap="mix", **({"scatter": True} if args.scatter else {}))
    ratios = [2] if args.quick else setup["ratios"]

    suffix = "-scatter" if args.scatter else ""
    table_path = Path(args.sensitivity) if args.sensitivity else out / f"sensitivity-kl{suffix}.json"
    if table_path.exists():
        sens = SensitivityTable.load(table_path)
    else:
        t0 = time.perf_counter()
        sens = sensitivity(model, ratios=(2, 3, 4) if args.model == "resnet20" else (2, 4), calib_data=calib,
                           eval_data=sens_data, input_size=setup["input_size"], **spec)
        sens.settings["seconds"] = time.perf_counter() - t0
        sens.settings["data"] = desc
        out.mkdir(parents=True, exist_ok=True)
        sens.save(table_path)
        sens.plot(out / f"sensitivity{suffix}.png")
    print(sens.table(), file=sys.stderr)

    common = dict(eval_data=test, calib_data=calib, input_size=setup["input_size"], latency=not args.no_latency,
                  threads=args.threads, repeats=10, meta={"model": setup["model"], **desc},
                  alloc_ratios=tuple(sens.ratios), alloc_table=sens)
    grid = {"ratio": ratios, **{k: [v] for k, v in spec.items()}}
    copy_points = [] if args.scatter else [{"ratio": r, "dw_size": 3, "init": "copy", "cheap": "dw"} for r in ratios]
    rows = Sweep(model, grid, out, extra_points=copy_points, **common).run()
    uniform = [r for r in rows if r.get("init") == "calib" and r.get("ratio") and r["status"] == "ok"
               and bool(r.get("scatter")) == args.scatter]
    targets = sorted({round(t, 4) for t in (args.targets or setup["targets"])}
                     | {round(r["macs_ratio"], 4) for r in uniform if r["macs_ratio"] < 1}, reverse=True)
    budget = [{**spec, "target_macs": t} for t in targets]
    rows = Sweep(model, grid, out, extra_points=copy_points + budget, **common).run()
    print(table(rows))


if __name__ == "__main__":
    main()
