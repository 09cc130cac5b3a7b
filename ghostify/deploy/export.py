"""Export a model to ONNX or a ``torch.export`` program, and check the file against the PyTorch model.

The file is written next to its destination under a temporary name (:func:`ghostify.outputs.atomic_write`),
checked in the runtime that will run it (ONNX Runtime for ``.onnx``, ``torch.export.load`` for ``.pt2``),
and only then moved into place: a file that fails the check is never left behind.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .._util import eval_mode
from ..errors import GhostifyError, describe
from ..outputs import atomic_write, check_output
from ..zoo.data import resolve_data
from .fuse import fuse as fuse_model

__all__ = ["export", "ExportCheck", "check_outputs", "require_onnx", "onnx_session", "FORMATS"]

FORMATS = ("onnx", "pt2")
INSTALL_HINT = "pip install 'ghostify[deploy]'"


@dataclass
class ExportCheck:
    """What :func:`export` wrote and checked.

    ``max_rel_err`` is the largest absolute difference divided by the largest absolute
    PyTorch output (per output tensor, worst of all); ``top1_agreement`` is the share of
    samples whose argmax agrees, when the output is a ``(N, classes)`` matrix (else None).
    """

    path: str
    format: str
    input_size: tuple
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float | None
    samples: int
    tolerance: float
    fused: bool
    fusions: dict = field(default_factory=dict)
    not_fused: list = field(default_factory=list)  # one line per pass skip and per unaligned cat left
    data: str = "random inputs"  # what the check ran on
    cats_left: int | None = None  # Ghost cats the deploy pass could not remove (None: not fused)

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.1%}" if self.top1_agreement is not None else ""
        fus = (", ".join(f"{k} x{v}" for k, v in self.fusions.items()) or "none") if self.fused else "off (--no-fuse)"
        if self.cats_left is not None:
            fus += f"; {self.cats_left} Ghost cats left"
        if self.not_fused:
            fus += f" ({len(self.not_fused)} notes: {self.not_fused[0]}{', ...' if len(self.not_fused) > 1 else ''})"
        return (f"wrote {self.path} ({self.format}); checked on {self.samples} samples ({self.data}) against PyTorch: "
                f"max abs error {self.max_abs_err:.2e}, max relative error {self.max_rel_err:.2e} "
                f"(tolerance {self.tolerance:g}){top1}; fusions: {fus}")

    def to_dict(self) -> dict:
        return asdict(self)


def require_onnx():
    """Import and return ``(onnx, onnxruntime)``, or fail in one line naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise GhostifyError(f"ONNX support needs the optional packages onnx and onnxruntime ({exc.name} is "
                            f"missing): {INSTALL_HINT}") from None
    return onnx, onnxruntime


def onnx_session(path_or_bytes, threads: int | None = None, profile: str | None = None, spin: bool = False):
    """An ONNX Runtime CPU session at ``ORT_ENABLE_ALL`` with ``threads`` intra-op threads (sequential).

    ``spin=False`` (default) turns off ORT's busy-waiting worker threads: with two sessions timed
    in alternation in one process, the idle one's spinning threads steal the cores of the one being
    timed (measured: a ResNet-18 at 2 threads ran in 52.6 ms with spinning, 24.8 ms without).
    """
    _, ort = require_onnx()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes, so,
                                providers=["CPUExecutionProvider"])


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    flat = []
    for o in out:
        flat.extend(_outputs(o))
    return flat


def check_outputs(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> tuple[float, float, float | None, int]:
    """``(max abs error, max relative error, top-1 agreement or None, argmax matches)`` of two output lists."""
    abs_err = rel_err = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = e.detach().float().cpu(), torch.as_tensor(a).float().cpu()
        if e.shape != a.shape:
            raise GhostifyError(f"export check: output shape {tuple(a.shape)} differs from PyTorch's {tuple(e.shape)}")
        d = (e - a).abs().max().item() if e.numel() else 0.0
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / max(e.abs().max().item(), 1e-12) if e.numel() else 0.0)
    first_e, first_a = expected[0], torch.as_tensor(actual[0])
    if first_e.dim() == 2 and first_e.shape[1] > 1:
        same = int((first_e.argmax(1).cpu() == first_a.argmax(1).cpu()).sum())
        return abs_err, rel_err, same / first_e.shape[0], same
    return abs_err, rel_err, None, 0


