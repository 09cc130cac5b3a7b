"""Architectures by recipe: torchvision names and ``package.module:callable`` builders, weights for them, and the
recipe (``model.ghostify_arch``) that lets a saved model be rebuilt; signatures that say which architecture or which
trained model a module is. It sits below :mod:`ghostify.serialization` (which rebuilds a saved model's
architecture) and :mod:`ghostify.zoo` (whose ``get_model`` also opens checkpoint files)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._util import download_timeout
from .errors import GhostifyError, describe
from .trust import check_trusted, import_object

__all__ = ["build_model", "build_arch", "list_models", "load_weights", "signature_digest", "weights_digest",
           "infer_arch", "infer_arch_from", "load_pickle"]


def list_models() -> list[str]:
    """Names of the torchvision classification models ``get_model`` accepts."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_weights(name: str, weights: str):
    import torchvision

    if weights.lower() == "none":
        return None
    enum = torchvision.models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights.split(".")[-1]]
    except KeyError:
        raise GhostifyError(f"unknown weights '{weights}' for {name}; choose one of "
                            f"{['DEFAULT'] + [w.name for w in enum] + ['none']} or a file path") from None


def _cached(weights_enum) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)).is_file()


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict file (``.pth``/``.pt`` or ``.safetensors``) into ``model``, strictly."""
    path = Path(path)
    if not path.is_file():
        raise GhostifyError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise GhostifyError(f"cannot read weights from '{path}': {describe(exc)}; "
                                "is the file complete?") from None
    else:
        state = load_pickle(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise GhostifyError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise GhostifyError(f"weights in '{path}' do not fit the model: {first[0].strip()}") from None
    return model


def build_arch(arch: dict, weights: str | None = "none", *, trust_code: bool = False,
               source: str = "the file") -> nn.Module:
    """Build a model from a recipe recorded in ``model.ghostify_arch`` (read from ``source``).

    A torchvision name or one of ghostify's own builders is built as is; any other
    ``module:callable`` only with ``trust_code=True``: the recipe comes from a file, and a file is data.
    """
    kind = arch.get("kind") if isinstance(arch, dict) else None
    kwargs = arch.get("kwargs") if isinstance(arch, dict) else None
    if kind not in ("torchvision", "callable") or not isinstance(kwargs or {}, dict):
        raise GhostifyError(f"'{source}' records an unknown architecture recipe {arch!r}")
    kwargs = dict(kwargs or {})
    if kind == "torchvision":
        name = str(arch.get("name"))
        if name not in list_models():
            raise GhostifyError(f"'{source}' records the architecture '{name}', which is not a torchvision "
                                "classification model; pass the original architecture: ghostify.load(path, model=...)")
        return build_model(name, weights=weights or "none", **kwargs)
    target = str(arch.get("target"))
    check_trusted(target, source, trust_code)
    return build_model(target, weights=weights or "none", **kwargs)


def build_model(spec: str, weights: str | None = "DEFAULT", **kwargs) -> nn.Module:
    """A model from a torchvision name or ``package.module:callable`` (never a checkpoint file), in eval mode,
    recording its recipe in ``model.ghostify_arch``; ``weights`` as for :func:`ghostify.get_model`."""
    import torchvision

    weights = "none" if weights is None else str(weights)
    is_path = weights.lower() not in ("none", "default") and (Path(weights).suffix or os.sep in weights)
    if ":" in spec:
        factory = import_object(spec)
        if not callable(factory):
            raise GhostifyError(f"'{spec}' is not callable")
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise GhostifyError(f"'{spec}' returned {type(model).__name__}, not an nn.Module")
        if is_path:
            load_weights(model, weights)
        elif weights not in ("none", "DEFAULT"):
            raise GhostifyError(f"--weights for '{spec}' must be none or a file path (got '{weights}')")
        model.ghostify_arch = {"kind": "callable", "target": spec, "kwargs": kwargs, "name": spec}
        return model.eval()
    names = list_models()
    if spec not in names:
        import difflib

        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise GhostifyError(f"unknown model '{spec}'.{hint} Use a torchvision classification model name "
                            "('ghostify models' lists them), package.module:callable, or a checkpoint path")
    if is_path:
        model = load_weights(torchvision.models.get_model(spec, weights=None, **kwargs), weights)
    else:
        w = _torchvision_weights(spec, weights)
        if weights == "DEFAULT" and w is not None and not _cached(w):
            # Offline, DEFAULT falls back to another release of the same weights already in the cache.
            alt = [o for o in type(w) if o is not w and _cached(o)]
            if alt:
                print(f"note: {spec} DEFAULT weights ({w.name}) are not cached; using cached {alt[0].name}",
                      file=sys.stderr)
                w = alt[0]
        try:
            with download_timeout():
                model = torchvision.models.get_model(spec, weights=w, **kwargs)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated cache file a RuntimeError
            raise GhostifyError(
                f"could not get the {weights} weights of {spec} ({describe(exc)}): "
                f"no network? Use --weights none for "
                f"random weights, or --weights PATH for a state dict file (torch hub cache: "
                f"{torch.hub.get_dir()}/checkpoints)") from None
    model.ghostify_arch = {"kind": "torchvision", "name": spec, "kwargs": kwargs}
    return model.eval()


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def signature_digest(model: nn.Module | list[tuple[str, tuple[int, ...]]]) -> str:
    """A short hash of a model's state-dict signature (keys and shapes, or ``[(key, shape), ...]``):
    which architecture it is, whatever its weights.

    Example:
        >>> import torchvision
        >>> a, b = (signature_digest(f()) for f in (torchvision.models.resnet18, torchvision.models.vgg11))
        >>> a == signature_digest(torchvision.models.resnet18(num_classes=1000)), a == b
        (True, False)
    """
    import hashlib

    sig = _signature(model) if isinstance(model, nn.Module) else model
    text = json.dumps([[k, list(shape)] for k, shape in sig])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's state dict, values included: which trained model it is.

    Example:
        >>> import torchvision
        >>> torch.manual_seed(0); a = weights_digest(torchvision.models.resnet18())
        >>> torch.manual_seed(0); a == weights_digest(torchvision.models.resnet18())
        True
    """
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def infer_arch(model: nn.Module) -> dict | None:
    """Find a recipe that rebuilds ``model``'s architecture (same state-dict keys and shapes), or None.

    Example:
        >>> import torchvision
        >>> infer_arch(torchvision.models.resnet34())["name"]
        'resnet34'
    """
    arch = getattr(model, "ghostify_arch", None)
    return arch if arch is not None else infer_arch_from(type(model), _signature(model))


