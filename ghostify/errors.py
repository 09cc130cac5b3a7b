"""The one exception type ghostify raises for user errors (bad input, untraceable case, corrupt file)."""

__all__ = ["GhostifyError", "describe"]


class GhostifyError(ValueError):
    """A user-facing error: the message names the layer or input at fault and the fix."""


def describe(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, for one-line error reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
