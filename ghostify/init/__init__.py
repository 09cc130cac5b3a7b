"""Initialise: carry the trained weights over to the Ghost layers.

Strategies are registered by name in :data:`INITS` (:mod:`ghostify.init.registry`): ``none``,
``random`` and ``copy`` (:mod:`ghostify.init.transfer`, no data) and ``calib``
(:mod:`ghostify.init.calib`, fitted on calibration data). Importing this package registers them.
"""
from . import calib, transfer  # noqa: F401  (each registers its strategies)
from .registry import INITS, Layer, register_init

__all__ = ["INITS", "Layer", "register_init"]
