"""CPU latency of original vs Ghost-converted models, measured side by side in one process.

For each model: MACs before/after (fvcore, 1 multiply-add = 1, batch 1), then for each batch
size the forward latency of the original and the converted model, measured alternately by
``ghostify.measure_latency`` (warm-up, fixed intra-op threads, inference mode): median,
p10 and p90 in ms, and the converted/original ratio of the medians.

    python benchmarks/latency.py                        # resnet18 resnet50 vgg16_bn mobilenet_v2, batch 1 and 8
    python benchmarks/latency.py --ratio 2,4 --batch-sizes 1   # several ratios, measured in the same alternation
    python benchmarks/latency.py --no-fold              # also the converted model without channel-order folding
    python benchmarks/latency.py --reorder              # also the channel-reordering micro-benchmark
    python benchmarks/latency.py --reorder-only         # only the micro-benchmark
    python benchmarks/latency.py --quick                # tiny run that checks the script (figures meaningless)

Run it on an otherwise idle machine; the models are measured in alternation so that drift
hits all of them alike, but other load on the cores still inflates and spreads the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

DEFAULT_MODELS = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"]
GOAL = ("resnet50", 1, 0.65)  # model, batch, max converted/original median latency
# (C, H, B): output channels, spatial size, batch. Defaults: the outputs of ResNet-50's
# bottlenecks (conv3 of each stage), which meet a residual add and so cannot be folded.
DEFAULT_SHAPES = [(256, 56, 1), (512, 28, 1), (1024, 14, 1), (2048, 7, 1),
                  (256, 56, 8), (512, 28, 8), (1024, 14, 8), (2048, 7, 8)]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def _shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.replace(" ", "").split(";"):
        if item:
            c, h, b = (int(t) for t in item.split("x"))
            out.append((c, h, b))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"torchvision names (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--ratio", type=_ints, default=[2], help="ratio, or several: '2,4' (all measured alternately)")
    p.add_argument("--dw-size", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8], help="e.g. '1,8' (default)")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed runs per model after warm-up; the median is reported (>= 10 advised; default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, fixed for all models (default 2)")
    p.add_argument("--weights", default="none",
                   help="'none' (random; latency does not depend on the values) or DEFAULT (needs the network, "
                        "except mobilenet_v2 after ghostify.install_offline_weights())")
    p.add_argument("--no-fold", action="store_true",
                   help="also measure the converted model with fold=False (channels reordered at run time)")
    p.add_argument("--reorder", action="store_true", help="also run the channel-reordering micro-benchmark")
    p.add_argument("--reorder-only", action="store_true", help="run only the channel-reordering micro-benchmark")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="micro-benchmark shapes 'CxHxB;...' (default: ResNet-50 bottleneck outputs at batch 1 and 8)")
    p.add_argument("--inner", type=int, default=50, help="micro-benchmark: calls per timed block (default 50)")
    p.add_argument("--json", metavar="PATH", help="also write all figures to PATH as JSON")
    p.add_argument("--quick", action="store_true", help="resnet18 at 64x64, batch 1, 3 repeats: checks the script only")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["resnet18"]
        args.size, args.batch_sizes, args.repeats, args.warmup = 64, [1], 3, 1
        args.shapes = args.shapes or [(64, 16, 1), (128, 8, 2)]
        args.inner = 3
    args.models = args.models or DEFAULT_MODELS
    if args.reorder or args.reorder_only:
        args.ratio = args.ratio[:1]  # the micro-benchmark takes one ratio
    args.shapes = args.shapes or DEFAULT_SHAPES
    if args.repeats < 2:
        p.error("--repeats must be >= 2 (p10/p90 need two runs)")
    return args


def environment(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"torch {torch.__version__}, {cpu}, {os.cpu_count()} logical CPUs, {threads} intra-op threads, "
            f"mkldnn={torch.backends.mkldnn.is_available()}")


# -- whole models -----------------------------------------------------------------------------------


def bench_model(name: str, args) -> dict:
    import torch

    import ghostify

    model = ghostify.get_model(name, weights=args.weights)
    models = {"original": model}
    x1 = torch.randn(1, 3, args.size, args.size)
    before = ghostify.count(model, x1)
    res = {"model": name, "ratio": args.ratio, "dw_size": args.dw_size, "size": args.size,
           "macs_before": before.macs, "params_before": before.params, "ghosts": {}, "latency": {}}
    print(f"\n== {name}  ratio {','.join(map(str, args.ratio))}, dw {args.dw_size}, {args.size}x{args.size} ==")
    for ratio in args.ratio:
        key = _ghost_key(ratio, args)
        t0 = time.perf_counter()
        ghost = ghostify.convert(model, ratio=ratio, dw_size=args.dw_size).eval()
        convert_s = time.perf_counter() - t0
        models[key] = ghost
        if args.no_fold:
            models[key + " (no fold)"] = ghostify.convert(model, ratio=ratio, dw_size=args.dw_size, fold=False).eval()
        info, after = ghost.ghostify_info, ghostify.count(ghost, x1)
        res["ghosts"][key] = {"ratio": ratio, "converted": len(info.plan.converted), "convs": len(info.plan.entries),
                              "folded": len(info.folded), "convert_s": convert_s, "macs_after": after.macs,
                              "params_after": after.params}
        if len(args.ratio) == 1:  # the single-ratio record keeps its flat fields
            res.update({k: v for k, v in res["ghosts"][key].items() if k != "ratio"})
        print(f"ratio {ratio}: converted {len(info.plan.converted)} of {len(info.plan.entries)} convs "
              f"({len(info.folded)} orders folded) in {convert_s:.1f} s; "
              f"MACs {_size(before.macs)} -> {_size(after.macs)} ({after.macs / before.macs:.3f}); "
              f"params {_size(before.params)} -> {_size(after.params)} ({after.params / before.params:.3f})")
    print(f"{'batch':>5}  {'model':<16} {'median ms':>10} {'p10':>9} {'p90':>9}  {'/original':>9}")
    for b in args.batch_sizes:
        x = torch.randn(b, 3, args.size, args.size)
        lat = ghostify.measure_latency(models, x, warmup=args.warmup, repeats=args.repeats, threads=args.threads)
        res["latency"][b] = lat
        base = lat["original"]["median_ms"]
        for key, r in lat.items():
            rel = "" if key == "original" else f"{r['median_ms'] / base:.3f}"
            print(f"{b:>5}  {key:<16} {r['median_ms']:>10.2f} {r['p10_ms']:>9.2f} {r['p90_ms']:>9.2f}  {rel:>9}")
    return res


def _ghost_key(ratio: int, args) -> str:
    return "ghost" if len(args.ratio) == 1 else f"ghost r{ratio}"


def _size(x: float) -> str:
    from ghostify.measure.counting import format_size

    return format_size(x)


# -- channel reordering micro-benchmark -------------------------------------------------------------


def reorder_variants(y, g, channel_map, inverse):
    """The three ways to produce the n output channels from intrinsic maps ``y`` and ghosts ``g``."""
    import torch

    m, n = y.shape[1], y.shape[1] + g.shape[1]

    def cat():  # internal order (what a folded layer emits): no reordering at all
        return torch.cat([y, g], dim=1)

    def scatter():  # GhostConv2d.forward: one index_copy_ per block into a fresh tensor
        out = y.new_empty((y.shape[0], n) + tuple(y.shape[2:]))
        out.index_copy_(1, channel_map[:m], y)
        out.index_copy_(1, channel_map[m:], g)
        return out

    def cat_select():  # concatenate, then gather into the original order (two copies)
        return torch.cat([y, g], dim=1).index_select(1, inverse)

    return {"cat": cat, "scatter (GhostConv2d)": scatter, "cat+index_select": cat_select}


def bench_reorder(args) -> list[dict]:
    import torch

    print(f"\n== channel reordering: ceil(C/{args.ratio[0]}) intrinsic maps + the ghost maps -> C channels in a "
          "random order ==")
    print(f"median per call over {args.repeats} blocks of {args.inner} calls, after {args.warmup} warm-up blocks; "
          f"variants alternate. GB/s counts bytes read + written once.")
    print(f"{'C':>5} {'H':>4} {'B':>3}  {'variant':<22} {'median us':>10} {'p10':>9} {'p90':>9} "
          f"{'/cat':>6} {'GB/s':>6}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.inference_mode():
            for c, h, b in args.shapes:
                m = -(-c // args.ratio[0])
                y, g = torch.randn(b, m, h, h, generator=gen), torch.randn(b, c - m, h, h, generator=gen)
                channel_map = torch.randperm(c, generator=gen)
                inverse = torch.empty_like(channel_map)
                inverse[channel_map] = torch.arange(c)
                fns = reorder_variants(y, g, channel_map, inverse)
                ref = fns["scatter (GhostConv2d)"]()
                assert torch.equal(fns["cat+index_select"](), ref), "the reordering variants disagree"
                assert torch.equal(fns["cat"]()[:, inverse], ref)
                times = {k: [] for k in fns}
                for i in range(args.warmup + args.repeats):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(args.inner):
                            fn()
                        if i >= args.warmup:
                            times[k].append((time.perf_counter() - t0) / args.inner * 1e6)
                nbytes = 2 * b * c * h * h * y.element_size()
                base = statistics.median(times["cat"])
                for k, ts in times.items():
                    q = statistics.quantiles(ts, n=10, method="inclusive")
                    med = statistics.median(ts)
                    rows.append({"C": c, "H": h, "B": b, "variant": k, "median_us": med, "p10_us": q[0],
                                 "p90_us": q[-1], "vs_cat": med / base, "gb_per_s": nbytes / med / 1e3})
                    print(f"{c:>5} {h:>4} {b:>3}  {k:<22} {med:>10.1f} {q[0]:>9.1f} {q[-1]:>9.1f} "
                          f"{med / base:>6.2f} {nbytes / med / 1e3:>6.1f}")
    finally:
        torch.set_num_threads(old)
    return rows


# -- main -------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    print(environment(args.threads))
    print(f"protocol: {args.warmup} warm-up + {args.repeats} timed runs per model, models alternate, "
          f"torch.inference_mode, {args.threads} threads" + ("  [--quick: figures mean nothing]" if args.quick else ""))
    out = {"environment": environment(args.threads), "args": {k: v for k, v in vars(args).items() if k != "json"},
           "models": [], "reorder": []}
    if not args.reorder_only:
        if args.weights.upper() == "DEFAULT":
            import ghostify

            ghostify.install_offline_weights()
        for name in args.models:
            out["models"].append(bench_model(name, args))
        summary(out["models"], args)
    if args.reorder or args.reorder_only:
        out["reorder"] = bench_reorder(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"\nwrote {args.json}")


def summary(results: list[dict], args) -> None:
    print(f"\n== summary: converted/original median latency ({args.threads} threads, {args.size}x{args.size}) ==")
    keys = [k for k in (next(iter(results[0]["latency"].values())) if results else {}) if k != "original"]
    print(f"{'model':<14} " + " ".join(f"{'MACs ' + k:>18}" for k in keys if k in results[0]["ghosts"]) + "  "
          + "  ".join(f"{'b' + str(b) + ' ' + k:>20}" for b in args.batch_sizes for k in keys))
    for r in results:
        cells = []
        for b in args.batch_sizes:
            lat = r["latency"][b]
            cells += [f"{lat[k]['median_ms'] / lat['original']['median_ms']:>20.3f}" for k in keys]
        macs = [f"{g['macs_after'] / r['macs_before']:>18.3f}" for g in r["ghosts"].values()]
        print(f"{r['model']:<14} " + " ".join(macs) + "  " + "  ".join(cells))
    model, batch, limit = GOAL
    hit = [r for r in results if r["model"] == model and batch in r["latency"]]
    if hit and args.size == 224 and 2 in args.ratio:
        lat = hit[0]["latency"][batch]
        ratio = lat[_ghost_key(2, args)]["median_ms"] / lat["original"]["median_ms"]
        verdict = "meets" if ratio <= limit else "MISSES"
        print(f"goal: ResNet-50 converted/original <= {limit} at batch {batch} -> {ratio:.3f}, {verdict} the goal")
    else:
        print(f"goal: ResNet-50 converted/original <= {limit} at batch {batch}, 224x224, ratio 2 "
              "-> not measured in this run")


if __name__ == "__main__":
    main()
