"""Wall time of a calibrated conversion (init="calib") of ResNet-50 on 256 photo crops at 224 px.

The goal (issue 3): under 2 minutes on a 2-core CPU. No ImageNet ResNet-50 weights exist
offline, so the model has torchvision's random initialisation: the time depends on the
shapes, not on the weights (the fidelity figures live in the other benchmarks). The data
are ``photos:calib`` crops (already decoded and cached by one untimed call).

    python benchmarks/calib_time.py                      # resnet50, 256 images, the default cheap op (mix 1x1)
    python benchmarks/calib_time.py --cheap dw --images 128  # the paper's depthwise 3x3 cheap op
    python benchmarks/calib_time.py --hooks              # the per-layer capture path, for comparison
    python benchmarks/calib_time.py --model mobilenet_v2 --include 'features.1[4-7].*' --calib-augment 256

Besides the time it prints the process's peak resident memory (``ru_maxrss``) and what it held before the
conversion, so that the lockstep pass's memory can be compared (``--include``: convert only those layers, as the
allocations do; both models compute what comes before the first of them once).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

GOAL_S = 120.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ratio", type=int, default=2)
    p.add_argument("--cheap", default=None, help="cheap op (default: convert's default for init='calib')")
    p.add_argument("--hooks", action="store_true", help="force per-layer capture instead of the lockstep pass")
    p.add_argument("--include", nargs="+", default=(), help="convert only these layers (glob patterns)")
    p.add_argument("--calib-augment", type=int, default=0, metavar="N", help="fit on N augmented views too")
    p.add_argument("--quick", action="store_true", help="resnet18, 16 images: checks the script only")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.images, args.batch_size = "resnet18", 16, 8

    import torch
    import torchvision

    import ghostify
    import ghostify.init.calib as calibrate

    if args.hooks:
        calibrate._single_input = lambda graph: False
    data = ghostify.resolve_data("photos:calib", batch_size=args.batch_size, limit=args.images)
    batches = [x for x, _ in data]
    torch.manual_seed(0)  # the same random weights every run, so that the error figures compare
    model = torchvision.models.get_model(args.model).eval()
    before = peak_gib()
    t0, c0 = time.perf_counter(), time.process_time()
    ghost = ghostify.convert(model, ratio=args.ratio, init="calib", cheap=args.cheap, calib_data=batches,
                             include=args.include, calib_augment=args.calib_augment)
    cpu = time.process_time() - c0
    seconds = time.perf_counter() - t0
    info = ghostify.conversion_info(ghost)
    errs = [r["heldout_error"] for r in info.layer_info.values() if "heldout_error" in r]
    print(f"{args.model} ratio {args.ratio} cheap={args.cheap or 'default'} init=calib, "
          f"{sum(len(b) for b in batches)} images (+{args.calib_augment} views) "
          f"{tuple(batches[0].shape[1:])}, {len(info.plan.converted)} layers, threads {torch.get_num_threads()}, "
          f"{'hooks' if args.hooks else 'lockstep'}: {seconds:.1f} s, CPU {cpu:.0f} s, "
          f"load {os.getloadavg()[0]:.1f} (goal < {GOAL_S:.0f} s: "
          f"{'met' if seconds < GOAL_S else 'missed'}); median held-out layer error "
          f"{sorted(errs)[len(errs) // 2]:.3f}; peak memory {peak_gib():.2f} GiB ({before:.2f} GiB before the "
          "conversion)")


def peak_gib() -> float:
    """The process's peak resident memory so far (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
