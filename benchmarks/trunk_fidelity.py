"""Why a calibrated Ghost trunk fits its calibration photos far better than other photos (VGG16, CRAFT; ratio 2, mix).

Models (``benchmarks/real_models.py``; ``python -m benchmarks.assets fetch`` first): ``vgg16``
(torchvision ``vgg16().features`` with VGG16's ImageNet weights) and ``craft`` (CRAFT's
VGG16-BN trunk). Conversion: ratio 2, ``cheap="mix"``, ``dw_size=1``, ``init="calib"`` on
``photos:calib`` crops; every error is measured on ``photos:heldout`` crops (other photos)
beside the calibration crops. Two parts:

1. ``--bound`` (no conversion): per conv, from the original's outputs alone, in the metric
   calibration uses (channels weighted by the BN after the conv; ``||e|| / ||y||`` over all
   positions):
   - ``bound``: the best rank-m reconstruction of the held-out outputs (m = ceil(n/2)): the
     layer is linear in its input patches, so the best rank-m linear map is the projection on
     the top-m principal components of the output (with a free bias); this is that residual;
   - ``calib->held``: the same projection with the components and mean taken from the
     calibration crops (what a perfect per-layer fit on them achieves on held-out photos);
   - ``calib->calib``: that projection on the calibration crops themselves;
   - ``sqrt(sum sq)``: the ``calib->held`` errors of the converted convs up to this one added
     in quadrature (independent errors passed on at unit gain);
   - ``bound r4``: the bound at ratio 4 (m = ceil(n/4)), for choosing ratios per layer.
2. ``--variants`` (conversions): for each, the last feature map's relative error on the
   calibration crops the fit used (``init_calib`` keeps the last 20 % of the batches out of
   the fit) and on the held-out crops; per converted conv the cumulative error of its output
   inside the converted trunk (fitted / held-out crops), its own held-out error (the layer
   fed the original's input, in the channel order folding gave it; ``ghostify.layer_errors``
   forgets that order for a conv after a folded one) and the ridge that
   calibration chose (``ridge`` column; ``-`` where none is solved for).

``--from-layer NAME`` measures the tail of the trunk from conv NAME on (its input computed by
the original trunk once and cached; NAME is converted too), which keeps the variants cheap:
the gap between calibration and held-out error opens in the deep blocks.

    python -m benchmarks.trunk_fidelity --model vgg16 --bound --calib 128 --heldout 64
    python -m benchmarks.trunk_fidelity --model vgg16 --from-layer 17 --variants default,sequential=0,refit=0,ridge=0.1
    python -m benchmarks.trunk_fidelity --quick        # 8 + 8 crops at 64 px: checks that it runs

Variant syntax: ``default`` or comma-free ``KEY=VALUE`` items joined by ``+`` (``ridge=0.1+sequential=0``);
keys ``ridge`` (fixed: no cross-validation), ``sequential``, ``refit``, ``calib`` (crops), ``scatter``.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

M_RATIO = 2


def load(model: str) -> tuple[nn.Sequential, nn.Module]:
    """``(trunk as a flat nn.Sequential of its layers, input adapter)`` for ``vgg16`` or ``craft``."""
    from benchmarks import real_models as R

    if model == "vgg16":
        full = R.vgg16_imagenet_trunk()
        return full.features, full.input
    if model == "craft":
        return R.craft_vgg16bn_trunk()[0], nn.Identity()
    raise SystemExit(f"unknown model {model!r}; use vgg16 or craft")


def crops(split: str, n: int, size: int, batch: int) -> list[torch.Tensor]:
    from ghostify.zoo.data import resolve_data

    xs = [x for x, _ in resolve_data(f"photos:{split}", batch_size=batch, limit=n)]
    if size != 224:
        xs = [F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False) for x in xs]
    return xs


def bn_scales(trunk: nn.Sequential) -> dict[str, torch.Tensor]:
    """``|gamma| / sqrt(var + eps)`` (mean 1) of the BN right after each conv, as calibration weights channels."""
    names = list(trunk._modules)
    out = {}
    for i, name in enumerate(names[:-1]):
        conv, nxt = trunk._modules[name], trunk._modules[names[i + 1]]
        if isinstance(conv, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            s = (nxt.weight.detach().double() / (nxt.running_var.double() + nxt.eps).sqrt()).abs()
            out[name] = s / s.mean()
    return out


def convs_of(trunk: nn.Sequential) -> list[str]:
    return [n for n, m in trunk.named_children() if isinstance(m, nn.Conv2d)]


# -- part 1: the rank-m bound from output statistics -------------------------------------------------


@torch.no_grad()
def output_moments(trunk: nn.Module, batches, scales, names: list[str] | None = None) -> dict[str, tuple]:
    """Per conv (``names``, default every conv child of the trunk): (sum of y, sum of y y^T, positions), y the
    BN-weighted output at every position, float64."""
    acc, handles = {}, []

    def hook(name):
        def fn(mod, args, out):
            y = out.permute(1, 0, 2, 3).reshape(out.shape[1], -1).double()
            if name in scales:
                y = y * scales[name].double()[:, None]
            s, yy, n = acc.get(name, (0.0, 0.0, 0))
            acc[name] = (s + y.sum(1), yy + y @ y.T, n + y.shape[1])
        return fn

    for name in convs_of(trunk) if names is None else names:
        handles.append(trunk.get_submodule(name).register_forward_hook(hook(name)))
    try:
        for x in batches:
            trunk(x)
    finally:
        for h in handles:
            h.remove()
    return acc


def projection_errors(calib: tuple, held: tuple, m: int) -> tuple[float, float, float]:
    """(bound on held-out, calib subspace on held-out, calib subspace on calib): relative errors."""

    def centred(mom):
        s, yy, n = mom
        mean = s / n
        return mean, yy / n - torch.outer(mean, mean), torch.trace(yy / n).item()

    mc, cc, ec = centred(calib)
    mh, ch, eh = centred(held)
    lam = torch.linalg.eigvalsh(ch)
    bound = lam[: len(lam) - m].clamp_min(0).sum().item()
    u = torch.linalg.eigh(cc)[1][:, -m:]
    rest = torch.eye(len(u), dtype=u.dtype) - u @ u.T
    shift = rest @ (mh - mc)  # the bias fitted on the calibration mean misses the held-out mean's other part
    on_held = torch.trace(rest @ ch @ rest).item() + (shift @ shift).item()
    on_calib = torch.trace(rest @ cc @ rest).item()
    return tuple(math.sqrt(max(v, 0.0) / e) for v, e in ((bound, eh), (on_held, eh), (on_calib, ec)))


# -- part 2: conversions -----------------------------------------------------------------------------


def parse_variant(text: str) -> dict:
    if text == "default":
        return {}
    out = {}
    for item in text.split("+"):
        key, _, value = item.partition("=")
        if key not in ("ridge", "sequential", "refit", "calib", "scatter"):
            raise SystemExit(f"variant {text!r}: unknown key {key!r}")
        out[key] = float(value) if key == "ridge" else int(value)
    return out


@torch.no_grad()
def cumulative_errors(trunk, ghost, batches, refs, scales) -> tuple[float, dict[str, float]]:
    """Last-output relative error and, per converted conv, the relative error of its output inside ``ghost``."""
    from ghostify import GhostConv2d

    ghosts = {n: m for n, m in ghost.named_modules() if isinstance(m, GhostConv2d)}
    num, den = dict.fromkeys(ghosts, 0.0), dict.fromkeys(ghosts, 0.0)

    def grab(store, name, internal):
        def fn(mod, args, out):
            if internal and mod.emit_internal_order:  # a folded layer emits its internal channel order
                out = out[:, torch.argsort(mod.channel_map)]
            store[name] = out.clone()  # the ReLU after it works in place
        return fn

    last_num = last_den = 0.0
    for x, ref in zip(batches, refs):
        outs_o, outs_g = {}, {}
        hs = [trunk._modules[n].register_forward_hook(grab(outs_o, n, False)) for n in ghosts]
        hs += [ghost.get_submodule(n).register_forward_hook(grab(outs_g, n, True)) for n in ghosts]
        try:
            trunk(x)
            y = ghost(x)
        finally:
            for h in hs:
                h.remove()
        for n in ghosts:
            w = scales[n].float()[None, :, None, None] ** 2 if n in scales else 1.0
            num[n] += (w * (outs_g[n] - outs_o[n]) ** 2).sum().item()
            den[n] += (w * outs_o[n] ** 2).sum().item()
        last_num += ((y - ref) ** 2).sum().item()
        last_den += (ref ** 2).sum().item()
    return math.sqrt(last_num / last_den), {n: math.sqrt(num[n] / den[n]) for n in ghosts}


@torch.no_grad()
def own_errors(trunk, ghost, batches, scales) -> dict[str, float]:
    """Per converted conv, its relative error fed the original's input (as ``ghostify.layer_errors``).

    Unlike ``layer_errors`` it gives a conv the input in the channel order it was folded to read:
    in these chains (conv -> [BN] -> ReLU -> [pool] -> conv) a folded Ghost layer emits its
    internal order and the next conv's input channels were permuted to match.
    """
    from ghostify import GhostConv2d

    ghosts = {n: m for n, m in ghost.named_modules() if isinstance(m, GhostConv2d)}
    order, perm, prev = list(ghosts), {}, None
    for n in order:
        perm[n] = ghosts[prev].channel_map if prev is not None and ghosts[prev].emit_internal_order else None
        prev = n
    num, den, seen = dict.fromkeys(ghosts, 0.0), dict.fromkeys(ghosts, 0.0), {}
    hs = [trunk._modules[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0].clone(), o.clone())))
          for n in ghosts]
    try:
        for x in batches:
            trunk(x)
            for n, g in ghosts.items():
                inp, ref = seen[n]
                out = g(inp if perm[n] is None else inp[:, perm[n]])
                if g.emit_internal_order:
                    out = out[:, torch.argsort(g.channel_map)]
                w = scales[n].float()[None, :, None, None] ** 2 if n in scales else 1.0
                num[n] += (w * (out - ref) ** 2).sum().item()
                den[n] += (w * ref**2).sum().item()
    finally:
        for h in hs:
            h.remove()
    return {n: math.sqrt(num[n] / den[n]) for n in ghosts}


def run_variant(trunk, variant, calib, held, refs_held, scales, first):
    import ghostify
    import ghostify.init.calib as calibrate
    import ghostify.init.fitting as fitting

    chosen = {}
    original_choose, original_ridges = calibrate.choose_ridge, fitting.RIDGES
    if "ridge" in variant:  # a fixed ridge: no cross-validation
        fitting.RIDGES = ()
        calibrate.choose_ridge = lambda a, b, scale, ridge: ridge
    else:
        def logged(a, b, scale, ridge):
            lam = original_choose(a, b, scale, ridge)
            chosen[len(chosen)] = lam
            return lam
        calibrate.choose_ridge = logged
    overrides = {first: {"ratio": M_RATIO}} if first else None  # convert the tail's first conv too
    t0 = time.perf_counter()
    try:
        ghost = ghostify.convert(trunk, ratio=M_RATIO, dw_size=1, cheap="mix", init="calib", calib_data=calib,
                                 overrides=overrides, ridge=variant.get("ridge", 1e-6),
                                 sequential=bool(variant.get("sequential", 1)),
                                 refit_intrinsic=bool(variant.get("refit", 1)),
                                 scatter=bool(variant.get("scatter", 0))).eval()
    finally:
        calibrate.choose_ridge, fitting.RIDGES = original_choose, original_ridges
    seconds = time.perf_counter() - t0
    fitted = calib[: len(calib) - min(len(calib) - 1, max(1, round(0.2 * len(calib))))]  # init_calib's holdout=0.2
    with torch.no_grad():
        refs_calib = [trunk(x) for x in fitted]
    last_c, cum_c = cumulative_errors(trunk, ghost, fitted, refs_calib, scales)
    last_h, cum_h = cumulative_errors(trunk, ghost, held, refs_held, scales)
    local = own_errors(trunk, ghost, held, scales)
    names = list(cum_h)
    ridges = {}
    if "ridge" in variant:
        ridges = {n: variant["ridge"] for n in names} if variant.get("refit", 1) else {}
    elif chosen and variant.get("refit", 1):  # once per layer with few rows per unknown, in execution order
        ridges = dict(zip(names[len(names) - len(chosen):], chosen.values()))
    return {"calib_crops": sum(len(x) for x in calib), "fitted_crops": sum(len(x) for x in fitted), "seconds": seconds, "last_calib": last_c,
            "last_heldout": last_h, "cum_calib": cum_c, "cum_heldout": cum_h, "local_heldout": local,
            "ridges": ridges}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16", choices=["vgg16", "craft"])
    p.add_argument("--calib", type=int, default=128, help="photos:calib crops")
    p.add_argument("--heldout", type=int, default=64, help="photos:heldout crops")
    p.add_argument("--size", type=int, default=224, help="crop side in pixels (224 crops resized)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bound", action="store_true", help="part 1: the rank-m bound table")
    p.add_argument("--variants", default=None, help="part 2: e.g. default,sequential=0,refit=0,ridge=0.1,calib=256")
    p.add_argument("--from-layer", default=None, help="measure the trunk from this conv on (e.g. 17 for vgg16)")
    p.add_argument("--quick", action="store_true", help="8 + 8 crops at 64 px, vgg16 from layer 24: checks the script")
    args = p.parse_args(argv)
    if args.quick:
        args.calib, args.heldout, args.size, args.batch_size = 8, 8, 64, 4
        args.from_layer, args.bound, args.variants = args.from_layer or "24", True, args.variants or "default"
    torch.set_num_threads(args.threads)
    trunk, adapter = load(args.model)
    scales = bn_scales(trunk)
    variants = [parse_variant(v) for v in args.variants.split(",")] if args.variants else []
    sizes = sorted({args.calib} | {v["calib"] for v in variants if "calib" in v})
    t0 = time.perf_counter()
    sets = {n: crops("calib", n, args.size, args.batch_size) for n in sizes}
    sets["held"] = crops("heldout", args.heldout, args.size, args.batch_size)
    names = list(trunk._modules)
    with torch.no_grad():
        head = adapter
        if args.from_layer:
            if args.from_layer not in names:
                raise SystemExit(f"--from-layer: no layer {args.from_layer!r}; the convs are {convs_of(trunk)}")
            cut = names.index(args.from_layer)
            head = nn.Sequential(adapter, *[trunk._modules[n] for n in names[:cut]])
            trunk = nn.Sequential(OrderedDict((n, trunk._modules[n]) for n in names[cut:])).eval()
        sets = {k: [head(x) for x in xs] for k, xs in sets.items()}
    held, first = sets.pop("held"), args.from_layer
    print(f"{args.model}{' from layer ' + first if first else ''}: {len(convs_of(trunk))} convs; calib crops "
          f"{', '.join(map(str, sizes))}; {sum(len(x) for x in held)} held-out crops at {args.size} px "
          f"(inputs {time.perf_counter() - t0:.0f} s)", flush=True)

    if args.bound:
        calib_main = sets[args.calib]
        t0 = time.perf_counter()
        mc, mh = output_moments(trunk, calib_main, scales), output_moments(trunk, held, scales)
        print(f"\nrank-m bound per conv (m = ceil(n/{M_RATIO})), relative error, "
              f"{sum(len(x) for x in calib_main)} calib crops ({time.perf_counter() - t0:.0f} s)")
        print(f"{'conv':>6} {'n':>4} {'bound':>7} {'calib->held':>12} {'calib->calib':>13} {'sqrt(sum sq)':>13} "
              f"{'bound r4':>9}")
        total = 0.0
        for name in convs_of(trunk):
            n = mc[name][1].shape[0]
            b, ch, cc = projection_errors(mc[name], mh[name], math.ceil(n / M_RATIO))
            b4 = projection_errors(mc[name], mh[name], math.ceil(n / 4))[0]
            total += ch**2 if (name != convs_of(trunk)[0] or first) else 0.0  # the stem stays a conv
            print(f"{name:>6} {n:4d} {b:7.4f} {ch:12.4f} {cc:13.4f} {math.sqrt(total):13.4f} {b4:9.4f}", flush=True)
        print("sqrt(sum sq): the calib->held errors of the converted convs so far added in quadrature, what they "
              "would add up to at unit gain if independent")

    if args.variants:
        with torch.no_grad():
            refs_held = [trunk(x) for x in held]
        for text, variant in zip(args.variants.split(","), variants):
            r = run_variant(trunk, variant, sets[variant.get("calib", args.calib)], held, refs_held, scales, first)
            print(f"\nvariant {text}: {r['calib_crops']} calib crops ({r['fitted_crops']} fitted, the rest calibration's "
                  f"own hold-out), {r['seconds']:.0f} s; last feature map error on the fitted crops "
                  f"{r['last_calib']:.4f}, held-out {r['last_heldout']:.4f}")
            print(f"{'conv':>6} {'cum fit':>8} {'cum held':>9} {'own held':>9} {'ridge':>7}")
            for name in r["cum_heldout"]:
                ridge = r["ridges"].get(name)
                print(f"{name:>6} {r['cum_calib'][name]:8.4f} {r['cum_heldout'][name]:9.4f} "
                      f"{r['local_heldout'][name]:9.4f} {'-' if ridge is None else f'{ridge:g}':>7}", flush=True)


if __name__ == "__main__":
    main()
