"""Tracing: torch.fx symbolic trace with a tracer whose leaf modules the user can extend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import fx, nn

from ..errors import describe
from ..layers import GhostConv2d, GhostModule

__all__ = ["GhostTracer", "TraceResult", "trace"]


class GhostTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps torch.nn modules, Ghost modules and user-named modules opaque.

    Args:
        leaf_modules: module classes or qualified module names not to trace through
            (for example a block with data-dependent control flow).

    Example:
        >>> import torchvision
        >>> graph = GhostTracer().trace(torchvision.models.resnet18())
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = (GhostConv2d, GhostModule) + tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, self.leaf_types) or qualname in self.leaf_names
                or super().is_leaf_module(m, qualname))


@dataclass
class TraceResult:
    """A traced graph module, or the reason tracing failed (``graph_module`` is then None)."""

    graph_module: fx.GraphModule | None
    error: str | None = None


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = ()) -> TraceResult:
    """Symbolically trace ``model``; on failure return the error instead of raising.

    The returned ``GraphModule`` shares parameters with ``model`` (trace a copy to edit it).

    Example:
        >>> import torchvision
        >>> trace(torchvision.models.resnet18()).graph_module is not None
        True
    """
    tracer = GhostTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any tracing failure means: use the swap fallback
        return TraceResult(None, describe(exc))
    name = type(model).__name__
    return TraceResult(fx.GraphModule(tracer.root, graph, name))


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``call_module`` nodes that run an ``nn.Conv2d``, in execution order."""
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods.get(n.target), nn.Conv2d)]


def stem_nodes(gm: fx.GraphModule) -> set[str]:
    """Targets of the convs applied to the model input with no other conv before them."""
    mods = dict(gm.named_modules())
    after_conv: dict[fx.Node, bool] = {}
    stems = set()
    for node in gm.graph.nodes:
        upstream = any(after_conv.get(a, False) for a in node.all_input_nodes)
        is_conv = node.op == "call_module" and isinstance(mods.get(node.target), nn.Conv2d)
        if is_conv and not upstream:
            stems.add(node.target)
        after_conv[node] = upstream or is_conv
    return stems

