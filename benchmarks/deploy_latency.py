"""Deployment latency: original vs converted, both fused (ghostify.fuse), in eager PyTorch, torch.compile and
ONNX Runtime, side by side in one process.

For each model, batch size and runtime, the original and the converted models (one per ratio,
and with --skip-slower a MobileNetV2-style plan that keeps the layers whose Ghost form is not
faster in that runtime) run in alternation (ghostify.measure_latency: warm-up, fixed threads,
medians). The alternation is repeated --rounds times; each round gives a converted/original
ratio of medians, and the table shows the median ratio and its spread (min-max over rounds).

    python benchmarks/deploy_latency.py                                  # 4 models, ratios 2 and 4, bs 1 and 8, 3 runtimes
    python benchmarks/deploy_latency.py --runtimes ort --batch-sizes 1   # ONNX Runtime only, batch 1
    python benchmarks/deploy_latency.py --models mobilenet_v2 --skip-slower --runtimes ort
    python benchmarks/deploy_latency.py --parity                         # exported ONNX vs PyTorch on the photos
    python benchmarks/deploy_latency.py --parity --runtimes '' --models densenet121 --ratios 1.5 --cheap mix --scatter
    python benchmarks/deploy_latency.py --profile --runtimes ort         # ORT profile per kind of op
    python benchmarks/deploy_latency.py --quick                          # checks the script (figures meaningless)

Needs the deploy extra (pip install ghostify[deploy]) for ONNX Runtime, and a C++ compiler for
torch.compile. Run it on an otherwise idle machine; the load average is printed with each table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

DEFAULT_MODELS = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"]
GOALS = {("resnet50", "ort", 1): 0.62, ("resnet18", "ort", 1): 0.55, ("vgg16_bn", "ort", 1): 0.55}


def _list(text: str, cast=str) -> list:
    return [cast(t) for t in text.replace(",", " ").split()]


def _ratio(text: str):
    r = float(text)
    return int(r) if r.is_integer() else r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"torchvision names (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--ratios", type=lambda t: _list(t, _ratio), default=[2, 4], help="e.g. '2,4' (default)")
    p.add_argument("--cheap", default="dw", help="cheap op of the conversion (dw or mix; default dw)")
    p.add_argument("--dw-size", type=int, default=3)
    p.add_argument("--scatter", action="store_true", help="convert with scatter=True (channel order permuted)")
    p.add_argument("--runtimes", type=_list, default=["torch", "compile", "ort"], help="torch, compile, ort")
    p.add_argument("--batch-sizes", type=lambda t: _list(t, int), default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, all runtimes (default 2)")
    p.add_argument("--cpu-time", action="store_true",
                   help="1 thread, timed by the CPU time of the calling thread (time.thread_time): robust to "
                        "other load on the machine, where wall-clock figures of 2 threads are not")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model per round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds; the spread is over rounds (default 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-fuse", action="store_true", help="also time the converted models unfused")
    p.add_argument("--skip-slower", action="store_true",
                   help="also convert with skip_slower timed in each runtime (layers not faster stay convs)")
    p.add_argument("--parity", action="store_true",
                   help="export each converted model to ONNX and check it on the photos (ghostify.export)")
    p.add_argument("--profile", action="store_true", help="print ORT's per-op profile of each model at batch 1")
    p.add_argument("--weights", default="none", help="'none' (random) or DEFAULT (offline for mobilenet_v2 only)")
    p.add_argument("--json", metavar="PATH", help="also write all figures to PATH as JSON")
    p.add_argument("--quick", action="store_true", help="resnet18 at 64x64, ratio 2, bs 1, ort+torch: checks the script")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["resnet18"]
        args.size, args.ratios, args.batch_sizes, args.repeats, args.rounds, args.warmup = 64, [2], [1], 3, 2, 1
        args.runtimes = [r for r in args.runtimes if r != "compile"]
    args.models = args.models or DEFAULT_MODELS
    if args.cpu_time:
        args.threads = 1
    return args


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def bench(name: str, args) -> dict:
    import torch

    import ghostify
    from ghostify.deploy.runtime import runtime_callable

    torch.manual_seed(0)
    original = ghostify.get_model(name, weights=args.weights if name == "mobilenet_v2" else "none").eval()
    x1 = torch.randn(1, 3, args.size, args.size)
    macs0 = ghostify.count(original, x1).macs
    res = {"model": name, "macs": macs0, "variants": {}, "latency": []}
    clock = "CPU time of the calling thread" if args.cpu_time else "wall time"
    print(f"\n== {name}, {args.size}x{args.size}, {args.threads} threads ({clock}), cheap {args.cheap} "
          f"{args.dw_size}x{args.dw_size}{', scatter' if args.scatter else ''} ==")
    converted = {}
    for r in args.ratios:
        converted[f"r{r}"] = ghostify.convert(original, ratio=r, cheap=args.cheap, dw_size=args.dw_size,
                                              scatter=args.scatter).eval()
    variants = dict(converted)
    for key, model in converted.items():
        fused = ghostify.fuse(model)
        info = {"macs_ratio": ghostify.count(model, x1).macs / macs0, "fusions": fused.meta["ghostify_fuse"].counts()}
        res["variants"][key] = info
        print(f"{key}: MACs {info['macs_ratio']:.3f} of the original; fused: "
              + ", ".join(f"{k} x{v}" for k, v in info["fusions"].items()))
    for b in args.batch_sizes:
        x = torch.randn(b, 3, args.size, args.size)
        for rt in args.runtimes:
            models = dict(variants)
            if args.skip_slower:
                for r in args.ratios:
                    models[f"r{r} skip-slower"] = _skip_slower(original, r, x, rt, args)
            t0 = time.perf_counter()
            with ghostify.torch_threads(args.threads):
                fns = {"original": runtime_callable(original, x, rt, threads=args.threads)}
                for key, model in models.items():
                    fns[key] = runtime_callable(model, x, rt, threads=args.threads)
                    if args.no_fuse:
                        fns[key + " unfused"] = runtime_callable(model, x, rt, threads=args.threads, fuse=False)
            prep = time.perf_counter() - t0
            clock = time.thread_time if args.cpu_time else time.perf_counter
            rounds = [ghostify.measure_latency(fns, x, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                               clock=clock) for _ in range(args.rounds)]
            row = {"batch": b, "runtime": rt, "prepare_s": prep, "load": os.getloadavg(), "models": {}}
            base = [rd["original"]["median_ms"] for rd in rounds]
            print(f"bs {b}, {rt} (prepared in {prep:.0f} s; {_load()})")
            print(f"  {'model':<22} {'median ms':>10} {'/original':>10} {'spread over rounds':>20}")
            for key in fns:
                ms = [rd[key]["median_ms"] for rd in rounds]
                ratios = [m / o for m, o in zip(ms, base)]
                row["models"][key] = {"median_ms": statistics.median(ms), "ratio": statistics.median(ratios),
                                      "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds_ms": ms}
                rel = "" if key == "original" else f"{statistics.median(ratios):.3f}"
                spread = "" if key == "original" else f"{min(ratios):.3f}-{max(ratios):.3f}"
                print(f"  {key:<22} {statistics.median(ms):>10.2f} {rel:>10} {spread:>20}")
            res["latency"].append(row)
    if args.profile and "ort" in args.runtimes:
        res["profile"] = _profile(original, variants, x1, args)
    if args.parity:
        res["parity"] = _parity(variants, args)
    return res


def _skip_slower(original, ratio, x, runtime, args):
    import ghostify

    plan = ghostify.make_plan(original, ghostify.build_config(ratio=ratio, cheap=args.cheap, dw_size=args.dw_size))
    plan = ghostify.skip_slower(original, plan, x, repeats=args.repeats, threads=args.threads, progress=False,
                                runtime=runtime)
    print(f"  skip-slower in {runtime} at ratio {ratio}: {len(plan.converted)} of {len(plan.entries)} convs converted")
    return ghostify.convert(original, plan=plan, scatter=args.scatter).eval()


def _profile(original, variants, x, args) -> dict:
    from ghostify.deploy.runtime import ort_profile

    out = {}
    for key, model in {"original": original, **variants}.items():
        prof = ort_profile(model, x, threads=args.threads, runs=args.repeats)
        out[key] = {"total_ms": prof["total_ms"], "by_kind": prof["by_kind"]}
        kinds = sorted(prof["by_kind"].items(), key=lambda kv: -kv[1][0])
        print(f"  ORT profile {key}: {prof['total_ms']:.2f} ms/run: "
              + ", ".join(f"{k} {ms:.2f} ms ({n} nodes)" for k, (ms, n) in kinds))
    return out


def _parity(variants, args) -> dict:
    import ghostify

    data = ghostify.resolve_data("photos:heldout", batch_size=8, limit=64)
    batches = [x for x, _ in data]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, model in variants.items():
            check = ghostify.export(model, os.path.join(tmp, f"{key}.onnx"), input_size=tuple(batches[0].shape),
                                    dynamic_batch=True, check_data=batches)
            out[key] = {"max_abs_err": check.max_abs_err, "max_rel_err": check.max_rel_err,
                        "top1_agreement": check.top1_agreement, "samples": check.samples}
            print(f"  parity {key}: {check.samples} photo crops, max abs error {check.max_abs_err:.2e}, max relative "
                  f"error {check.max_rel_err:.2e}, top-1 agreement {check.top1_agreement:.1%}")
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch

    print(f"torch {torch.__version__}; {os.cpu_count()} logical CPUs; {_load()}")
    results = [bench(name, args) for name in args.models]
    print("\n== summary: converted/original at batch 1 (median over rounds; spread) ==")
    for res in results:
        for row in res["latency"]:
            if row["batch"] != 1:
                continue
            for key, m in row["models"].items():
                if key == "original":
                    continue
                goal = GOALS.get((res["model"], row["runtime"], 1))
                mark = "" if goal is None or not key.startswith("r2") or key.endswith("unfused") else (
                    f"  goal <= {goal}: {'met' if m['ratio'] <= goal else 'missed'}")
                print(f"{res['model']:<14} {row['runtime']:<8} {key:<22} {m['ratio']:.3f} "
                      f"({m['ratio_min']:.3f}-{m['ratio_max']:.3f}){mark}")
    print("\n== across runtimes: converted in ONNX Runtime / original in eager PyTorch (medians of separate runs) ==")
    for res in results:
        rows = {(row["batch"], row["runtime"]): row["models"] for row in res["latency"]}
        for (b, rt), models in sorted(rows.items()):
            if rt == "ort" and (b, "torch") in rows:
                eager = rows[(b, "torch")]["original"]["median_ms"]
                print(f"{res['model']:<14} bs {b}: " + ", ".join(
                    f"{k} {m['median_ms'] / eager:.3f}" for k, m in models.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
