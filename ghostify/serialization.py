"""Save and load converted models: safetensors weights plus the plan and the architecture recipe.

The file holds the converted model's state dict and, in its metadata, how to rebuild it:
the original architecture's recipe (torchvision name or ``package.module:callable``), the
plan, and which layers had their channel order folded. ``load`` builds the original
architecture with random weights, replays the plan, and loads the weights, as Torch-Pruning
replays its edit history on a fresh copy of the architecture.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from torch import nn

from .conversion.fold import would_fold
from .conversion.plan import Plan
from .conversion.rewrite import conversion_info, convert
from .errors import GhostifyError, describe
from .outputs import atomic_write, check_output, to_json
from .trust import import_object
from .arch import build_arch, infer_arch_from, signature_digest

__all__ = ["save", "load", "read_metadata", "FORMAT"]

FORMAT = "ghostify/1"


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False, arch: dict | str | None = None) -> Path:
    """Write a converted model to ``path`` (``.safetensors``). Refuses to overwrite unless ``force=True``.

    Args:
        arch: how to rebuild the original architecture when ghostify cannot tell by itself:
            ``"package.module:callable"`` or a recipe dict. Models built by ``ghostify`` or by
            torchvision's builders are recognised without it.

    Example:
        >>> import torchvision, ghostify, tempfile, os
        >>> ghost = ghostify.convert(torchvision.models.resnet18())
        >>> path = ghostify.save(ghost, os.path.join(tempfile.mkdtemp(), "r18-ghost.safetensors"))
        >>> type(ghostify.load(path)).__name__
        'ResNet'
    """
    from safetensors.torch import save_file

    info = conversion_info(model)
    if info is None:
        raise GhostifyError("this model was not made by ghostify.convert (no ghostify_info); "
                            "save plain models with torch.save or safetensors")
    path = check_output(path, force=force, suffixes=(".safetensors",))
    if isinstance(arch, str):
        arch = {"kind": "callable", "target": arch, "kwargs": {}, "name": arch}
    arch = arch or info.arch or (infer_arch_from(*info.source) if info.source else None)
    meta = {"format": FORMAT, "arch": arch, "mode": info.mode, "fold": info.fold, "folded": info.folded,
            "plan": info.plan.to_dict(), "layer_info": info.layer_info, "training": model.training,
            "source": {"digest": signature_digest(info.source[1])} if info.source else None}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    text = to_json(meta)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"ghostify": text}), force=force)


def read_metadata(path: str | os.PathLike) -> dict:
    """The ghostify metadata of a saved model; a clear error for a missing, corrupt or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GhostifyError(f"'{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise GhostifyError(f"'{path}' is not a readable safetensors file ({describe(exc)}); "
                            "it may be truncated or corrupt") from None
    if "ghostify" not in meta:
        raise GhostifyError(f"'{path}' is a safetensors file but not one written by ghostify.save; "
                            "load plain weights with --weights PATH on the original model")
    try:
        meta = json.loads(meta["ghostify"])
    except json.JSONDecodeError:
        raise GhostifyError(f"'{path}' has corrupt ghostify metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GhostifyError(f"'{path}' has format {meta.get('format') if isinstance(meta, dict) else None!r}; "
                            f"this ghostify reads {FORMAT!r}")
    folded = meta.get("folded")
    if (not isinstance(meta.get("plan"), dict) or not isinstance(meta["plan"].get("entries"), list)
            or not isinstance(folded, list) or not all(isinstance(n, str) for n in folded)
            or not isinstance(meta.get("arch"), (dict, type(None)))
            or not isinstance(meta.get("layer_info", {}), dict)):
        raise GhostifyError(f"'{path}' has corrupt ghostify metadata (plan, folded, arch or layer_info malformed)")
    return meta


def load(path: str | os.PathLike, model: nn.Module | None = None, *, arch: Callable | str | None = None,
         trust_code: bool = False, map_location: str = "cpu") -> nn.Module:
    """Rebuild a converted model saved by :func:`save`, with identical outputs.

    A file is data: loading it imports and calls nothing it names, except torchvision's model
    builders and ghostify's own (``ghostify.reference``). A file whose architecture is another
    ``package.module:callable`` needs ``arch`` (or ``model``) from you, or ``trust_code=True``.

    Args:
        model: a fresh instance of the *original* architecture (random weights are fine).
        arch: the original architecture's builder, a callable or ``"package.module:callable"``;
            it is called with the keyword arguments the file records.
        trust_code: build the ``package.module:callable`` the file names (only for files you trust).

    Example: see :func:`save`.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    recorded = meta.get("arch")
    if model is None and arch is not None:
        builder = import_object(arch) if isinstance(arch, str) else arch
        if not callable(builder):
            raise GhostifyError(f"arch={arch!r} is not callable; pass a function or class that builds the model")
        model = builder(**((recorded or {}).get("kwargs") or {}))
        if not isinstance(model, nn.Module):
            raise GhostifyError(f"arch={arch!r} returned {type(model).__name__}, not an nn.Module")
    elif model is None:
        if recorded is None:
            raise GhostifyError(f"'{path}' records no architecture recipe; pass the original architecture: "
                                "ghostify.load(path, model=MyNet()) or arch=build_net")
        model = build_arch(recorded, trust_code=trust_code, source=str(path))
    source = (meta.get("source") or {}).get("digest") if isinstance(meta.get("source"), dict) else None
    if source is not None and signature_digest(model) != source:
        raise GhostifyError(f"the weights in '{path}' do not fit: the model built for it is not the architecture it "
                            "was converted from (its layers or shapes differ); pass the original: "
                            "ghostify.load(path, model=...)")
    try:
        plan = Plan.from_dict(meta["plan"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GhostifyError(f"'{path}' has a corrupt plan in its metadata ({describe(exc)})") from None
    ghost = convert(model, plan=plan, fold=False, initialize=False)
    info = ghost.ghostify_info
    try:
        state = load_file(str(path), device=map_location)
        ghost.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise GhostifyError(f"weights in '{path}' do not fit the rebuilt model: "
                            f"{str(exc).splitlines()[0]}; was it saved from another architecture?") from None
    # The folded layers' consumers hold permuted weights: the list must be what folding this model gives
    # (or empty for an unfolded one), else the outputs would be silently wrong.
    folded, fold = list(meta["folded"]), meta.get("fold", bool(meta["folded"]))
    expected = would_fold(ghost) if fold and info.mode == "fx" else set()
    if len(set(folded)) != len(folded) or set(folded) != expected:
        raise GhostifyError(f"'{path}' lists layers as folded that do not match the model (the file was altered "
                            "or is corrupt); its outputs would be wrong, so it is not loaded")
    for name in folded:
        ghost.get_submodule(name).emit_internal_order = True
    info.folded, info.fold, info.layer_info, info.arch = folded, bool(fold), meta.get("layer_info", {}), recorded
    if isinstance(arch, str):
        info.arch = {"kind": "callable", "target": arch, "kwargs": (recorded or {}).get("kwargs") or {}, "name": arch}
    ghost.train(bool(meta.get("training", False)))
    if info.arch is not None:
        ghost.ghostify_arch = info.arch
    return ghost
