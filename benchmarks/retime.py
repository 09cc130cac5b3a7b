"""Time a ``benchmarks/peers.py`` folder's kept ONNX models again, several times, alone on the machine.

A run's own ONNX Runtime timing is one pass of a few alternating repeats at its end; on this 2-core machine one
such pass can say the opposite of the next (docs/peers.md, tenth run: Taylor's 0.85 CRAFT model at 1.27x the
original in the run's timing, at 0.71-0.93x in six timings after it). This reads ``OUT/onnx/MODEL/*.onnx`` (a
run with ``--keep-onnx``) and times them together, ``--timings`` passes of ``--repeats`` alternating runs each
(``peer_methods.ort_passes``, the run's own timer), printing each model's ratio to the original per pass, and
writes each pass's medians (ms) to ``OUT/retime_MODEL.json``::

    python -m benchmarks.retime peers-craft-ort-check craft_trunk --repeats 15 --timings 3
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import peer_methods as P
from benchmarks.peers import SETUPS


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a peers.py output folder run with --keep-onnx")
    ap.add_argument("model", choices=sorted(SETUPS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--timings", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    files = sorted((args.out / "onnx" / args.model).glob("*.onnx"))
    if not any(f.stem == "original" for f in files):
        raise SystemExit(f"no {args.out}/onnx/{args.model}/original.onnx: retime a folder run with --keep-onnx")
    models = {f.stem: f.read_bytes() for f in files}
    x = torch.randn(args.batch, *SETUPS[args.model].size, generator=torch.Generator().manual_seed(0))
    passes = [{k: v[args.batch] for k, v in lat.items()}
              for lat in P.ort_passes(models, {args.batch: x}, threads=args.threads, repeats=args.repeats,
                                      timings=args.timings)]
    for i, p in enumerate(passes):
        print(f"timing {i + 1} (original {p['original']:.1f} ms): " + ", ".join(
            f"{k} {v / p['original']:.2f}x" for k, v in p.items() if k != "original"), flush=True)
    (args.out / f"retime_{args.model}.json").write_text(json.dumps(passes, indent=1))
    return passes


if __name__ == "__main__":
    main()
