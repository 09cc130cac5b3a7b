"""Would a 1x1 input projection in front of each Ghost layer close the trunks' gap with Tucker-2? A prototype.

On the VGG-style trunks a stem-whole Tucker-2 decomposition with its last factors refit by least squares
(``benchmarks/peers.py``'s ``lowrank`` + ``ls-refit``) keeps more of the output than ghostify at 0.55 and 0.4
of the MACs (docs/peers.md, sixteenth run). Tucker-2 reduces a kxk conv's *input* channels (1x1 to ``r_in``)
as well as its output channels; a Ghost layer only the output ones. This builds, for the same decomposition,
a third model in which each decomposed conv keeps Tucker-2's first factor (the 1x1 ``in -> r_in``) and
replaces the core and last factor by a ghostify ``mix`` Ghost layer fitted by ghostify's own calibration fit
(``ghostify.init.calib.fit_layer``: the best rank-``m`` map from the projected input patches to the conv's
output, intrinsic filters refit, the mix solved in closed form), ``m`` the largest multiple of ``--round-to``
that costs no more MACs than Tucker-2's core and last factor (a Ghost layer passes its intrinsic maps through
instead of mixing them, which pays for a few more than Tucker's ``r_out``, not many: each costs ``k*r_in``).
With ``refit`` off (the second Ghost row) the intrinsic filters are the projected conv's own, only the mix
is fitted. Layer after layer in the order the convs run, each fit sees the prototype's own inputs (earlier
layers already replaced) and the original conv's outputs, as low-rank's refit does. It prints each model's
held-out fidelity and MACs at each target, and with ``--latency`` ONNX Runtime's batch-1 latency against the
original (2 threads, alternating, three timings; run it alone)::

    python -m benchmarks.ghost_inproj --model vgg16_trunk --targets 0.55 --positions 1024   # ~15 min, 2 cores

This is a measurement, not a ghostify feature: ``GhostConv2d`` has no input projection.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from benchmarks import peer_methods as P
from benchmarks import peers
from ghostify import GhostConv2d
from ghostify.conversion.tracing import trace
from ghostify.graph import bn_output_scales
from ghostify.init.calib import fit_layer
from ghostify.ratio import ratio_keeping


def intrinsic_count(r_in: int, r_out: int, n: int, k: int, round_to: int) -> int:
    """The most intrinsic maps ``m`` (a multiple of ``round_to``, below ``n``) with ``k*r_in*m + m*(n-m)``,
    a Ghost layer's MACs per position after the projection, no more than Tucker-2's ``k*r_in*r_out + r_out*n``.

    >>> intrinsic_count(64, 64, 256, 9, 8)   # Tucker: 36,864 + 16,384; m = 64: 49,152; m = 72: 54,720
    64
    """
    budget = k * r_in * r_out + r_out * n
    best = 0
    for m in range(round_to, n, round_to):
        if k * r_in * m + m * (n - m) <= budget:
            best = m
    return best


@torch.no_grad()
def project_and_ghost(compressed: nn.Module, original: nn.Module, batches, round_to: int, *, refit: bool = True,
                      positions: int = 256) -> nn.Module:
    """A copy of ``compressed`` (from ``peer_methods.lowrank``) whose Tucker-2 layers become
    ``Sequential(first factor, mix Ghost layer)``, each fitted on its inputs inside the copy (``refit``,
    ``positions``: as ``fit_layer``'s; without ``refit`` the intrinsic filters are the projected conv's own)."""
    work = copy.deepcopy(compressed).eval()
    original = original.eval()
    order = list(P._conv_shapes(original, batches[0][:1]))
    gen = torch.Generator().manual_seed(0)
    gm = trace(original).graph_module  # the fits weight each channel as the next BN sees it, as ghostify's do
    scales = bn_output_scales(gm, list(work.lowrank_layers)) if gm is not None else {}
    for name in (n for n in order if n in work.lowrank_layers and len(work.lowrank_layers[n]) == 2):
        conv, seq = original.get_submodule(name), work.get_submodule(name)
        proj = seq[0]
        k = conv.kernel_size[0] * conv.kernel_size[1]
        m = intrinsic_count(proj.out_channels, seq[1].out_channels, conv.out_channels, k, round_to)
        if m < 1:
            continue
        inner = nn.Conv2d(proj.out_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, bias=True)  # the conv seen from the projected input
        inner.weight.copy_(torch.einsum("oikl,ri->orkl", conv.weight, proj.weight[:, :, 0, 0]))
        inner.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
        ghost = GhostConv2d.from_conv(inner, ratio_keeping(conv.out_channels, m), 1, "mix", cheap_bias=True)
        zs = [proj(P._capture(seq, work, x, output=False)) for x in batches]
        ys = [P._capture(conv, original, x, output=True) for x in batches]
        fit_layer(inner, ghost, zs, ys, positions=positions, refit=refit, gen=gen, scale=scales.get(name))
        work.set_submodule(name, nn.Sequential(proj, ghost))
    return work


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg16_trunk", choices=["vgg16_trunk", "craft_trunk"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.55, 0.4])
    ap.add_argument("--round-to", type=int, default=8, metavar="N")
    ap.add_argument("--positions", type=int, default=256, help="output positions sampled per image by the fit")
    ap.add_argument("--latency", action="store_true", help="also time the three in ONNX Runtime (run alone)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few crops")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    s = peers.SETUPS[a.model]
    peers.load_data(s, a.quick)
    ctx = peers.Context(s, argparse.Namespace(round_to=a.round_to))
    m, x0 = ctx.model, ctx.x0
    print(f"{a.model}; {s.data['desc']}; {s.metric}; original MACs {ctx.macs0 / 1e9:.2f} G")
    print("| target | model | MACs | fidelity | seconds | ORT bs1 vs original |\n" + "|---" * 6 + "|")
    rows = []
    for target in a.targets:
        t0 = time.perf_counter()
        t, _ = P.bisect(lambda t: ctx.macs(P.lowrank(m, x0, t, decompose=False, round_to=a.round_to)), target,
                        0.01, 1.0, increasing=True)
        lr = P.lowrank(m, x0, t, round_to=a.round_to)
        models = {"low-rank + refit": P.refit_last_factors(lr, m, ctx.fit_x)}
        for refit in (True, False):
            models[f"input projection + Ghost, filters {'refit' if refit else 'kept'}"] = project_and_ghost(
                lr, m, ctx.fit_x, a.round_to, refit=refit, positions=a.positions)
        seconds = time.perf_counter() - t0
        lat = {}
        if a.latency:
            onnx = {"original": P.onnx_bytes(m, x0), **{k: P.onnx_bytes(v, x0) for k, v in models.items()}}
            ms, _ = P.pass_medians(P.ort_passes(onnx, {1: x0}, timings=3))
            lat = {k: ms[k][1] / ms["original"][1] for k in models}
        for key, model in models.items():
            fid = peers.fidelity(s, model, ctx.ref)["fidelity"]
            row = dict(target=target, model=key, macs=ctx.macs(model), fidelity=fid, seconds=seconds,
                       latency=lat.get(key))
            rows.append(row)
            shown = f"{row['latency']:.2f}x" if row["latency"] is not None else "-"
            print(f"| {target:g} | {key} | {row['macs']:.3f} | {row['fidelity']:.4f} | {seconds:.0f} | {shown} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
