"""Latency where the model runs: eager PyTorch, ``torch.compile`` (inductor) or ONNX Runtime, side by side.

Every runtime gets the same fused model (:func:`ghostify.fuse`, BN folded in original and
converted alike) and the same timing loop as :func:`ghostify.measure_latency`: warm-up,
fixed threads, models run in alternation, medians.
"""
from __future__ import annotations

import collections
import copy
import io
import json
import os
import tempfile
import warnings
from typing import Callable

import torch
from torch import nn

from ..conversion.tracing import trace
from ..errors import GhostifyError
from ..measure.latency import measure_latency, torch_threads
from .export import onnx_session, require_onnx
from .fuse import fuse as fuse_model
from .graph import ACTIVATION_MODULES

__all__ = ["RUNTIMES", "runtime_callable", "runtime_latency", "onnx_bytes", "ort_profile"]

RUNTIMES = ("torch", "compile", "ort")


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """``model`` exported to ONNX in memory (TorchScript exporter, no custom ops)."""
    require_onnx()
    buf = io.BytesIO()
    example = example.clone()  # an inference-mode tensor (e.g. a captured layer input) cannot be traced
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"])
    return buf.getvalue()


def runtime_callable(model: nn.Module, example: torch.Tensor, runtime: str = "torch", *, threads: int | None = None,
                     fuse: bool = True) -> Callable[[torch.Tensor], object]:
    """A function ``f(x)`` that runs ``model`` (fused for inference unless ``fuse=False``) in ``runtime``.

    ``"torch"``: eager; ``"compile"``: ``torch.compile`` with inductor (compiled here, on
    ``example``: needs a C++ compiler); ``"ort"``: exported to ONNX and run by ONNX Runtime
    on the CPU (``ORT_ENABLE_ALL``, ``threads`` intra-op threads).

    Example:
        >>> f = runtime_callable(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16), "torch")
        >>> f(torch.randn(1, 3, 16, 16)).shape
        torch.Size([1, 8, 14, 14])
    """
    if runtime not in RUNTIMES:
        raise GhostifyError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    model = _inference_copy(model, fuse)
    if runtime == "ort":
        sess = onnx_session(onnx_bytes(model, example), threads=threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x.numpy()})
    if runtime == "compile":
        compiled = torch.compile(model, backend="inductor", dynamic=False)
        with torch.inference_mode():
            compiled(example)  # compiles now, so the warm-up runs measure warm code
        return compiled
    return model


def _inference_copy(model: nn.Module, fuse: bool) -> nn.Module:
    """The fused inference copy of ``model``, or (``fuse=False``) an eval-mode copy."""
    if fuse:
        return fuse_model(model)
    return copy.deepcopy(model).eval()


