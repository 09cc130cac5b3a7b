"""Small helpers every stage shares: one eval-mode context, one table renderer, one forward-hook capture,
one socket timeout. (Output files have their own module, :mod:`ghostify.outputs`.)"""
from __future__ import annotations

import socket
from contextlib import contextmanager

__all__ = ["download_timeout", "eval_mode", "format_table", "format_size", "capture"]


@contextmanager
def download_timeout(seconds: float = 20.0):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextmanager
def eval_mode(*modules):
    """Switch ``modules`` to eval mode for the block and give each submodule back its own ``training`` flag
    afterwards (a model training with frozen BN layers gets them back in eval mode).

    ``None`` entries are ignored, so an optional baseline can be passed as is.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2).train()
        >>> with eval_mode(net, None):
        ...     net.training
        False
        >>> net.training
        True
    """
    mods = [m for m in modules if m is not None]
    modes = [(sub, sub.training) for m in mods for sub in m.modules()]  # each submodule's own (frozen BN stays eval)
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def format_table(rows, *, markdown: bool = False) -> str:
    """Rows of strings (the first one the header) as a fixed-width table: columns two spaces apart with a
    dashed line under the header, or a Markdown table (``markdown=True``).

    Example:
        >>> print(format_table([("layer", "ratio"), ("conv1", "2")]))
        layer  ratio
        ------------
        conv1  2
    """
    rows = [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    else:
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


class _Stop(Exception):
    pass


def capture(model, modules: dict, x, *, what: str = "input", stop: bool = False) -> dict:
    """One forward of ``model`` on ``x`` that records the first input (``what="input"``) or output
    (``"output"``) of each module in ``modules`` (``{key: module}``), by key in the order the modules
    first ran, tensors detached (a module's non-tensor output, e.g. a tuple, as it is).

    ``stop=True`` ends the forward once every module has been seen (the rest of the model does not
    run). Hooks are removed afterwards; no gradients are recorded.
    """
    import torch

    got, handles = {}, []

    def keep(key):
        def hook(mod, args, output=None):
            value = args[0] if what == "input" else output
            got.setdefault(key, value.detach() if isinstance(value, torch.Tensor) else value)
            if stop and len(got) == len(modules):
                raise _Stop

        return hook

    for key, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(keep(key)) if what == "input"
                       else mod.register_forward_hook(keep(key)))
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def format_size(x: float) -> str:
    """Three significant figures with a K/M/G suffix, as fvcore's tables write sizes."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
