"""The run directory: its marker, staged set-up beside an old run, replacement, and the run's own files."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..errors import GhostifyError
from ..outputs import atomic_write
from .recipe import Recipe, dump_yaml

__all__ = ["RUN_MARKER", "is_run_dir", "check_run_dir", "begin_run_dir", "commit_run_dir", "staging", "write_text",
           "truncate_jsonl"]

RUN_MARKER = ".ghostify-run"  # only ghostify writes it (the run's id): --force replaces only folders holding it


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text, force=True)  # files of the run itself


def is_run_dir(path: Path) -> bool:
    """True when ``path`` is a folder that ghostify made for a fine-tuning run (it holds the run marker)."""
    marker = Path(path) / RUN_MARKER
    try:
        return marker.is_file() and not marker.is_symlink() and bool(json.loads(marker.read_text()).get("run_id"))
    except (OSError, ValueError, AttributeError):
        return False


def staging(run_dir: Path, what: str) -> Path:
    """The hidden sibling a new run is set up in (``new``) or an old run waits in while it is replaced (``old``)."""
    return run_dir.parent / f".{run_dir.name}.ghostify-{what}"


def check_run_dir(run_dir: Path, force: bool, recipe_path: Path | None) -> None:
    """Refuse, before any work, a run folder that is not ghostify's to replace."""
    target, cwd = run_dir.resolve(), Path.cwd().resolve()
    why = ("the file system root" if target == Path(target.anchor) else "your home folder"
           if target == Path.home().resolve() else "the current folder" if target == cwd
           else "a parent of the current folder" if target in cwd.parents else None)
    if why is None and recipe_path is not None and target in recipe_path.resolve().parents:
        why = "the folder holding the recipe"
    if why:
        raise GhostifyError(f"the run folder '{run_dir}' is {why}; a run needs a folder of its own: "
                            "-o runs/NAME (or --set output_dir=...)")
    old = staging(run_dir, "old")
    if is_run_dir(old) and os.environ.get("RANK", "0") == "0":
        # a replacement was cut short: the old run is put back, or dropped if the new one is in place
        if run_dir.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, run_dir)
            print(f"note: restored the run '{run_dir}' that an interrupted --force was replacing", file=sys.stderr)
    if not (run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))):
        return
    if not force:
        raise GhostifyError(f"output directory '{run_dir}' exists and is not empty; pass --force to replace it, "
                            f"--resume {run_dir / 'last.ckpt'} to continue it, or --set output_dir=OTHER")
    if not is_run_dir(run_dir):
        raise GhostifyError(f"output directory '{run_dir}' holds files but is not a ghostify run ({RUN_MARKER} "
                            "missing); refusing to delete it even with --force: choose --set output_dir=OTHER")


def begin_run_dir(run_dir: Path, cfg: Recipe) -> Path:
    """A fresh staging folder for the new run, with its marker and recipe; the old run is not touched yet."""
    import uuid

    new = staging(run_dir, "new")
    if new.exists() or new.is_symlink():
        if not is_run_dir(new):
            raise GhostifyError(f"'{new}' is in the way of the new run and is not a ghostify run; move it away")
        shutil.rmtree(new)  # left by a set-up that was killed
    new.mkdir(parents=True)
    write_text(new / RUN_MARKER, json.dumps({"run_id": uuid.uuid4().hex, "name": cfg.name}) + "\n")
    write_text(new / "recipe.yaml", dump_yaml(cfg))
    return new


def commit_run_dir(new: Path, run_dir: Path) -> None:
    """Put the set-up run in place: the old run (if any) is moved aside, replaced, then deleted."""
    old = staging(run_dir, "old")
    if run_dir.exists():
        os.rename(run_dir, old)
    os.rename(new, run_dir)
    if old.exists():
        shutil.rmtree(old)


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows if keep(r)))