CHECK_SAMPLES = 64  # examples a data spec gives the check


def _check_batches(check_data, input_size, dynamic_batch: bool, model, seed: int = 0) -> list[torch.Tensor]:
    if check_data is None:
        g = torch.Generator().manual_seed(seed)
        sizes = [tuple(input_size)]
        if dynamic_batch:
            sizes.append((input_size[0] + 1,) + tuple(input_size[1:]))
        return [torch.randn(s, generator=g) for s in sizes]
    if isinstance(check_data, (str, os.PathLike)):
        batch = 8 if dynamic_batch else input_size[0]
        check_data = resolve_data(check_data, batch_size=batch, limit=max(batch, CHECK_SAMPLES // batch * batch),
                                  model=model, input_size=tuple(input_size[1:]))
    if isinstance(check_data, torch.Tensor):
        return [check_data]
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in check_data]
    if not batches:
        raise GhostifyError("export check: check_data holds no batch")
    shape = next((tuple(x.shape[1:]) for x in batches if tuple(x.shape[1:]) != tuple(input_size[1:])), None)
    if shape is not None:
        chw = ",".join(map(str, shape))
        raise GhostifyError(f"the check data has inputs of {shape} but input_size is {tuple(input_size)}; export with "
                            f"input_size=(N, {chw.replace(',', ', ')}) (--input-size N,{chw})")
    return batches


def export(model: nn.Module, path, input_size: Iterable[int] = (1, 3, 224, 224), *, format: str | None = None,
           dynamic_batch: bool = False, fuse: bool = True, check_data=None, tolerance: float = 1e-4,
           force: bool = False, opset: int = 17) -> ExportCheck:
    """Write ``model`` (fused for inference by default) to ``path`` and check it against PyTorch.

    Args:
        model: any model; Ghost layers and BatchNorm are folded by :func:`ghostify.fuse` first
            (``fuse=False`` exports the graph as it is).
        path: the file to write (``.onnx`` or ``.pt2``); an existing file is kept unless ``force``.
        input_size: ``(N, C, H, W)`` of the example input the export traces with.
        format: ``"onnx"`` (ONNX Runtime runs it as is, no custom ops) or ``"pt2"``
            (``torch.export`` ExportedProgram); default from the file suffix.
        dynamic_batch: let the batch size vary in the file (checked at two batch sizes).
        check_data: what to check on: a tensor, batches (tensors or ``(inputs, targets)``), or a
            data spec for :func:`ghostify.resolve_data` (e.g. ``"photos:heldout"``, of which the
            first 64 examples are used, in batches of ``N``, or of 8 with ``dynamic_batch``);
            default: random inputs of ``input_size``.
        tolerance: the largest max relative error accepted (see :class:`ExportCheck`).

    Returns an :class:`ExportCheck`; raises :class:`~ghostify.GhostifyError` in one line
    (and writes nothing) when the exported model differs by more than ``tolerance``.

    Example:
        >>> import tempfile, os, torchvision, ghostify
        >>> ghost = ghostify.convert(torchvision.models.resnet18(), ratio=2)
        >>> out = os.path.join(tempfile.mkdtemp(), "ghost.onnx")
        >>> check = ghostify.export(ghost, out, input_size=(1, 3, 64, 64))
        >>> check.max_rel_err <= 1e-4 and check.top1_agreement == 1.0
        True
    """
    path = Path(path)
    fmt = format or ("pt2" if path.suffix == ".pt2" else "onnx")
    if fmt not in FORMATS:
        raise GhostifyError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    check_output(path, force=force)  # refused now, before the work
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 4:
        raise GhostifyError(f"input_size is (N, C, H, W) (got {input_size}); e.g. --input-size 1,3,224,224")
    with eval_mode(model):
        report, target, notes = None, model, []
        if fuse:
            try:
                target = fuse_model(model)
                report = target.meta["ghostify_fuse"]
            except GhostifyError as exc:  # an untraceable model is exported as it is
                notes.append(str(exc).split(";")[0])
        example = torch.randn(input_size, generator=torch.Generator().manual_seed(0))  # = the first random check batch
        batches = _check_batches(check_data, input_size, dynamic_batch, model)
        wrong = {x.shape[0] for x in batches} - {input_size[0]}
        if wrong and not dynamic_batch:
            raise GhostifyError(f"the check data has batches of {min(wrong)} but the file takes batches of "
                                f"{input_size[0]}; export with dynamic_batch=True (--dynamic-batch)")
        found = {}

        def write(tmp: str) -> None:  # checked under its temporary name; a failure leaves nothing behind
            run = (_export_onnx if fmt == "onnx" else _export_pt2)(target, example, tmp, dynamic_batch, opset)
            found.update(_compare(model, run, batches))
            if not found["rel"] <= tolerance:
                own = _float64_error(model, batches[0])
                raise GhostifyError(f"export check failed: max relative error {found['rel']:.2e} > tolerance "
                                    f"{tolerance:g} (max abs {found['abs']:.2e}) on {found['total']} samples; "
                                    f"nothing written to {path}. The PyTorch model's own float32 result is "
                                    f"{own:.1e} off its float64 result: where that is near the error, the "
                                    "model is this imprecise itself and a larger tolerance (--tolerance) "
                                    "accepts it; otherwise export with --no-fuse to tell the deploy pass apart")

        atomic_write(path, write, force=force)
    if report is not None:
        notes = [f"{p} at {w}: {why}" for p, w, why in report.skipped]
        notes += [f"cat of {layer} left with pieces {sizes} (not multiples of 8)" for layer, sizes in report.unaligned_cats()]
    top1 = found["same"] / found["total"] if found["logits"] else None
    return ExportCheck(str(path), fmt, input_size, found["abs"], found["rel"], top1, found["total"], tolerance, fuse,
                       report.counts() if report else {}, notes, _data_name(check_data),
                       len(report.cats) if report else None)


