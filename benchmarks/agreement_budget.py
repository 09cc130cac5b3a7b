"""The largest MACs saving that keeps >= 90 % top-1 agreement with the original on held-out photos, training-free.

For an ImageNet classifier (MobileNetV2 or EfficientNet-Lite0), one sensitivity table (``mix``, ratios 2/3/4 or
``--ratios``;
``--sensitivity proxy``: each conv's relative output error after its fit, on calibration batches the fit left out;
``alone``: each conv fitted on the first 3/4 of the calibration crops, then put alone into the original and the
KL of the logits measured on the last 1/4, crops of other photos) and then, per MACs target, the
budgeted allocation (``ghostify.allocate``: the ratio per conv, or keep it, with the least predicted loss)
converted with calibration; top-1/top-5 agreement with the original on crops of ``photos:heldout`` (other
photos than the calibration crops'). Mild targets convert few layers: the question is how few, and whether
those keep the original's decisions.

    python -m benchmarks.agreement_budget                                   # MobileNetV2, 0.98 0.95 0.9
    python -m benchmarks.agreement_budget --model efficientnet_lite0 --targets 0.99 0.97
    python -m benchmarks.agreement_budget --sensitivity alone              # ranked by their effect on the logits
    python -m benchmarks.agreement_budget --sensitivity alone --ratios 1.5 2 3 4  # milder ratios too
    python -m benchmarks.agreement_budget --quick                           # 16 + 16 crops: checks that it runs

Needs the photo corpus and the weights (``python -m benchmarks.assets fetch``).
"""
from __future__ import annotations

import argparse
import json
import time


RATIOS = (2, 3, 4)


def ratio_arg(text: str) -> int | float:
    """A candidate ratio from the command line: ``ghostify.ratio.check_ratio``'s number (an int where whole),
    and > 1 (keeping a conv is always a candidate of the allocation)."""
    from ghostify.ratio import check_ratio

    try:
        r = check_ratio(float(text))
    except ValueError:
        r = None
    if r is None or r <= 1:
        raise argparse.ArgumentTypeError(f"a ratio is a number > 1 (got {text!r}); e.g. 1.5, 2 or 4")
    return r


def mix_config(ratios, round_to: int = 1):
    """The calibrated ``mix`` 1x1 configuration the tables and the allocations share, at the smallest ratio."""
    import ghostify

    return ghostify.GhostConfig(ghostify.LayerSpec(min(ratios), 1, "calib", "mix", round_to))


def sensitivity_table(model, calib: list, method: str, input_size, ratios=RATIOS, measure=None, calib_augment=0,
                      round_to=1):
    """The ``mix`` sensitivity table at ``ratios``: ``proxy`` fitted on every calibration batch, or ``alone``
    fitted on the first 3/4 of them and judged (``measure``: the KL of the logits by default) on the last 1/4;
    ``calib_augment`` augmented views of the fitted batches are fitted on too; ``round_to``: as ``LayerSpec``'s."""
    import ghostify

    cut = len(calib) if method == "proxy" else 3 * len(calib) // 4
    return ghostify.sensitivity(model, ratios=ratios, config=mix_config(ratios, round_to), calib_data=calib[:cut],
                                eval_data=calib[cut:] or None, method=method, measure=measure, input_size=input_size,
                                progress=False, calib_augment=calib_augment)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.98, 0.95, 0.9], help="MACs fractions")
    p.add_argument("--calib", type=int, default=256, help="calibration crops (photos:calib)")
    p.add_argument("--heldout", type=int, default=376, help="held-out crops (photos:heldout)")
    p.add_argument("--sensitivity", default="proxy", choices=["proxy", "alone"], help="how the convs are ranked")
    p.add_argument("--ratios", nargs="+", type=ratio_arg, default=list(RATIOS),
                   help="candidate ratios per conv (besides keeping it), e.g. 1.5 2 3 4")
    p.add_argument("--goal", type=float, default=0.9, help="top-1 agreement to keep")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="16 + 16 crops, one target: checks that it runs")
    args = p.parse_args(argv)
    args.ratios = tuple(args.ratios)
    if args.quick:
        args.calib, args.heldout, args.targets = 16, 16, args.targets[:1]

    import torch

    import ghostify
    from benchmarks.distill_photos import build

    torch.manual_seed(0)
    model = build(args.model).eval()
    calib = [x for x, _ in ghostify.resolve_data("photos:calib", batch_size=8 if args.quick else 32, limit=args.calib)]
    held = [x for x, _ in ghostify.resolve_data("photos:heldout", batch_size=64, limit=args.heldout)]
    size = (1, *calib[0].shape[1:])
    t0 = time.perf_counter()
    table = sensitivity_table(model, calib, args.sensitivity, size, args.ratios)
    print(f"{args.model}: sensitivity table ({args.sensitivity}, mix, ratios {'/'.join(map(str, args.ratios))}) on "
          f"{sum(map(len, calib))} calibration crops: {time.perf_counter() - t0:.0f} s; "
          f"{sum(map(len, held))} held-out crops", flush=True)
    rows = []
    for target in args.targets:
        try:
            plan = ghostify.allocate(model, target_macs=target, table=table, ratios=args.ratios,
                                     config=mix_config(args.ratios), input_size=size, progress=False)
        except ghostify.GhostifyError as exc:
            print(f"  target {target}: not reachable ({str(exc).splitlines()[0]})", flush=True)
            continue
        t0 = time.perf_counter()
        ghost = ghostify.convert(model, plan=plan.plan, calib_data=calib)
        res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
        rep = ghostify.report(model, ghost)
        converted = sorted((n, r) for n, r in plan.choices.items() if r is not None)
        row = {"target": target, "macs": rep.macs_after / rep.macs_before, "converted": converted,
               "of": len(plan.choices), "top1": res["agree_top1"], "top5": res["agree_top5"], "kl": res["kl"],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"  target {target}: MACs {row['macs']:.3f}, {len(converted)} of {len(plan.choices)} convs converted "
              f"({', '.join(f'{n} r{r}' for n, r in converted[:6])}{' ...' if len(converted) > 6 else ''}); "
              f"held-out top-1 agreement {row['top1']:.3f}, top-5 {row['top5']:.3f}, KL {row['kl']:.3f}", flush=True)
    ok = [r for r in rows if r["top1"] >= args.goal]
    best = min(ok, key=lambda r: r["macs"]) if ok else None
    print(f"largest saving at >= {args.goal:.0%} top-1 agreement among the targets: "
          + (f"{1 - best['macs']:.3f} of the MACs (target {best['target']})" if best else "none"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "sensitivity": args.sensitivity, "ratios": args.ratios, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
