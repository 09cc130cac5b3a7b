"""How channel counts set the latency in ONNX Runtime on CPU, and what ``round_to`` buys a Ghost model.

Two measurements, each in alternation in one process (``ghostify.deploy.runtime.runtime_latency``: exported
through ghostify's deploy pass, ONNX Runtime CPU, ``--threads`` intra-op threads, median of ``--repeats``):

1. a MobileNetV2-like block (1x1 conv 96 -> c, depthwise 3x3 on c maps, 1x1 conv c -> 24, 56x56) for channel
   counts ``c`` around 96: how much a count that is not a multiple of 4 or 8 costs;
2. torchvision's MobileNetV2 converted with one fractional ratio (``mix`` at 1.4742 and ``dw`` at 1.2557, the
   ratios that meet 0.9 of its MACs in ``benchmarks/peers.py``), intrinsic counts as they are
   (``round_to=1``) and rounded to multiples of 4 and 8. Weights are random (``init="random"``): only the
   speed is measured here; ``benchmarks/peers.py --round-to 8`` measures the fidelity.

Usage::

    python -m benchmarks.channel_rounding            # about 2 min on 2 cores; run it on an idle machine
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import ghostify
from ghostify.deploy.runtime import runtime_latency


def block(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(96, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(),
                         nn.Conv2d(c, 24, 1)).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--counts", type=int, nargs="+", default=[96, 95, 94, 93, 92, 90, 88, 80])
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--quick", action="store_true", help="smoke run: two counts, 3 repeats, 64 px (figures mean nothing)")
    args = ap.parse_args(argv)
    size = 64 if args.quick else 224
    if args.quick:
        args.counts, args.repeats, args.round_to = args.counts[:2], 3, [1, 8]
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    timed = runtime_latency({f"c={c}": block(c) for c in args.counts}, torch.randn(1, 96, 56, 56), runtime="ort",
                            threads=args.threads, repeats=args.repeats)
    base = timed[f"c={args.counts[0]}"]["median_ms"]
    print(f"## 1x1 96->c, dw 3x3 on c maps, 1x1 c->24 at 56x56: ORT batch 1, {args.threads} threads")
    print("| c | c mod 8 | ms | vs first |\n|---|---|---|---|")
    for c in args.counts:
        ms = timed[f"c={c}"]["median_ms"]
        print(f"| {c} | {c % 8} | {ms:.3f} | {ms / base:.2f}x |")

    import torchvision

    net = torchvision.models.mobilenet_v2().eval()
    x0 = torch.zeros(1, 3, size, size)
    macs0 = ghostify.count(net, x0).macs
    models, rows = {"original": net}, [("original", "-", "-", 1.0)]
    for cheap, ratio, dw in (("mix", 1.4742, 1), ("dw", 1.2557, 3)):
        for q in args.round_to:
            g = ghostify.convert(net, ratio=ratio, cheap=cheap, dw_size=dw, init="random", round_to=q).eval()
            off = sum(e.intrinsic % 4 != 0 for e in g.ghostify_info.plan.converted)
            key = f"{cheap} {ratio} round_to {q}"
            models[key] = g
            rows.append((key, off, len(g.ghostify_info.plan.converted), ghostify.count(g, x0).macs / macs0))
    timed = runtime_latency(models, torch.randn(1, 3, size, size), runtime="ort", threads=args.threads,
                            repeats=args.repeats)
    base = timed["original"]["median_ms"]
    print(f"\n## MobileNetV2, {size} px: ORT batch 1, {args.threads} threads")
    print("| model | intrinsic counts not a multiple of 4 | MACs | ms | vs original |\n|---|---|---|---|---|")
    for key, off, n, macs in rows:
        ms = timed[key]["median_ms"]
        print(f"| {key} | {off if n == '-' else f'{off} of {n}'} | {macs:.3f} | {ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
