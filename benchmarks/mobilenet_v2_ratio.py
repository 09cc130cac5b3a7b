"""Why does MobileNetV2 break at ratio 1.1 (each converted conv keeps 10 of its 11 filters)?

Every convertible conv of torchvision's ImageNet MobileNetV2 at one uniform (fractional) ratio,
``cheap="auto"`` where a fit chooses, compared per layer and end to end with simple baselines
at the same ratio, all measured on crops of photos the fits never saw (``photos:heldout``):

- ``bound``: no conversion. Per conv, the best rank-``m`` reconstruction of its held-out
  outputs (``m = ceil(n / ratio)``; projection on the top-``m`` principal components, free
  bias): what any Ghost layer whose ghosts are linear in its intrinsic maps (``mix``) can reach
  at best, fed the original input; ``bound/calib`` takes the components from the calibration
  crops instead (a perfect per-layer fit on them).
- ``calib``: ghostify's default calibrated conversion (sequential, intrinsic refit).
- ``calib, no refit``: the same with the intrinsic filters copied (``refit_intrinsic=False``).
- ``mean``: the calibrated intrinsic channels, every ghost channel set to its calibration mean:
  channel pruning with bias compensation, at the same MACs as the primary conv.
- ``copy``: the weight-space init (no data).
- ``calib xK``: ``calib`` on K times as many calibration crops (``--more``).

Per layer: relative output error on the held-out crops, the layer alone (fed the original's
input; ``ghostify.layer_errors``), BN-weighted as calibration measures it; summarised per layer
kind (1x1 expansion, 1x1 projection, the last 1x1 conv). End to end: top-1/top-5 agreement and
KL to the original on the held-out crops.

    python benchmarks/mobilenet_v2_ratio.py                         # ratio 1.1, 128 + 128 crops, x10 calib
    python benchmarks/mobilenet_v2_ratio.py --ratio 1.25 --more 4
    python benchmarks/mobilenet_v2_ratio.py --quick                 # 16 + 16 crops: checks that it runs

Needs the MobileNetV2 weights and the photo corpus (``python -m benchmarks.assets fetch``).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from benchmarks.trunk_fidelity import output_moments, projection_errors


def kind_of(name: str) -> str:
    if name.endswith("conv.0.0"):
        return "expansion"
    if name.endswith("conv.2") or name.endswith("conv.1"):
        return "projection"
    return "last"


@torch.no_grad()
def ghosts_to_means(model, ghost, batches):
    """``ghost`` with every ghost channel replaced by its mean output on ``batches`` (pruning with bias
    compensation): the cheap op's weights zeroed, its bias set to the original conv's channel means."""
    import ghostify

    names = [n for n, m in ghost.named_modules() if isinstance(m, ghostify.GhostConv2d) and m.cheap is not None]
    moments = output_moments(model, batches, {}, names)
    for name in names:
        layer = ghost.get_submodule(name)
        s, _, n = moments[name]
        m = layer.intrinsic_channels
        slots = layer.channel_map[m:].cpu()
        conv = layer.cheap.mix if hasattr(layer.cheap, "mix") else layer.cheap.conv
        if getattr(layer.cheap, "dw", None) is not None:
            layer.cheap.dw.weight.zero_()
        conv.weight.zero_()
        conv.bias[: len(slots)] = (s[slots] / n).to(conv.bias.dtype)
    return ghost


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=1.1)
    p.add_argument("--calib", type=int, default=128, help="calibration crops (photos:calib)")
    p.add_argument("--heldout", type=int, default=128, help="held-out crops (photos:heldout)")
    p.add_argument("--more", type=int, default=10, help="the 'calib xK' row: K times the calibration crops (0: none)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="16 + 16 crops, no xK row: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.calib, args.heldout, args.more = 16, 16, 0

    import ghostify
    from ghostify.graph import bn_output_scales

    torch.set_num_threads(2)
    ghostify.install_offline_weights()
    model = ghostify.get_model("mobilenet_v2", weights="IMAGENET1K_V1")
    crops = lambda split, k: [x for x, _ in ghostify.resolve_data(f"photos:{split}", batch_size=32, limit=k)]
    calib, held = crops("calib", args.calib), crops("heldout", args.heldout)
    ratio = args.ratio
    spec = dict(ratio=ratio, cheap="auto", dw_size=1)
    print(f"MobileNetV2 IMAGENET1K_V1, uniform ratio {ratio:g}, {args.calib} calib crops, {args.heldout} held-out "
          f"crops (other photos), torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    default = ghostify.convert(model, init="calib", calib_data=calib, **spec)
    names = [e.name for e in ghostify.conversion_info(default).plan.converted]
    scales = bn_output_scales(torch.fx.symbolic_trace(model), names)  # as calibration weighs the channels
    rows = {"calib": default}
    print(f"  calib: {time.perf_counter() - t0:.0f} s", flush=True)
    rows["calib, no refit"] = ghostify.convert(model, init="calib", calib_data=calib, refit_intrinsic=False, **spec)
    rows["mean"] = ghosts_to_means(model, ghostify.convert(model, init="calib", calib_data=calib, **spec), calib)
    rows["copy"] = ghostify.convert(model, init="copy", ratio=ratio, cheap="mix", dw_size=1)
    if args.more:
        more = crops("calib", args.calib * args.more)
        t0 = time.perf_counter()
        rows[f"calib x{args.more}"] = ghostify.convert(model, init="calib", calib_data=more, **spec)
        print(f"  calib x{args.more} ({sum(map(len, more))} crops): {time.perf_counter() - t0:.0f} s", flush=True)

    held_m = output_moments(model, held, scales, names)
    calib_m = output_moments(model, calib, scales, names)
    per_layer: dict[str, dict[str, float]] = {"bound": {}, "bound/calib": {}}
    for name in names:
        n = held_m[name][1].shape[0]
        b, bc, _ = projection_errors(calib_m[name], held_m[name], math.ceil(n / ratio))
        per_layer["bound"][name], per_layer["bound/calib"][name] = b, bc
    end_to_end = {}
    for label, ghost in rows.items():
        per_layer[label] = ghostify.layer_errors(model, ghost, held, progress=False)
        res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
        rep = ghostify.report(model, ghost)
        end_to_end[label] = {"macs": rep.macs_after / rep.macs_before,
                             **{k: res[k] for k in ("agree_top1", "agree_top5", "kl")}}
    print_tables(names, per_layer, end_to_end)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ratio": ratio, "per_layer": per_layer, "end_to_end": end_to_end}, f, indent=1)


def print_tables(names, per_layer, end_to_end):
    kinds = sorted({kind_of(n) for n in names})
    print("\nheld-out relative error per layer, the layer alone (median, range), by kind")
    print(f"{'':16} " + " ".join(f"{k + f' ({sum(kind_of(n) == k for n in names)})':>26}" for k in kinds))
    for label, errs in per_layer.items():
        cells = []
        for k in kinds:
            v = sorted(errs[n] for n in names if kind_of(n) == k and n in errs)
            cells.append(f"{v[len(v) // 2]:.3f} ({v[0]:.3f}-{v[-1]:.3f})" if v else "-")
        print(f"{label:16} " + " ".join(f"{c:>26}" for c in cells))
    print("\nend to end on the held-out crops")
    print(f"{'':16} {'MACs':>6} {'top-1 agr':>9} {'top-5 agr':>9} {'KL':>7}")
    for label, r in end_to_end.items():
        print(f"{label:16} {r['macs']:6.3f} {r['agree_top1']:9.3f} {r['agree_top5']:9.3f} {r['kl']:7.3f}")


if __name__ == "__main__":
    main()
