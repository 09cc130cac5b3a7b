"""The lockstep pass of ``init="calib"``: one walk over the converted graph that runs the original and the
converted model side by side and fits each layer as soon as its input exists."""
from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from .._util import capture, eval_mode, format_size
from .registry import Layer

__all__ = ["Lockstep", "check_memory"]


class Lockstep(fx.Interpreter):
    """One pass over the converted graph that computes every node for the original and the converted model.

    Each node's value is a pair ``(original's values, converted's values)``, one per batch, kept
    until its last user has run (``fx.Interpreter``'s garbage collection), so every layer is
    fitted as soon as its input exists: the cost is one forward of each model, not one partial
    forward per layer. Values of modules that were not converted are computed with the
    original's module for the original and the converted model's own for the other. Where both
    models compute the same thing (every input shared, the same module weights: the nodes before
    the first fitted layer and the branches no fitted layer feeds) the value is computed once and
    held once, the same list on both sides; where the sides part, the converted side gets its own
    copy of the inputs held once, so an in-place op changes one side only, as before (should the op
    change a tensor that another value held once is a view of, the pass starts again holding every
    value per model). With ``sequential=False`` every layer is fitted on the original's inputs, so
    the converted side is never computed: the pass is one forward of the original. A failure says
    which node was executing (``fx.Interpreter``'s "While executing ...").

    ``fit(layer, inputs, targets) -> (record, outputs)`` fits one layer; :meth:`fit_all` runs the
    pass and returns the records by layer name.
    """

    def __init__(self, original: nn.Module, converted: fx.GraphModule, layers: list[Layer], batches,
                 sequential: bool, fit):
        super().__init__(converted, garbage_collect_values=True)
        self.original, self.batches, self.sequential, self.fit = original, batches, sequential, fit
        self.by_name = {layer.name: layer for layer in layers}
        self.info: dict[str, dict] = {}
        self._same: dict[str, bool] = {}
        self.share = True

    def fit_all(self) -> dict:
        try:
            self.run(enable_io_processing=False)
        except _SharedAliasMutated:  # rare: start again, every value held per model from the input on
            self.share, self.info = False, {}
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

    def _shared(self, node: fx.Node) -> bool:
        """Whether both models compute ``node`` alike: every input the same object, the same module."""
        if not self.share:
            return False
        if not all(self.env[a][0] is self.env[a][1] for a in node.all_input_nodes):
            return False
        if node.op != "call_module":
            return True
        if node.target not in self._same:
            self._same[node.target] = _same_module(self.original.get_submodule(node.target),
                                                   self.module.get_submodule(node.target))
        return self._same[node.target]

    def _part(self, node: fx.Node) -> list[tuple[fx.Node, list]]:
        """Give the converted side its own copy of each input of ``node`` held once for both, before the sides
        part at ``node``: an in-place op then changes one side's copy, as it would in two separate passes.
        Returns the inputs copied, with the original's values."""
        copied = []
        for a in node.all_input_nodes:
            o, c = self.env[a]
            if o is c:
                self.env[a] = o, [v.clone() if isinstance(v, torch.Tensor) else v for v in o]
                copied.append((a, o))
        return copied

    def _check_aliases(self, copied: list[tuple[fx.Node, list]]) -> None:
        """After the original's side ran a parting node: if it changed an input held for both in place and another
        value held for both shares that input's memory (a view), the converted side would see the original's
        change there; start again without holding anything once (:meth:`fit_all`)."""
        split = {a for a, _ in copied}  # held once until this node: their copies do not share memory either
        for a, values in copied:
            changed = [o for o, c in zip(values, self.env[a][1])
                       if isinstance(o, torch.Tensor) and not torch.equal(o, c)]
            ptrs = {t.untyped_storage().data_ptr() for t in changed}
            for k, (o, c) in self.env.items() if ptrs else ():
                if k is not a and (o is c or k in split) and any(
                        isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in ptrs for v in o):
                    raise _SharedAliasMutated(k.name)

    def run_node(self, node: fx.Node):
        n = range(len(self.batches))
        if node.op == "output":
            return None
        if node.op == "placeholder":
            return (batches := list(self.batches)), batches
        if node.op == "get_attr":
            o, c = _fetch(self.original, node.target), _fetch(self.module, node.target)
            return ((same := [o] * len(n)), same) if _same_value(o, c) else ([o] * len(n), [c] * len(n))
        layer = self.by_name.get(node.target) if node.op == "call_module" else None
        if layer is None:
            if self._shared(node):
                return (outs := [self._apply(node, self.original, 0, b) for b in n]), outs
            copied = self._part(node)
            outs_o = [self._apply(node, self.original, 0, b) for b in n]
            self._check_aliases(copied)
            return outs_o, [self._apply(node, self.module, 1, b) for b in n]
        outs_o = [self._apply(node, self.original, 0, b) for b in n]
        side = 1 if self.sequential else 0
        xs = [fx.node.map_arg(node.args, lambda a: self.env[a][side][b])[0] for b in n]
        self.info[layer.name], outs_c = self.fit(layer, xs, outs_o)
        return (outs_o, outs_c) if self.sequential else (outs_o, outs_o)  # not sequential: no fit reads side 1


class _SharedAliasMutated(Exception):
    """An in-place op of the original's side reached a value held once for both models."""


def check_memory(original: nn.Module, batches: list[torch.Tensor], layers: list[str]) -> None:
    """Warn, naming the fix, when the lockstep pass will not fit in the memory of the batches' device.

    The pass holds a layer's outputs for every calibration image at once: once while both models compute
    alike, for each model after the first converted layer in ``layers``. Its peak is then about 2x the
    largest output of one image (measured on the first image) times the images before that layer and 4x
    after it (measured: 2.0x and 3.8-4.3x on MobileNetV2, besides the batches themselves); the warning is given
    when that exceeds 80 % of what is available (the fits need some too).
    """
    leaves = {name: m for name, m in original.named_modules() if next(m.children(), None) is None}
    with eval_mode(original):
        outs = capture(original, leaves, batches[0][:1], what="output")
    # (leaf module, bytes of its output for one image), in the order they ran
    sizes = [(name, t.numel() * t.element_size()) for name, t in outs.items() if isinstance(t, torch.Tensor)]
    converted = set(layers)
    parted = next((i for i, (name, _) in enumerate(sizes) if name in converted), len(sizes))
    per_image = max(((size * (4 if i >= parted else 2), size) for i, (_, size) in enumerate(sizes)), default=(0, 0))
    images = sum(len(b) for b in batches)
    need, free = per_image[0] * images, available_bytes(batches[0].device)
    if free is not None and need > 0.8 * free:
        warnings.warn(f"init='calib' holds a layer's outputs for all {images} calibration images at once: about "
                      f"{format_size(need)}B here ({format_size(per_image[1])}B per image at its largest layer), "
                      f"and {format_size(free)}B are available, so it may run out of memory. "
                      "Calibrate on fewer images (calib_size=, --calib-size) or views (calib_augment=, "
                      "--calib-augment)", stacklevel=2)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, or Linux's ``MemAvailable``; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _same_value(a, b) -> bool:
    """The same object, or tensors of one shape, dtype, device and value."""
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """``a`` and ``b`` compute alike: the same object, or of one class, in one mode (each submodule), with
    equal parameters and buffers (a copy of a module; not one whose weights the conversion changed)."""
    if a is b:
        return True
    if type(a) is not type(b) or [m.training for m in a.modules()] != [m.training for m in b.modules()]:
        return False
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    return sa.keys() == sb.keys() and all(_same_value(sa[k], sb[k]) for k in sa)


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