def runtime_latency(models: dict[str, nn.Module], inputs: torch.Tensor, *, runtime: str = "torch",
                    fuse: bool = True, warmup: int = 3, repeats: int = 10, threads: int | None = None,
                    clock: Callable[[], float] | None = None) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each model in ``runtime``, measured in alternation on ``inputs``.

    ``clock``: as :func:`ghostify.measure_latency` (wall time by default; ``time.thread_time``
    with ``threads=1`` for CPU time, robust to other load).

    Example:
        >>> import torchvision, ghostify
        >>> net = torchvision.models.resnet18().eval()
        >>> r = runtime_latency({"original": net, "ghost": ghostify.convert(net)}, torch.randn(1, 3, 64, 64),
        ...                     runtime="torch", repeats=3)
        >>> sorted(r)
        ['ghost', 'original']
    """
    with torch_threads(threads):
        fns = {k: runtime_callable(m, inputs, runtime, threads=threads, fuse=fuse) for k, m in models.items()}
    return measure_latency(fns, inputs, warmup=warmup, repeats=repeats, threads=threads,
                           **({"clock": clock} if clock else {}))


def ort_profile(model: nn.Module | bytes | str, inputs: torch.Tensor, *, threads: int | None = None, runs: int = 10,
                fuse: bool = True) -> dict:
    """Where ONNX Runtime spends the time: ``{"total_ms", "by_op": {op: (ms, nodes)}, "by_kind": {kind: (ms, nodes)},
    "by_node": {node: ms}}``.

    ``by_kind`` is ``by_op`` with the convs told apart by their weights: ``Conv`` (dense or
    grouped: primary convs, split consumers, convs that stay), ``Conv depthwise kxk`` (cheap
    ops) and ``Conv 1x1 per-channel`` (a :class:`ChannelAffine`: a BN shift left between a
    primary conv and its readers).
    Per run, from ORT's own profiler (``SessionOptions.enable_profiling``); node names are
    those of ORT's optimised graph (a fused conv is named after its last output, e.g.
    ``.../Relu_output_0_nchwc``). ``model`` is a module (fused unless ``fuse=False``), ONNX
    bytes or a path.
    """
    if isinstance(model, nn.Module):
        model = onnx_bytes(_inference_copy(model, fuse), inputs)
    prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = onnx_session(model, threads=threads, profile=prefix)
    name = sess.get_inputs()[0].name
    x = inputs.numpy()
    for _ in range(3 + runs):
        sess.run(None, {name: x})
    path = sess.end_profiling()
    try:
        events = json.load(open(path))
    finally:
        os.remove(path)
    n = 3 + runs
    by_op: dict[str, float] = collections.defaultdict(float)
    by_kind: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    by_node: dict[str, float] = collections.defaultdict(float)
    total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"] / n / 1e3
            count[op] += 1
            kind = _conv_kind(e["args"]) if op in ("Conv", "FusedConv") else op
            by_kind[kind] += e["dur"] / n / 1e3
            kinds[kind] += 1
            by_node[e["name"][: -len("_kernel_time")]] += e["dur"] / n / 1e3
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"] / n / 1e3
    return {"total_ms": total, "by_op": {op: (ms, count[op] // n) for op, ms in by_op.items()},
            "by_kind": {k: (ms, kinds[k] // n) for k, ms in by_kind.items()}, "by_node": dict(by_node)}


def _conv_kind(args: dict) -> str:
    """A profiled ORT conv node's kind, from its input shapes (``[x, weight, ...]``)."""
    shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
    if len(shapes) < 2 or len(shapes[1]) != 4 or shapes[1][1] != 1 or shapes[0][1] == 1:
        return "Conv"
    return "Conv 1x1 per-channel" if shapes[1][2:] == [1, 1] else f"Conv depthwise {shapes[1][2]}x{shapes[1][3]}"


def layer_context(model: nn.Module, name: str, leaf_modules=()) -> list[nn.Module]:
    """The BatchNorm and activation that follow conv ``name`` in ``model``'s graph (copies; may be empty).

    A layer timed in a runtime is timed with them, because the runtime fuses them into the
    conv (and a Ghost layer's deploy form depends on them).
    """
    gm = trace(model, leaf_modules).graph_module
    if gm is None:
        return []
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
    out: list[nn.Module] = []
    while node is not None and len(node.users) == 1:
        node = next(iter(node.users))
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        mod = mod if isinstance(mod, (nn.BatchNorm2d,) + ACTIVATION_MODULES) else None
        if mod is None and node.op == "call_function" and node.target in _ACT_FUNCTION_MODULES:
            mod = _ACT_FUNCTION_MODULES[node.target]()
        if mod is None or (isinstance(mod, nn.BatchNorm2d) and out):
            break
        out.append(copy.deepcopy(mod))
        if not isinstance(mod, nn.BatchNorm2d):
            break
    return out


_ACT_FUNCTION_MODULES = {torch.relu: nn.ReLU, torch.nn.functional.relu: nn.ReLU, torch.nn.functional.relu6: nn.ReLU6,
                         torch.nn.functional.silu: nn.SiLU, torch.nn.functional.hardswish: nn.Hardswish}


def layer_callables(candidates: dict, context: list[nn.Module], example: torch.Tensor, runtime: str, *,
                    threads: int | None = None) -> dict[object, Callable]:
    """Each candidate layer (a conv, a Ghost layer), followed by ``context``, as a function run in ``runtime``.

    The deploy form is what the whole model would run: BN folded, and a Ghost layer's two
    halves returned as they are (in a whole model its consumer reads them without a cat).
    """
    out = {}
    for key, layer in candidates.items():
        gm = fuse_model(nn.Sequential(layer, *context).eval())
        _return_pieces(gm)
        out[key] = runtime_callable(gm, example, runtime, threads=threads, fuse=False)
    return out


def _return_pieces(gm) -> None:
    """When the graph ends in a Ghost layer's cat, return the pieces instead (no cat is timed)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    cat = output.args[0]
    if isinstance(cat, torch.fx.Node) and "ghostify_cat" in cat.meta:
        output.args = (tuple(cat.args[0]),)
        gm.graph.erase_node(cat)
        gm.recompile()
