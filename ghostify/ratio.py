"""The Ghost ratio ``s``: an integer >= 1 or a fraction > 1 (torch-free, so the CLI can parse it)."""
from __future__ import annotations

import math

from .errors import GhostifyError

__all__ = ["check_ratio", "per_parent", "parse_ratios", "ratio_keeping", "rounded_ratio"]


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


def rounded_ratio(out_channels: int, ratio, round_to: int) -> int | float:
    """The ratio that keeps a multiple of ``round_to`` intrinsic maps, the nearest to ``ceil(n / ratio)``.

    Rounded as timm's ``make_divisible``: to the nearest multiple, at least ``round_to``, and up a step
    where the nearest is more than 10 % below. ``ratio`` itself where it already gives such a count or
    where the rounded count would keep every map (no ghost left). ONNX Runtime on CPU runs a conv whose
    channel count is not a multiple of 4 markedly slower (docs/deployment.md, "Channel counts").

    Example:
        >>> math.ceil(160 / 1.4742), rounded_ratio(160, 1.4742, 8), math.ceil(160 / rounded_ratio(160, 1.4742, 8))
        (109, 1.4285714285714286, 112)
        >>> rounded_ratio(64, 2, 8), rounded_ratio(24, 1.26, 8)  # 32 already; 20 -> 24 would keep every map
        (2, 1.26)
    """
    m = math.ceil(out_channels / ratio)
    r = max(round_to, int(m + round_to / 2) // round_to * round_to)
    if r < 0.9 * m:
        r += round_to
    if r == m or r >= out_channels:
        return ratio
    return ratio_keeping(out_channels, r)


def ratio_keeping(out_channels: int, intrinsic: int) -> float:
    """The ratio whose Ghost layer keeps exactly ``intrinsic`` of ``out_channels`` maps: ``n / m``, nudged up
    where floating point makes ``ceil(n / (n / m))`` come out above ``m``.

    Example:
        >>> ratio_keeping(160, 112), math.ceil(160 / ratio_keeping(160, 112))
        (1.4285714285714286, 112)
    """
    s = out_channels / intrinsic
    while math.ceil(out_channels / s) != intrinsic:  # n / (n / m) may round above m
        s = math.nextafter(s, math.inf)
    return s


def parse_ratios(text: str | None) -> list[int | float]:
    """Comma-separated ratios: integers >= 1 or fractions > 1 (``2,3,4`` or ``1.5,2``)."""
    try:
        return [check_ratio(float(t)) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated ratios >= 1, e.g. 2,3,4 or 1.5,2") from None
