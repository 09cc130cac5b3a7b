"""Budgeted allocation against the uniform ratio at equal MACs, MNIST ResNet-20, no training.

Data split three ways: calibration on MNIST training images 0-511, sensitivity on training
images 512-1535, accuracy/agreement/KL on the 10,000 test images (seen by neither). All
conversions: ``init=calib``, ``cheap=mix``, ``dw_size=1``. Per reference ratio R (default 2
and 3): the uniform ratio-R model, then ``ghostify.allocate`` at exactly its MACs with ratios
1.5/2/3/4 or keep, from a ``context`` sensitivity table (each layer moved alone away from
the uniform ratio-R model, everything recalibrated) and, for comparison, from the ``alone``
table (each layer fitted and evaluated alone in the original).

    python benchmarks/allocation_vs_uniform_mnist.py                    # the sensitivity tables take 411 + 894 + 652 s on 2 cores
    python benchmarks/allocation_vs_uniform_mnist.py --references 2 --no-alone
"""
from __future__ import annotations

import argparse
import time

import torch

import ghostify
from ghostify.zoo.data import resolve_data
from ghostify.measure.evaluation import evaluate
from ghostify.tradeoffs.sensitivity import sensitivity

RATIOS = (1.5, 2, 3, 4)
SPEC = dict(dw_size=1, init="calib", cheap="mix")
SIZE = (1, 1, 28, 28)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--references", default="2,3", help="uniform ratios to compare against")
    ap.add_argument("--no-alone", action="store_true", help="skip the 'alone' table")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ghostify.get_model("checkpoints/resnet20_mnist.pt").eval()
    train = resolve_data("mnist:train", batch_size=64, limit=512 + 1024)
    xs = torch.cat([x for x, _ in train])
    ys = torch.cat([y for _, y in train])
    calib = [xs[i:i + 64] for i in range(0, 512, 64)]
    sens = [(xs[i:i + 256], ys[i:i + 256]) for i in range(512, 1536, 256)]
    test = resolve_data("mnist:test", batch_size=500)
    x0 = torch.zeros(*SIZE)
    macs0 = ghostify.count(model, x0).macs
    base = evaluate(model, test, progress=False)
    print(f"original: test top-1 {base['top1']:.4f}; calibration mnist:train[:512], sensitivity mnist:train[512:1536], "
          f"evaluation mnist:test (10,000)")
    print(f"{'point':46} {'MACs':>6} {'top1':>7} {'agree':>7} {'KL':>7}")

    def row(label, ghost):
        r = evaluate(ghost, test, baseline=model, progress=False)
        print(f"{label:46} {ghostify.count(ghost, x0).macs / macs0:6.3f} {r['top1']:7.4f} {r['agree_top1']:7.4f} "
              f"{r['kl']:7.4f}", flush=True)

    tables = {}
    if not args.no_alone:
        t0 = time.perf_counter()
        tables["alone"] = sensitivity(model, ratios=RATIOS, calib_data=calib, eval_data=sens, input_size=SIZE,
                                      progress=False, **SPEC)
        print(f"  (alone table: {time.perf_counter() - t0:.0f} s)", flush=True)
    for ref in (float(r) for r in args.references.split(",")):
        ref = int(ref) if ref.is_integer() else ref
        uniform = ghostify.convert(model, ratio=ref, calib_data=calib, **SPEC)
        target = ghostify.count(uniform, x0).macs / macs0
        row(f"uniform ratio {ref}", uniform)
        t0 = time.perf_counter()
        tables[f"context {ref}"] = sensitivity(model, ratios=RATIOS, method="context", reference=ref,
                                               calib_data=calib, eval_data=sens, input_size=SIZE, progress=False,
                                               **SPEC)
        print(f"  (context table around ratio {ref}: {time.perf_counter() - t0:.0f} s)", flush=True)
        for name in (f"context {ref}", "alone"):
            if name not in tables:
                continue
            a = ghostify.allocate(model, target_macs=target, table=tables[name], ratios=RATIOS, input_size=SIZE,
                                  progress=False, **SPEC)
            row(f"budget {target:.4f} ({name.split()[0]} table)", ghostify.convert(model, plan=a.plan,
                                                                                  calib_data=calib))
            print(f"  {a.summary()}", flush=True)


if __name__ == "__main__":
    main()
