"""Does the shared distillation's learning rate hold the Ghost students back? The peers' KD recipe at several
peak learning rates, for the same students ``benchmarks/peers.py`` builds.

The photos KD recipe (``peer_methods.kd_finetune``: ``ghostify.distill``'s AdamW at 3e-5) gives every student
the same steps. On MobileNetV2 at 0.9 of the MACs the pruned student gains 17 points from them and ghostify's
allocation 11: a recipe tuned too gently for a student whose converted layers were refitted could explain part
of that gap. This builds each student once, as ``peers.py`` does with the same flags, and distils a copy at each
learning rate (same seed, same batches), printing held-out top-1 agreement and KL::

    python -m benchmarks.kd_lr --round-to 8 --calib-augment 256       # MobileNetV2, 0.9, ~25 min on 2 cores

Measured on 6 Dec 2026 (docs/peers.md, "The distillation's learning rate"): 3e-5 is the best of 3e-5 / 1e-4 /
3e-4 for both students (the allocation 63.8 / 62.2 / 16.5 %, L1 pruning 76.1 / 75.0 / 64.1 %).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import peer_methods as P
from benchmarks import peers


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--target", type=float, default=0.9, help="MACs fraction")
    ap.add_argument("--methods", nargs="+", default=["ghostify-alloc-kl", "tp-l1-global"], choices=peers.METHODS)
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--calib-augment", type=int, default=0, metavar="N")
    ap.add_argument("--round-to", type=int, default=1, metavar="N")
    ap.add_argument("--seed", type=int, default=0, help="the distillation's seed")
    ap.add_argument("--quick", action="store_true", help="smoke run: few crops, 2 steps")
    ap.add_argument("-o", "--out", type=Path, default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    args = argparse.Namespace(calib_augment=a.calib_augment, round_to=a.round_to, alloc_ratios=list(peers.RATIOS))
    s = peers.SETUPS[a.model]
    peers.load_data(s, a.quick)
    ctx = peers.Context(s, args)
    steps = 2 if a.quick else a.steps
    rows = []
    print(f"{a.model} at {a.target} of the MACs, {steps} KD steps (seed {a.seed}); {s.data['desc']}")
    print("| method | setting | start: agreement (KL) | lr | after KD: agreement (KL) | top-5 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for method in a.methods:
        student, setting = peers.kd_student(ctx, method, a.target)
        start = peers.fidelity(s, student, ctx.ref)
        for lr in a.lrs:
            t0 = time.perf_counter()
            kd = P.kd_finetune(student, ctx.model, ctx.kd_x, steps=steps, recipe="photos", seed=a.seed, lr=lr)
            end = peers.fidelity(s, kd, ctx.ref)
            rows.append(dict(method=method, setting=setting, macs=ctx.macs(student), lr=lr, steps=steps,
                             start=start["fidelity"], start_kl=start["kl"], kd=end["fidelity"], kd_kl=end["kl"],
                             kd_top5=end["agree_top5"], seconds=time.perf_counter() - t0))
            print(f"| {method} | {setting} | {start['fidelity']:.2%} ({start['kl']:.3f}) | {lr:g} | "
                  f"{end['fidelity']:.2%} ({end['kl']:.3f}) | {end['agree_top5']:.2%} | {rows[-1]['seconds']:.0f} |",
                  flush=True)
            if a.out:
                a.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
