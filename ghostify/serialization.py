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
import tempfile
from pathlib import Path

from torch import nn

from .errors import GhostifyError, describe

__all__ = ["save", "load", "read_metadata", "FORMAT"]

FORMAT = "ghostify/1"


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False, arch: dict | str | None = None) -> Path:
    """Write a converted model to ``path`` (safetensors). Refuses to overwrite unless ``force=True``.

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

    from .conversion import conversion_info
    from .zoo import infer_arch_from

    info = conversion_info(model)
    if info is None:
        raise GhostifyError("this model was not made by ghostify.convert (no ghostify_info); "
                            "save plain models with torch.save or safetensors")
    path = Path(path)
    if path.exists() and not force:
        raise GhostifyError(f"'{path}' exists; pass --force (force=True) to overwrite it")
    if isinstance(arch, str):
        arch = {"kind": "callable", "target": arch, "kwargs": {}, "name": arch}
    arch = arch or info.arch or (infer_arch_from(*info.source) if info.source else None)
    meta = {"format": FORMAT, "arch": arch, "mode": info.mode, "folded": info.folded,
            "plan": info.plan.to_dict(), "layer_info": info.layer_info, "training": model.training}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"ghostify": json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the temp file is 0600; a saved model gets ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
    if meta.get("format") != FORMAT:
        raise GhostifyError(f"'{path}' has format {meta.get('format')!r}; this ghostify reads {FORMAT!r}")
    return meta


def load(path: str | os.PathLike, model: nn.Module | None = None, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild a converted model saved by :func:`save`, with identical outputs.

    Args:
        model: a fresh instance of the *original* architecture, needed only when the file
            records no recipe (a model class ghostify could not identify).

    Example: see :func:`save`.
    """
    from safetensors.torch import load_file

    from .conversion import convert
    from .plan import Plan
    from .zoo import build_arch

    meta = read_metadata(path)
    if model is None:
        if meta.get("arch") is None:
            raise GhostifyError(f"'{path}' records no architecture recipe; pass the original architecture: "
                                "ghostify.load(path, model=MyNet()), or save with arch='package.module:callable'")
        model = build_arch(meta["arch"])
    ghost = convert(model, plan=Plan.from_dict(meta["plan"]), fold=False, initialize=False)
    info = ghost.ghostify_info
    for name in meta["folded"]:
        ghost.get_submodule(name).emit_internal_order = True
    try:
        state = load_file(str(path), device=map_location)
        ghost.load_state_dict(state)
    except RuntimeError as exc:
        raise GhostifyError(f"weights in '{path}' do not fit the rebuilt model: "
                            f"{str(exc).splitlines()[0]}; was it saved from another architecture?") from None
    info.folded, info.layer_info, info.arch = list(meta["folded"]), meta.get("layer_info", {}), meta.get("arch")
    ghost.train(bool(meta.get("training", False)))
    if info.arch is not None:
        ghost.ghostify_arch = info.arch
    return ghost
