"""The data-source registry and its building blocks: :class:`DataSource` (batches of ``(x, y)``), the
sources registered by name (:func:`register_source`), and the sources made from tensors, datasets and iterables."""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import numpy as np
import torch

from ..errors import GhostifyError

__all__ = ["DataSource", "register_source", "SOURCES", "as_pair", "tensor_source", "dataset_source",
           "iterable_source", "MNIST_MEAN", "MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN",
           "CIFAR10_STD"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DataSource:
    """Batches of ``(x, y)``: ``x`` a float tensor ``(B, *input_size)``, ``y`` a LongTensor of labels or None.

    Each iteration is a new pass (reshuffled when made with ``shuffle=True``); ``len()`` is
    the number of batches. Attributes: ``name``, ``input_size`` (one example's shape, e.g.
    ``(1, 28, 28)``), ``num_examples`` (None when unknown, as for a generator).

    Example:
        >>> src = resolve_data([torch.zeros(4, 1, 28, 28)])
        >>> src.input_size, src.num_examples, len(src)
        ((1, 28, 28), 4, 1)
    """

    def __init__(self, name: str, input_size: tuple[int, ...], num_examples: int | None,
                 num_batches: int | None, batches: Callable[[], Iterator]):
        self.name, self.input_size, self.num_examples = name, tuple(input_size), num_examples
        self._num_batches, self._batches = num_batches, batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self._batches()

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError(f"data source '{self.name}' has no known length (a one-shot iterator)")
        return self._num_batches

    def __repr__(self) -> str:
        return (f"DataSource({self.name!r}, input_size={self.input_size}, num_examples={self.num_examples}, "
                f"batches={self._num_batches})")


SourceFn = Callable[..., DataSource]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str, usage: str | None = None):
    """Register ``fn(arg, *, batch_size, limit, root, shuffle, seed) -> DataSource`` as the spec ``name[:arg]``.

    A duplicate name is refused. ``usage`` is how the spec is written in error messages.

    Example:
        >>> @register_source("zeros-demo", "zeros-demo[:N]")
        ... def zeros(arg, *, batch_size, limit, root, shuffle, seed):
        ...     return resolve_data(torch.zeros(int(arg or 8), 1, 4, 4), batch_size=batch_size, limit=limit)
        >>> resolve_data("zeros-demo:6", batch_size=4).num_examples
        6
        >>> del SOURCES["zeros-demo"]
    """

    def add(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        fn.usage = usage or f"{name}:ARG"
        SOURCES[name] = fn
        return fn

    return add


# -- building blocks -------------------------------------------------------------------------------


def as_pair(batch: Any, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) == 2 else None
        return batch[0], None if y is None else torch.as_tensor(y).long()
    raise GhostifyError(f"batch {i} is a {type(batch).__name__}; a data iterable must yield tensors "
                        "or (x, y) pairs of tensors")


def tensor_source(name, x, y, input_size, batch_size, shuffle, seed, transform=None) -> DataSource:
    """Examples held in memory, batched (and transformed, e.g. uint8 -> normalised float) on the fly."""
    gen = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.randperm(len(x), generator=gen) if shuffle else torch.arange(len(x))
        for idx in order.split(batch_size):
            xb = x[idx]
            yield (transform(xb) if transform else xb), (None if y is None else y[idx])

    return DataSource(name, input_size, len(x), math.ceil(len(x) / batch_size), batches)


def dataset_source(name, dataset, input_size, batch_size, limit, shuffle, seed) -> DataSource:
    from torch.utils.data import DataLoader, Subset

    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(seed))
    return iterable_source(loader, None, name, input_size)


def iterable_source(data: Iterable, limit: int | None, name: str, input_size=None) -> DataSource:
    if isinstance(data, Iterator):  # one pass only: put back the batch peeked at
        first = next(data, None)
        once = itertools.chain([] if first is None else [first], data)
        raw = lambda: once
    else:
        first = next(iter(data), None) if input_size is None else None
        raw = lambda: iter(data)
    if input_size is None:
        if first is None:
            raise GhostifyError(f"the data ({name}) is empty")
        input_size = tuple(as_pair(first, 0)[0].shape[1:])

    def batches():
        seen = 0
        for i, batch in enumerate(raw()):
            x, y = as_pair(batch, i)
            if limit is not None:
                if seen >= limit:
                    return
                x, y = x[: limit - seen], None if y is None else y[: limit - seen]
            seen += len(x)
            yield x, y

    num_examples = num_batches = None
    if isinstance(data, (list, tuple)):
        sizes = [len(as_pair(b, i)[0]) for i, b in enumerate(data)]
        cum = np.cumsum(sizes) if sizes else np.zeros(0, int)
        num_examples = int(cum[-1]) if sizes else 0
        if limit is not None and num_examples > limit:
            num_examples, num_batches = limit, int(np.searchsorted(cum, limit) + 1)
        else:
            num_batches = len(sizes)
    elif hasattr(data, "__len__"):
        num_batches = len(data)
        dataset = getattr(data, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            num_examples = len(dataset) if limit is None else min(limit, len(dataset))
            if getattr(data, "batch_size", None):
                num_batches = min(num_batches, math.ceil(num_examples / data.batch_size))
    return DataSource(name, input_size, num_examples, num_batches, batches)
