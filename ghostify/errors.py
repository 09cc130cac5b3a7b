"""The one exception type ghostify raises for user errors (bad input, untraceable case, corrupt file)."""

__all__ = ["GhostifyError"]


class GhostifyError(ValueError):
    """A user-facing error: the message names the layer or input at fault and the fix."""
