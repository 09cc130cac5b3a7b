"""ImageNet ResNet-50 -> Ghost-ResNet-50 at ratio 2 and 4: top-1 with no training, then after 1 epoch of KD.

For a user with ImageNet and a GPU (the development machines have neither the weights nor
ImageNet). Per ratio, one ``ghostify.finetune`` run of the shipped recipe
``recipes/imagenet_resnet50_r2.yaml`` with these options: torchvision's
``ResNet50_Weights.IMAGENET1K_V1`` (``--weights``), converted with ``init="calib"`` and
calib's default cheap op (1x1 mix) on ``--calib`` images of ``--train`` spread evenly over
its classes (no augmentation); the original, the converted model before any training and
the model after ``--epochs`` of knowledge distillation from the original are evaluated on
``--val`` (resize 256, centre crop 224): top-1, and top-1 agreement with the original.
The learning rate is the recipe's, scaled linearly with ``--batch-size``.

    python benchmarks/imagenet_resnet50.py --train /data/imagenet/train --val /data/imagenet/val --out runs/in-r50
    torchrun --nproc_per_node 8 benchmarks/imagenet_resnet50.py --train ... --val ... --batch-size 512 --out ...
    python benchmarks/imagenet_resnet50.py ... --out runs/in-r50 --resume     # continue an interrupted run
    python benchmarks/imagenet_resnet50.py ... --set train.ema_decay=0.999    # any other recipe key

Outputs in ``--out``: one run folder per ratio (``r2/``, ``r4/``: the fine-tuning run's own
files, ``final.safetensors`` among them), ``results.json`` and ``results.md`` (the table, with
the published figures to compare with). A non-empty ``--out`` is refused unless ``--force``
(replace the runs) or ``--resume`` (keep finished ratios, continue an interrupted one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ghostify.errors import GhostifyError
from ghostify.outputs import atomic_write, to_json
from ghostify.ratio import check_ratio
from ghostify.train.distributed import setup_dist
from ghostify.train.recipe import Recipe, diff, from_dict, load_recipe, to_dict
from ghostify.train.run import finetune
from ghostify.zoo.models import get_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "imagenet_resnet50_r2.yaml"

ANCHORS = [
    "GhostNet paper (Han et al., CVPR 2020, Table 5), trained from scratch: ResNet-50 75.3 % at 4.1 G MACs; "
    "Ghost-ResNet-50 s=2 75.0 % at 2.2 G, s=4 74.1 % at 1.2 G",
    "AIMET (Qualcomm), ResNet-50 compressed by spatial SVD + channel pruning to 50 % of the MACs: 75.75 % after "
    "fine-tuning",
    "No training-free result at 2x on ResNet-50 is published that we found.",
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="ImageNet train/ (one subfolder of images per class)")
    ap.add_argument("--val", required=True, help="ImageNet val/ in the same class folders")
    ap.add_argument("--out", required=True, help="output folder (refused when not empty, unless --force/--resume)")
    ap.add_argument("--ratios", nargs="+", type=_ratio, default=[2, 4])
    ap.add_argument("--calib", type=int, default=1024, help="calibration images, spread over train/'s classes")
    ap.add_argument("--epochs", type=float, default=1.0, help="epochs of KD fine-tuning")
    ap.add_argument("--batch-size", type=int, default=256, help="global batch (split over torchrun's processes)")
    ap.add_argument("--workers", type=int, default=8, help="data-loading processes")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda when available")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--model", default="resnet50", help="torchvision name, package.module:callable or checkpoint")
    ap.add_argument("--weights", default="IMAGENET1K_V1", help="a weights enum name, DEFAULT, none, or a file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other recipe key, e.g. --set loss.feature_weight=1")
    ap.add_argument("--force", action="store_true", help="replace the runs in a non-empty --out")
    ap.add_argument("--resume", action="store_true", help="continue in --out: finished ratios are kept")
    return ap.parse_args(argv)


def _ratio(text: str):
    try:
        return check_ratio(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def base_recipe(args) -> Recipe:
    """The shipped ImageNet recipe with this script's options (the ratio is set per run)."""
    cfg = load_recipe(RECIPE)
    sets = [f"model.name={args.model}", f"model.weights={args.weights}", "conversion.init=calib",
            "conversion.cheap=null", "conversion.dw_size=null", f"conversion.calib_size={args.calib}",
            f"data.train=imagefolder:{_abs(args.train)}", f"data.val=imagefolder:{_abs(args.val)}",
            f"data.image_size={args.image_size}", f"data.workers={args.workers}", f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}", f"train.device={args.device}",
            f"optim.lr={cfg.optim.lr * args.batch_size / cfg.train.batch_size:g}"]
    return from_dict(to_dict(cfg), sets + args.overrides)


def _abs(path: str) -> Path:
    return Path(path).expanduser().resolve()  # the runs' recipes hold it: --resume works from any folder


