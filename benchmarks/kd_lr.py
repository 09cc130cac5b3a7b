"""Does the shared distillation's learning rate hold the Ghost students back? The peers' KD recipe at several
peak learning rates, for the same students ``benchmarks/peers.py`` builds.

The photos KD recipe (``peer_methods.kd_finetune``: ``ghostify.distill``'s AdamW at 3e-5; trunks: the same on
the output's relative squared error) gives every student the same steps. On MobileNetV2 at 0.9 of the MACs the
pruned student gains 17 points from them and ghostify's allocation 11; on CRAFT's trunk near 0.9x of the
latency Taylor pruning goes 0.112 -> 0.074 and ghostify's budget 0.119 -> 0.106. A recipe tuned too gently (or
too hard) for one kind of student could explain part of such a gap. This builds each student once, as
``peers.py`` does with the same flags, and distils a copy at each learning rate (and ``--seeds``: each seed's batches),
printing the held-out fidelity (photos: top-1 agreement and KL; trunks: feature error)::

    python -m benchmarks.kd_lr --round-to 8 --calib-augment 256       # MobileNetV2, 0.9, ~25 min on 2 cores
    python -m benchmarks.kd_lr --model craft_trunk --round-to 8 \\
        --methods ghostify-alloc-out-ort@0.9 tp-taylor-global@0.85    # ~75 min on 2 cores

``--seeds 1 2`` distils each student once per seed (its batches and augmentation), for the spread that a gap
between two students must exceed; ``--plans DIR`` replays the latency budgets' plans a ``peers.py`` run kept
(its ``OUT/plans``), so the sweep distils the student that run timed. ``--feature-weights 0 1`` distils
ghostify's students also with ``ghostify.distill``'s per-Ghost-layer feature loss at weight 1 (the other
students, which have no Ghost layers, only at 0). ``--kd-crops N`` distils every student on N other crops of the
calibration photos (as ``peers.py``'s) instead of the calibration crops.

A method may carry its own target after ``@`` (an ``-ort`` allocation's target is a latency budget, as in
``peers.py``); the others take ``--target``.

Measured on 6 Dec 2026 (docs/peers.md, "The distillation's learning rate"): 3e-5 is the best of 3e-5 / 1e-4 /
3e-4 for both MobileNetV2 students (the allocation 63.8 / 62.2 / 16.5 %, L1 pruning 76.1 / 75.0 / 64.1 %).
On 7 Dec 2026 (fourteenth run) the per-Ghost-layer loss at weight 1 / 10 left CRAFT's 0.9x ghostify student at
0.0753 / 0.0756 after 40 steps (0.0753 without it; Taylor pruning's 0.0736); fifteenth run, ``--kd-crops 1024``:
0.0735 against Taylor's 0.0722.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import peer_methods as P
from benchmarks import peers

MODELS = ["mobilenet_v2", "efficientnet_lite0", "vgg16_trunk", "craft_trunk"]


def method_target(spec: str, default: float) -> tuple[str, float]:
    """``"tp-l1-global@0.85"`` -> ``("tp-l1-global", 0.85)``; without ``@`` the default target.

    >>> method_target("ghostify-alloc-out-ort@0.9", 0.7), method_target("lowrank", 0.7)
    (('ghostify-alloc-out-ort', 0.9), ('lowrank', 0.7))
    """
    method, _, target = spec.partition("@")
    if method not in peers.METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(peers.METHODS)}")
    return method, float(target) if target else default


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2", choices=MODELS)
    ap.add_argument("--target", type=float, default=0.9, help="MACs fraction")
    ap.add_argument("--methods", nargs="+", default=["ghostify-alloc-kl", "tp-l1-global"], metavar="METHOD[@TARGET]")
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4])
    ap.add_argument("--steps", type=int, default=None, help="KD steps (default: peers.py's, 150 photos, 40 trunks)")
    ap.add_argument("--calib-augment", type=int, default=0, metavar="N")
    ap.add_argument("--kd-crops", type=int, default=0, metavar="N", help="as peers.py: distil on N other crops of "
                    "the calibration photos (seed 1) instead of the calibration crops")
    ap.add_argument("--round-to", type=int, default=1, metavar="N")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="the distillation's seeds (batch order, "
                    "augmentation): each student distilled once per seed and rate, for the spread over seeds")
    ap.add_argument("--plans", type=Path, default=None, metavar="DIR", help="as peers.py: replay the latency "
                    "budgets' plans kept here (OUT/plans of a peers.py run), keep new ones here")
    ap.add_argument("--feature-weights", nargs="+", type=float, default=[0.0], metavar="W",
                    help="ghostify's students: the per-Ghost-layer feature loss's weights (0: the shared recipe)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few crops, 2 steps")
    ap.add_argument("-o", "--out", type=Path, default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    specs = [method_target(m, a.target) for m in a.methods]
    args = argparse.Namespace(calib_augment=a.calib_augment, round_to=a.round_to, alloc_ratios=list(peers.RATIOS),
                              plans=a.plans)
    s = peers.SETUPS[a.model]
    peers.load_data(s, a.quick, kd_crops=a.kd_crops)
    ctx = peers.Context(s, args)
    trunk = s.kind == "trunk"
    steps = 2 if a.quick else peers.KD_STEPS[s.kind] if a.steps is None else a.steps  # 0: the start again
    rows = []
    print(f"{a.model}, {steps} KD steps; {s.data['desc']}; {s.metric}")
    print("| method | target | setting | MACs | start | lr | seed | layer loss | after KD | seconds |\n"
          + "|---" * 10 + "|")
    show = (lambda f: f"{f['fidelity']:.4f}") if trunk else (lambda f: f"{f['fidelity']:.2%} ({f['kl']:.3f})")
    for method, target in specs:
        student, setting = peers.kd_student(ctx, method, target)
        start = peers.fidelity(s, student, ctx.ref)
        weights = a.feature_weights if peers.family(method) == "ghostify" else [0.0]
        for lr, seed, fw in ((lr, seed, fw) for lr in a.lrs for seed in a.seeds for fw in weights):
            t0 = time.perf_counter()
            kd = P.kd_finetune(student, ctx.model, ctx.kd_x, steps=steps, recipe=s.kind, seed=seed, lr=lr,
                               feature_weight=fw)
            end = peers.fidelity(s, kd, ctx.ref)
            rows.append(dict(method=method, target=target, setting=setting, macs=ctx.macs(student), lr=lr, seed=seed,
                             feature_weight=fw, steps=steps, kd_crops=a.kd_crops, start=start["fidelity"],
                             kd=end["fidelity"], seconds=time.perf_counter() - t0))
            if not trunk:
                rows[-1].update(start_kl=start["kl"], kd_kl=end["kl"], kd_top5=end["agree_top5"])
            print(f"| {method} | {target:g} | {setting} | {rows[-1]['macs']:.3f} | {show(start)} | {lr:g} | "
                  f"{seed} | {fw:g} | {show(end)} | {rows[-1]['seconds']:.0f} |", flush=True)
            if a.out:
                a.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
