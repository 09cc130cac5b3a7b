"""The Ghost ratio ``s``: an integer >= 1 or a fraction > 1 (torch-free, so the CLI can parse it)."""
from __future__ import annotations

import math

from .errors import GhostifyError

__all__ = ["check_ratio", "per_parent", "parse_ratios"]


def check_ratio(ratio) -> int | float:
    """``ratio`` as a number: an integer >= 1 or a fraction > 1 (``1.5`` keeps two thirds of the filters).

    Example:
        >>> check_ratio(2.0), check_ratio(1.5)
        (2, 1.5)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio must be a number >= 1 (got {ratio!r}); try --ratio 2 (or 1.5 to keep 2/3 of the filters)")
    return int(ratio) if float(ratio).is_integer() else float(ratio)


def per_parent(ratio: float) -> int:
    """Ghost slots per intrinsic map for the depthwise cheap op: ``ceil(ratio - 1)`` (1 for ``1 < ratio < 2``)."""
    return math.ceil(ratio - 1)


def parse_ratios(text: str | None) -> list[int | float]:
    """Comma-separated ratios: integers >= 1 or fractions > 1 (``2,3,4`` or ``1.5,2``)."""
    try:
        return [check_ratio(float(t)) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated ratios >= 1, e.g. 2,3,4 or 1.5,2") from None
