"""Counting MACs and parameters with fvcore.

Unit: one multiply-add counts as one MAC (fvcore's "flop"). Convolutions, linear layers,
matmuls and batch norm are counted by fvcore's handles; the Ghost layer's channel
reordering (scatter copies, concatenation, slicing) moves data and counts as zero.
Elementwise ops fvcore does not count (residual adds, activations, max-pooling) are
listed in ``Counts.uncounted`` rather than silently dropped.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .._util import eval_mode, format_size  # noqa: F401  (format_size: re-exported, the unit's formatter)

__all__ = ["Counts", "count", "format_size"]

# data movement only: zero MACs
_ZERO_MAC_OPS = ("aten::index_copy_", "aten::index_copy", "aten::cat", "aten::new_empty", "aten::slice",
                 "aten::empty", "aten::index", "aten::clone", "aten::contiguous")


@dataclass
class Counts:
    """MACs and parameters of one model on one input, total and per module (qualified name)."""

    macs: int
    params: int
    macs_by_module: dict[str, int] = field(default_factory=dict)
    params_by_module: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)


def count(model: nn.Module, inputs: torch.Tensor | tuple) -> Counts:
    """Count MACs (one multiply-add = 1) and parameters of ``model`` on ``inputs``.

    Example:
        >>> c = count(nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.randn(1, 3, 4, 4))
        >>> c.macs, c.params          # 8 filters x 3*3*3 taps x 4*4 positions; 8*3*3*3 weights
        (3456, 216)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice on import
        from fvcore.nn import FlopCountAnalysis, parameter_count

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa = FlopCountAnalysis(model, inputs)
        for op in _ZERO_MAC_OPS:
            fa.set_op_handle(op, None)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = dict(fa.by_module())
        uncounted = dict(fa.unsupported_ops())
    params = dict(parameter_count(model))
    return Counts(int(by_module.get("", 0)), int(params.get("", 0)), by_module, params, uncounted)