def _float64_error(model: nn.Module, x: torch.Tensor) -> float:
    """Max relative error of ``model``'s float32 output against the same model computed in float64."""
    with torch.inference_mode():
        ref = _outputs(copy.deepcopy(model).double()(x.double()))
        return check_outputs(ref, [o.double() for o in _outputs(model(x.float()))])[1]


def _compare(model: nn.Module, run, batches: list[torch.Tensor]) -> dict:
    """The worst errors and the argmax agreement of ``run`` (the exported file) against ``model`` on ``batches``."""
    found = {"abs": 0.0, "rel": 0.0, "same": 0, "total": 0, "logits": True}
    with torch.inference_mode():
        for x in batches:
            x = x.float()
            a, r, top1, agree = check_outputs(_outputs(model(x)), run(x))
            found["abs"], found["rel"] = max(found["abs"], a), max(found["rel"], r)
            found["logits"] = found["logits"] and top1 is not None
            found["same"] += agree
            found["total"] += x.shape[0]
    return found


def _data_name(check_data) -> str:
    if check_data is None:
        return "random inputs"
    return str(check_data) if isinstance(check_data, (str, os.PathLike)) else "given batches"


def _export_onnx(model, example, tmp, dynamic_batch, opset):
    onnx, _ = require_onnx()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes=axes, do_constant_folding=True)
    except Exception as exc:
        raise GhostifyError(f"ONNX export failed: {describe(exc)}") from None
    proto = onnx.load(tmp)
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise GhostifyError(f"ONNX export produced custom-op domains {custom}; the file would not run as is")
    sess = onnx_session(tmp)
    name = sess.get_inputs()[0].name
    return lambda x: [torch.from_numpy(o) for o in sess.run(None, {name: x.numpy()})]


def _export_pt2(model, example, tmp, dynamic_batch, opset):
    shapes = None
    if dynamic_batch:  # a batch of 1 would be specialised: trace with 2
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        example = torch.cat([example, example]) if example.shape[0] == 1 else example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, (example,), dynamic_shapes=shapes)
            torch.export.save(ep, tmp)
            loaded = torch.export.load(tmp).module()
    except Exception as exc:
        raise GhostifyError(f"torch.export failed: {describe(exc)}") from None
    return lambda x: _outputs(loaded(x))
