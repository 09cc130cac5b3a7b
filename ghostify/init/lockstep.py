"""The lockstep pass of ``init="calib"``: one walk over the converted graph that runs the original and the
converted model side by side and fits each layer as soon as its input exists."""
from __future__ import annotations

from torch import fx, nn

from .registry import Layer

__all__ = ["Lockstep"]


class Lockstep(fx.Interpreter):
    """One pass over the converted graph that computes every node for the original and the converted model.

    Each node's value is a pair ``(original's values, converted's values)``, one per batch, kept
    until its last user has run (``fx.Interpreter``'s garbage collection), so every layer is
    fitted as soon as its input exists: the cost is one forward of each model, not one partial
    forward per layer. Values of modules that were not converted are computed with the
    original's module for the original and the converted model's own for the other. A failure
    says which node was executing (``fx.Interpreter``'s "While executing ...").

    ``fit(layer, inputs, targets) -> (record, outputs)`` fits one layer; :meth:`fit_all` runs the
    pass and returns the records by layer name.
    """

    def __init__(self, original: nn.Module, converted: fx.GraphModule, layers: list[Layer], batches,
                 sequential: bool, fit):
        super().__init__(converted, garbage_collect_values=True)
        self.original, self.batches, self.sequential, self.fit = original, batches, sequential, fit
        self.by_name = {layer.name: layer for layer in layers}
        self.info: dict[str, dict] = {}

    def fit_all(self) -> dict:
        self.run(enable_io_processing=False)
        return self.info

    def _apply(self, node: fx.Node, root: nn.Module, side: int, b: int):
        args = fx.node.map_arg(node.args, lambda n: self.env[n][side][b])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n][side][b])
        if node.op == "call_module":
            return root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)  # call_method

    def run_node(self, node: fx.Node):
        n = range(len(self.batches))
        if node.op == "output":
            return None
        if node.op == "placeholder":
            return list(self.batches), [b.clone() for b in self.batches]
        if node.op == "get_attr":
            return ([_fetch(self.original, node.target)] * len(n), [_fetch(self.module, node.target)] * len(n))
        outs_o = [self._apply(node, self.original, 0, b) for b in n]
        layer = self.by_name.get(node.target) if node.op == "call_module" else None
        if layer is None:
            return outs_o, [self._apply(node, self.module, 1, b) for b in n]
        side = 1 if self.sequential else 0
        xs = [fx.node.map_arg(node.args, lambda a: self.env[a][side][b])[0] for b in n]
        self.info[layer.name], outs_c = self.fit(layer, xs, outs_o)
        return outs_o, outs_c


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