def infer_arch_from(cls: type, sig: list[tuple[str, tuple[int, ...]]]) -> dict | None:
    """:func:`infer_arch` from a class and a state-dict signature ``[(key, shape), ...]``.

    Tries the torchvision builders of the class (default, then ``num_classes`` read off the
    signature), then the class itself with no arguments; candidates are built on the
    ``meta`` device, so no memory is spent.
    """
    import torchvision

    candidates: list[tuple[dict, Any]] = []
    if cls.__module__.startswith("torchvision.models"):
        classes = sig[-1][1][0] if sig and len(sig[-1][1]) == 1 else None  # last bias: num_classes
        for name in list_models():
            builder = torchvision.models.get_model_builder(name)
            if getattr(builder, "__module__", None) == cls.__module__:
                for kw in ({}, {"num_classes": classes}):
                    candidates.append(({"kind": "torchvision", "name": name, "kwargs": kw},
                                       lambda b=builder, k=kw: b(weights=None, **k)))
    elif cls.__module__ != "__main__":
        target = f"{cls.__module__}:{cls.__qualname__}"
        candidates.append(({"kind": "callable", "target": target, "kwargs": {}, "name": target}, cls))
    for arch, build in candidates:
        try:
            with torch.device("meta"):
                cand = build()
        except Exception:
            continue
        if type(cand) is cls and _signature(cand) == sig:
            return arch
    return None


def load_pickle(path: str | os.PathLike, trust_code: bool = False) -> Any:
    """``torch.load`` of a ``.pt``/``.pth``/``.ckpt`` file as data (``weights_only=True``): tensors, numbers,
    strings, lists and dicts. A file that needs more (a whole pickled model) is refused in one line unless
    ``trust_code``: unpickling it would run code the file names.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_code)
    except Exception as exc:
        if not trust_code and "weights_only" in str(exc):
            raise GhostifyError(
                f"'{path}' holds pickled Python objects (e.g. a whole model saved with torch.save(model)); "
                "loading it would run code from the file. Save a state dict (torch.save(model.state_dict())) "
                "or use ghostify.save, or pass --trust-code (trust_code=True) if you trust the file") from None
        raise GhostifyError(f"cannot read checkpoint '{path}': {describe(exc)}; is the file complete?") from None
