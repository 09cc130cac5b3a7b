"""Deployment: fuse a (converted or original) model for inference, export it, check it, time it in a runtime.

* :func:`fuse` (``fuse.py``): a deploy pass, exact up to float rounding: BatchNorm folded into the
  convs, Ghost layers laid out so that the runtime fuses every element-wise op into a conv.
* :func:`export` (``export.py``): ONNX or ``torch.export`` file, written atomically, checked
  against the PyTorch model in the runtime that will run it.
* :func:`runtime_latency` (``runtime.py``): original against converted, side by side, in eager
  PyTorch, ``torch.compile`` or ONNX Runtime.

ONNX support needs the optional extra: ``pip install 'ghostify[deploy]'``.

The command line is a thin face over these calls:

* ``ghostify export MODEL -o OUT [--input-size N,C,H,W] [--dynamic-batch] [--format onnx|pt2]
  [--no-fuse] [--check-data SPEC] [--force]``: load MODEL (``ghostify.load`` for a ghostify
  file, else ``ghostify.get_model(name, weights=...)``, exported unconverted), then
  ``check = ghostify.export(model, OUT, input_size, format=..., dynamic_batch=..., fuse=...,
  check_data=SPEC or None, force=...)``; print ``check.summary()`` (``check.to_dict()`` as JSON).
* ``ghostify report ... --latency --runtime R``: ``ghostify.runtime_latency({"before": model,
  "after": ghost}, x, runtime=R, threads=..., repeats=...)`` gives the dict that
  ``ConversionReport.latency[key]`` holds (``measure_latency``'s), so the report's table shows it.
* ``convert --skip-slower --runtime R`` / ``--target-latency F --runtime R``:
  ``ghostify.skip_slower(model, plan, x, runtime=R)``, ``ghostify.allocate(..., runtime=R)``.
"""
from .export import ExportCheck, export
from .fuse import FuseReport, fuse
from .runtime import RUNTIMES, ort_profile, runtime_latency

__all__ = ["fuse", "FuseReport", "export", "ExportCheck", "runtime_latency", "ort_profile", "RUNTIMES"]
