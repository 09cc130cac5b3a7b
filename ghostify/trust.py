"""The trust boundary: what a file may name, and the one place that imports code by name.

A file from someone else is data: a model, recipe or configuration that names
``package.module:callable`` is refused unless the name is one of ghostify's own builders or
torchvision's, or the caller passes ``trust_code=True`` (``--trust-code``).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .errors import GhostifyError

__all__ = ["TRUST_HINT", "CHECKPOINT_SUFFIXES", "GHOSTIFY_BUILDERS", "import_object", "trusted_target", "check_trusted"]

# What every "this file names code" error ends with.
TRUST_HINT = ("ghostify runs no code a file names: pass the architecture yourself (ghostify.load(path, "
              "arch=build_net) or arch='package.module:callable'), or --trust-code (trust_code=True) if you trust "
              "the file")

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")

# ghostify's own model builders (ghostify.reference:NAME): the allow-list a file may name without --trust-code.
# ghostify.zoo.reference builds its BUILDERS registry from this list, so the two cannot differ.
GHOSTIFY_BUILDERS = ("resnet20", "vgg_small", "resnet56", "vgg16_cifar")


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
        return attr in GHOSTIFY_BUILDERS
    if mod == "torchvision.models" or mod.startswith("torchvision.models."):
        import torchvision  # late: heavy, and this module is torch-free at import

        return attr in torchvision.models.list_models()
    return False


def check_trusted(spec: str, source: str, trust_code: bool = False) -> None:
    """Refuse a model spec read from a file (``source``) that would import code, unless ``trust_code``.

    Torchvision names, ghostify's own builders and file paths pass (files are loaded by the same rules).
    """
    if trust_code or ":" not in str(spec) or Path(spec).suffix in CHECKPOINT_SUFFIXES or trusted_target(spec):
        return
    raise GhostifyError(f"'{source}' names the architecture '{spec}', which is code; {TRUST_HINT}")
