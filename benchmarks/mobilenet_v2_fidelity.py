"""Training-free MobileNetV2 (ImageNet weights): per-layer fidelity table and the largest
MACs saving that keeps >= 90 % top-1 agreement on photos never used for calibration.

1. Per-layer table: every convertible conv is calibrated alone (``sequential=False``) on
   ``photos:calib`` crops at ratio 2, 3, 4 with cheap ops dw 1x1, dw 3x3 and mix (1x1 from
   the intrinsic maps), and its relative output error is measured on ``photos:heldout``
   crops (ghostify.layer_errors: the layer fed the original model's input).
2. Layer choice: layers sorted by their best held-out error at ratio 2 (cheap op chosen per
   layer from the table); convert the k best with sequential calibration and measure top-1
   agreement with the original on the held-out crops; bisect for the largest k with
   agreement >= the goal.

    python benchmarks/mobilenet_v2_fidelity.py                 # 256 calib crops, 256 held-out crops
    python benchmarks/mobilenet_v2_fidelity.py --calib 128 --heldout 128 --ratios 2
    python benchmarks/mobilenet_v2_fidelity.py --calib 128 --heldout 128 --uniform 1.1,1.25,2   # uniform only

``--uniform`` converts every convertible conv at each (possibly fractional) ratio with
``cheap=auto`` (sequential calibration) and prints agreement on the held-out crops and each
layer's held-out error, then stops.
"""
from __future__ import annotations

import argparse
import json
import time

FORMS = {"dw1": {"cheap": "dw", "dw_size": 1}, "dw3": {"cheap": "dw", "dw_size": 3},
         "mix": {"cheap": "mix", "dw_size": 1}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", type=int, default=256, help="calibration crops (photos:calib)")
    p.add_argument("--heldout", type=int, default=256, help="held-out crops (photos:heldout)")
    p.add_argument("--ratios", default="2,3,4")
    p.add_argument("--goal", type=float, default=0.90)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="16 + 16 crops, ratio 2: checks the script only")
    p.add_argument("--uniform", default=None, help="only: uniform conversion at these ratios, e.g. 1.1,1.25,2")
    args = p.parse_args(argv)
    if args.quick:
        args.calib, args.heldout, args.ratios = 16, 16, "2"

    import ghostify

    ghostify.install_offline_weights()
    model = ghostify.get_model("mobilenet_v2", weights="IMAGENET1K_V1")
    calib = [x for x, _ in ghostify.resolve_data("photos:calib", batch_size=32, limit=args.calib)]
    held = [x for x, _ in ghostify.resolve_data("photos:heldout", batch_size=32, limit=args.heldout)]
    base = ghostify.report(model, ghostify.convert(model, init="none"))
    layer_macs = {r.name: r.macs_before for r in base.layers if r.action == "convert"}
    total_macs = base.macs_before
    print(f"MobileNetV2 IMAGENET1K_V1, {sum(map(len, calib))} calib crops, {sum(map(len, held))} held-out crops, "
          f"{len(layer_macs)} convertible convs, {total_macs / 1e6:.0f} M MACs")

    if args.uniform:
        for ratio in (float(r) for r in args.uniform.split(",")):
            t0 = time.perf_counter()
            ghost = ghostify.convert(model, ratio=ratio, init="calib", calib_data=calib, cheap="auto", dw_size=1)
            res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
            macs = ghostify.report(model, ghost).macs_after / total_macs
            info = ghost.ghostify_info.layer_info
            kinds = {}
            for name, rec in info.items():
                kind = "expansion" if name.endswith("conv.0.0") else "projection" if name.endswith("conv.2") else "other"
                kinds.setdefault(kind, []).append(rec.get("heldout_error", rec["calib_error"]))
            errs = ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} (median {sorted(v)[len(v) // 2]:.2f})"
                             for k, v in sorted(kinds.items()))
            print(f"uniform ratio {ratio:g}, cheap auto: MACs x{macs:.3f}, top-1 agreement {res['agree_top1']:.3f}, "
                  f"top-5 {res['agree_top5']:.3f}, KL {res['kl']:.3f}; held-out layer errors in sequence: {errs} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return
    table: dict[str, dict[str, float]] = {}
    for ratio in map(int, args.ratios.split(",")):
        for form, spec in FORMS.items():
            t0 = time.perf_counter()
            ghost = ghostify.convert(model, ratio=ratio, init="calib", calib_data=calib, sequential=False, **spec)
            errs = ghostify.layer_errors(model, ghost, held, progress=False)
            table[f"r{ratio}/{form}"] = errs
            print(f"  r{ratio}/{form}: median held-out layer error {sorted(errs.values())[len(errs) // 2]:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    cols = list(table)
    print("\nper-layer relative output error on held-out photos (each layer alone)")
    print(f"{'layer':<22} {'MACs':>6} " + " ".join(f"{c:>8}" for c in cols))
    for name in layer_macs:
        print(f"{name:<22} {layer_macs[name] / 1e6:>5.1f}M "
              + " ".join(f"{table[c][name]:>8.3f}" if name in table[c] else f"{'-':>8}" for c in cols))
    print("(-: the plan skips the layer in that form, which would cost more MACs than the conv)")

    r2 = [c for c in cols if c.startswith("r2/")]
    best = {n: min((c for c in r2 if n in table[c]), key=lambda c: table[c][n])
            for n in layer_macs if any(n in table[c] for c in r2)}
    order = sorted(best, key=lambda n: table[best[n]][n])
    results = {}

    def agreement(k):
        if k not in results:
            chosen = order[:k]
            overrides = {n: FORMS[best[n].split("/")[1]] for n in chosen}
            ghost = ghostify.convert(model, ratio=2, init="calib", calib_data=calib, include=chosen,
                                     overrides=overrides) if k else model
            res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
            macs = ghostify.report(model, ghost).macs_after if k else total_macs
            results[k] = {"agree_top1": res["agree_top1"], "agree_top5": res["agree_top5"], "kl": res["kl"],
                          "macs": macs / total_macs}
            print(f"  {k:>2} layers: MACs x{macs / total_macs:.3f}, top-1 agreement {res['agree_top1']:.3f}, "
                  f"top-5 {res['agree_top5']:.3f}, KL {res['kl']:.3f}", flush=True)
        return results[k]["agree_top1"]

    print(f"\nconverting the k layers with the lowest held-out error (ratio 2, sequential calib); goal agreement "
          f">= {args.goal}")
    lo, hi = 0, len(order)
    if agreement(hi) >= args.goal:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if agreement(mid) >= args.goal else (lo, mid)
    r = results.get(lo) or {"macs": 1.0, "agree_top1": 1.0}
    print(f"\nlargest saving with agreement >= {args.goal}: {lo} layers, MACs x{r['macs']:.3f} "
          f"(saves {1 - r['macs']:.1%}), agreement {r['agree_top1']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "order": order, "best": best, "search": results}, f, indent=1)


if __name__ == "__main__":
    main()
