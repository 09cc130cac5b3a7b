"""The init-strategy registry: weight transfer for converted layers, by name.

A strategy is called once per conversion with every layer it owns::

    strategy(original_model, converted_model, layers, **options) -> dict[name, info]

so that per-layer strategies (``copy``, ``random``) and whole-model ones (``calib``) share one
interface. ``layers`` holds :class:`Layer` records with the original conv and its
:class:`~ghostify.GhostConv2d` replacement. :mod:`ghostify.init` registers the built-in ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..layers import GhostConv2d

__all__ = ["Layer", "INITS", "register_init"]


@dataclass
class Layer:
    """One conversion: the layer's qualified name, the original conv and its replacement.

    ``fixed_order``: the layer's channel order cannot be folded into its consumers (its
    output meets a residual add, a concat or the model output), so the strategy must keep
    the identity layout - intrinsic channels ``0..m-1``, ghost ``k`` = channel ``m + k`` - and
    the layer runs as a plain ``cat`` with no reordering.
    """

    name: str
    conv: nn.Conv2d
    ghost: GhostConv2d
    fixed_order: bool = False
    cheap_auto: bool = False  # the spec says cheap="auto": the strategy picks the family (see LayerSpec)


InitFn = Callable[..., dict]
INITS: dict[str, InitFn] = {}


def register_init(name: str):
    """Register an init strategy under ``name``; a duplicate name is refused.

    Example:
        >>> @register_init("zeros-demo")
        ... def zeros(original, converted, layers, **options):
        ...     for l in layers:
        ...         nn.init.zeros_(l.ghost.primary.weight)
        ...     return {}
        >>> del INITS["zeros-demo"]
    """

    def add(fn: InitFn) -> InitFn:
        if name in INITS:
            raise ValueError(f"init strategy {name!r} is already registered")
        INITS[name] = fn
        return fn

    return add