def check_out(out: Path, force: bool, resume: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not out.is_dir():
            raise GhostifyError(f"--out '{out}' is a file; give a folder")
        if not (force or resume):
            raise GhostifyError(f"--out '{out}' is not empty: choose another folder, --resume it, or replace its "
                                "runs with --force")


def run_ratio(base: Recipe, ratio, out: Path, args) -> dict:
    """One ratio: the fine-tuning run's report (read back when --resume finds the run finished)."""
    cfg = from_dict(to_dict(base), [f"name=imagenet_r{ratio}", f"conversion.ratio={ratio}"])
    run = out / f"r{ratio}"
    cfg.output_dir = str(run)
    if args.resume and (run / "report.json").is_file():
        report = json.loads((run / "report.json").read_text())
        changed = [k for k in diff(from_dict(report["recipe"]), cfg) if k not in ("output_dir", "name")]
        if changed:
            raise GhostifyError(f"--resume: the finished run '{run}' used other settings ({', '.join(changed)}); "
                                "run into a new --out, or replace it with --force")
        return report
    if args.resume and (run / "last.ckpt").is_file():
        return finetune(cfg, resume=run / "last.ckpt").report
    return finetune(cfg, force=args.force or args.resume).report


def row(ratio, r: dict) -> dict:
    return {"ratio": ratio, "macs": r["macs_after"], "params": r["params_after"],
            "macs_ratio": r["macs_after"] / r["macs_before"], "params_ratio": r["params_after"] / r["params_before"],
            "training_free_top1": r["before"].get("top1"), "training_free_agree_top1": r["before"].get("agree_top1"),
            "kd_top1": r["after"].get("top1"), "kd_agree_top1": r["after"].get("agree_top1"), "kd_epochs": r["epochs"],
            "kd_steps": r["steps"], "train_seconds": r["train_seconds"], "world_size": r["world_size"],
            "device": r["device"], "val_examples": r["before"].get("examples")}


def published_top1(model: str, weights: str) -> float | None:
    """torchvision's documented ImageNet top-1 of ``weights`` (from the enum's metadata; no download)."""
    try:
        import torchvision

        return torchvision.models.get_model_weights(model)[weights].meta["_metrics"]["ImageNet-1K"]["acc@1"]
    except (KeyError, ValueError, AttributeError):
        return None


def table(original: dict, rows: list[dict]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"
    epochs = rows[0]["kd_epochs"] if rows else 0
    lines = ["| model | ratio | MACs | params | top-1, no training | agreement, no training | "
             f"top-1 after KD ({epochs} epoch{'s' * (epochs != 1)}) | agreement after KD |",
             "|---|---|---|---|---|---|---|---|",
             f"| original | - | {original['macs'] / 1e9:.3g} G | {original['params'] / 1e6:.3g} M | "
             f"{pct(original['top1'])} | - | - | - |"]
    for r in rows:
        lines.append(f"| Ghost | {r['ratio']} | {r['macs'] / 1e9:.3g} G ({r['macs_ratio']:.3f}) | "
                     f"{r['params'] / 1e6:.3g} M ({r['params_ratio']:.3f}) | {pct(r['training_free_top1'])} | "
                     f"{pct(r['training_free_agree_top1'])} | {pct(r['kd_top1'])} | {pct(r['kd_agree_top1'])} |")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    """Run every ratio, print the table and the published figures, write them to --out; the results (rank 0)."""
    args = parse_args(argv)
    out = Path(args.out)
    try:
        dist = setup_dist(args.device)  # under torchrun: one process group for every ratio's run
    except GhostifyError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        if dist.main:
            check_out(out, args.force, args.resume)
        base = base_recipe(args)
        m = base.model  # offline: fail now, naming the fix, not after the data scan
        get_model(m.name, weights=m.weights, **m.kwargs)
        reports = [(ratio, run_ratio(base, ratio, out, args)) for ratio in args.ratios]
    except GhostifyError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
    if not dist.main:
        return None
    first = reports[0][1]
    original = {"macs": first["macs_before"], "params": first["params_before"],
                "top1": first["original"].get("top1"), "published_top1": published_top1(m.name, m.weights)}
    rows = [row(ratio, r) for ratio, r in reports]
    anchors = ANCHORS + ([f"torchvision's published top-1 of {m.name} {m.weights}: "
                          f"{original['published_top1']:.2f} %"] if original["published_top1"] else [])
    md = table(original, rows) + "\n\nPublished, to compare with:\n" + "".join(f"- {a}\n" for a in anchors)
    results = {"model": m.name, "weights": m.weights, "original": original, "rows": rows,
               "anchors": anchors, "recipe": to_dict(base), "argv": sys.argv if argv is None else list(argv)}
    atomic_write(out / "results.json", to_json(results, indent=2) + "\n", force=True)
    atomic_write(out / "results.md", f"# {m.name} -> Ghost on ImageNet\n\n{md}", force=True)
    print(md + f"\nwritten: {out / 'results.json'}, {out / 'results.md'}; runs in {out}{os.sep}r*")
    return results


if __name__ == "__main__":
    main()
