"""Everything ghostify writes: one atomic writer for files, the checks made before any work, strict JSON.

Every output file goes through :func:`atomic_write`: the bytes go to a temporary sibling
(``.NAME.PID.XXXX.tmp``) that is renamed over the target only once complete, so a killed
process or a full disk never leaves a half-written file under the real name. An existing
file is replaced only with ``force``, and never when it is not a regular file (a device, a
folder). Temporary files left by a killed writer are removed by the next write of the same
name. Written files get ordinary permissions (``0666`` less the umask), whatever wrote them.

The command line calls :func:`check_output` for each output before it starts working, so a
bad path fails in a second, not after an hour of calibration.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import GhostifyError

__all__ = ["check_output", "atomic_write", "to_json"]


def check_output(path: str | os.PathLike | None, *, force: bool = False, suffixes: Iterable[str] = (),
                 option: str = "-o") -> Path:
    """Refuse an output path now, before any work: empty, wrong suffix, existing (without ``force``),
    not a regular file (even with ``force``), or in a folder that cannot be written.

    Example:
        >>> import tempfile, os
        >>> check_output(os.path.join(tempfile.mkdtemp(), "new.json")).name
        'new.json'
        >>> check_output("/dev/null", force=True)
        Traceback (most recent call last):
        ...
        ghostify.errors.GhostifyError: '/dev/null' is not a regular file; refusing to replace it even with --force
    """
    if path is None or not str(path).strip():
        raise GhostifyError(f"{option}: the output path is empty; give a file name")
    p = Path(path)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise GhostifyError(f"{option} '{p}': {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise GhostifyError(f"'{p}' is {kind}; refusing to replace it even with --force")
    suffixes = tuple(suffixes)
    if suffixes and p.suffix not in suffixes:
        raise GhostifyError(f"{option} '{p}': the file is written in the {suffixes[0]} format; "
                            f"name it with the {' or '.join(suffixes)} suffix")
    if st is not None and not force:
        raise GhostifyError(f"'{p}' exists; pass --force (force=True) to overwrite it")
    folder = p.parent if str(p.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise GhostifyError(f"{option} '{p}': '{folder}' is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GhostifyError(f"{option} '{p}': cannot write in '{folder}' (permission denied)")
    return p


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], Any], *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``data`` is bytes, text, or ``write(tmp_path)`` that writes the file.

    Refuses as :func:`check_output` does. Returns the path.

    Example:
        >>> import tempfile, os
        >>> p = atomic_write(os.path.join(tempfile.mkdtemp(), "a.txt"), "hello")
        >>> p.read_text()
        'hello'
    """
    p = check_output(path, force=force)
    p.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temps(p: Path) -> None:
    """Delete ``.NAME.PID.*.tmp`` siblings whose writer process no longer exists (killed mid-write)."""
    pattern = re.compile(rf"^\.{re.escape(p.name)}\.(\d+)\.[^/]+\.tmp$")
    try:
        siblings = list(os.scandir(p.parent))
    except OSError:
        return
    for entry in siblings:
        match = pattern.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def to_json(obj: Any, **kwargs) -> str:
    """``json.dumps`` that never writes NaN or Infinity (invalid JSON): non-finite numbers become ``null``.

    Example:
        >>> to_json({"kl": float("nan"), "top1": 0.5})
        '{"kl": null, "top1": 0.5}'
    """
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
