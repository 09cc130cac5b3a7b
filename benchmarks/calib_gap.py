"""How close each peers student is to the original on the images it was fitted on, against held-out images.

The distillation of ``benchmarks/peers.py`` trains every student on the calibration crops (augmented). A
calibrated Ghost student was *fitted* to the original on those very crops, a pruned one only had its BatchNorm
statistics re-estimated there, so the two may start KD with very different amounts left to learn. This script
builds the students exactly as ``peers.py`` does (same data, same repairs) and prints, for each, top-1
agreement and KL(original || student) at the KD temperature on three sets: the calibration crops as they are,
augmented views of them drawn as the KD recipe draws them (its first ``--views`` examples), and the held-out
crops of other photos. Nothing is trained::

    python -m benchmarks.calib_gap --model mobilenet_v2 --target 0.9
    python -m benchmarks.calib_gap --model efficientnet_lite0 --target 0.9 --methods ghostify-alloc-kl tp-taylor-global
"""
from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

from benchmarks import peers
from benchmarks.peer_methods import PHOTO_KD_T as TEMPERATURE, kl_sum, photo_kd_batches


@torch.no_grad()
def closeness(teacher, student, batches) -> tuple[float, float, int]:
    """``(top-1 agreement, mean KL(teacher || student) at TEMPERATURE, examples)`` over ``batches`` of inputs."""
    agree = kl = n = 0
    for x in batches:
        t, s = teacher(x), student(x)
        agree += (t.argmax(1) == s.argmax(1)).sum().item()
        kl += kl_sum(s, t, TEMPERATURE)
        n += len(x)
    return agree / n, kl / n, n


def kd_views(calib_x: list[torch.Tensor], count: int, seed: int = 0) -> list[torch.Tensor]:
    """The first batches of 16 augmented examples the photos KD recipe draws (``peer_methods.photo_kd_batches``),
    enough for ``count`` examples."""
    return list(itertools.islice(photo_kd_batches(calib_x, seed), math.ceil(count / 16)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2", choices=[n for n, s in peers.SETUPS.items()
                                                                if s.kind == "photos"])
    ap.add_argument("--target", type=float, default=0.9, help="MACs target, as peers.py --targets")
    ap.add_argument("--methods", nargs="+", default=["ghostify-mix", "ghostify-alloc-kl", "tp-l1-global",
                                                     "tp-taylor-global", "lowrank"], choices=peers.METHODS)
    ap.add_argument("--views", type=int, default=256, help="augmented calibration views to measure")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = peers.SETUPS[args.model]
    peers.load_data(s, quick=False)
    ctx = peers.Context(s, argparse.Namespace(alloc_ratios=list(peers.RATIOS)))
    sets = {"calibration crops": ctx.calib_x, "augmented views": kd_views(ctx.calib_x, args.views),
            "held-out crops": [x for x, _, _ in ctx.ref]}
    print(f"{args.model} at {args.target} of the MACs; {s.data['desc']}; KL at T = {TEMPERATURE:g}")
    head = "| method | repair | " + " | ".join(f"{k}: agree / KL" for k in sets) + " |"
    lines = [head, "|---|---|" + "---|" * len(sets)]
    for method in args.methods:
        t0 = time.perf_counter()
        student, setting = peers.kd_student(ctx, method, args.target)
        student.eval()
        repair = peers.kd_repair(method)
        cells = []
        for batches in sets.values():
            agree, kl, _ = closeness(ctx.model, student, batches)
            cells.append(f"{100 * agree:.1f} % / {kl:.3f}")
        lines.append(f"| {method} ({setting}, MACs {ctx.macs(student):.3f}) | {repair} | " + " | ".join(cells) + " |")
        print(lines[-1] + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
