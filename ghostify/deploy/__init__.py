"""Deployment: fuse a (converted or original) model for inference, export it, check it, time it in a runtime.

* :func:`fuse` (``fuse.py``): a deploy pass, exact up to float rounding: BatchNorm folded into the
  convs, Ghost layers laid out so that the runtime fuses every element-wise op into a conv.
* :func:`export` (``export.py``): ONNX or ``torch.export`` file, written atomically, checked
  against the PyTorch model in the runtime that will run it.
* :func:`runtime_latency` (``runtime.py``): original against converted, side by side, in eager
  PyTorch, ``torch.compile`` or ONNX Runtime.

ONNX support needs the optional extra: ``pip install ghostify[deploy]``.
"""
from .export import ExportCheck, export
from .fuse import FuseReport, fuse
from .runtime import RUNTIMES, ort_profile, runtime_latency

__all__ = ["fuse", "FuseReport", "export", "ExportCheck", "runtime_latency", "ort_profile", "RUNTIMES"]
