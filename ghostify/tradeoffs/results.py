"""A sweep's files: ``results.json`` (read back, and the folder checked before a sweep writes there),
``results.csv``, and the table of points."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .._util import format_table
from ..errors import GhostifyError, describe
from ..outputs import atomic_write, check_output
from .plotting import finite

__all__ = ["SETTINGS_ORDER", "CSV_FIELDS", "check_sweep_folder", "read_results", "write_csv", "read_csv", "table",
           "label"]

SETTINGS_ORDER = ("ratio", "dw_size", "init", "cheap", "scatter", "target_macs", "target_latency", "skip_slower")
CSV_FIELDS = ("point", "status", *SETTINGS_ORDER, "macs", "macs_ratio", "params", "params_ratio", "latency_ms",
              "latency_ratio", "top1", "agree_top1", "kl", "converted", "seconds", "error")


def check_sweep_folder(folder: str | Path) -> Path:
    """Refuse an output folder that holds files but no sweep: a sweep writes only into a new, empty or sweep folder.

    Example:
        >>> import tempfile
        >>> check_sweep_folder(tempfile.mkdtemp()).is_dir()
        True
    """
    if folder is None or not str(folder).strip():
        raise GhostifyError("-o: the output folder is empty; give a folder name")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise GhostifyError(f"'{path}' is not a folder; give -o a new or empty folder, or an earlier sweep's")
    if path.is_dir() and any(path.iterdir()):
        if not (path / "results.json").is_file():
            raise GhostifyError(f"'{path}' holds files but no sweep (results.json); a sweep writes results.json, "
                                "results.csv, summary.md and plot.png there: choose a new or empty folder")
        read_results(path)
    check_output(path / "results.json", force=True)
    return path


def read_results(folder: str | Path) -> dict:
    """``results.json`` of a sweep folder (``{"meta": ..., "rows": [...]}``)."""
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GhostifyError(f"cannot read '{path}' ({describe(exc)}); is it a ghostify sweep folder?") from None
    if not isinstance(results, dict) or not isinstance(results.get("meta"), dict) or not isinstance(
            results.get("rows"), list):
        raise GhostifyError(f"'{path}' is not a ghostify sweep's results (no meta and rows); choose another folder")
    return results


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The rows as CSV with :data:`CSV_FIELDS` columns (missing values empty)."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})

    atomic_write(path, write, force=True)  # the sweep's own file, rewritten as it goes
    return path


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by :func:`write_csv`, numbers and booleans parsed back (empty cells: None)."""
    def parse(v: str):
        if v == "":
            return None
        if v in ("True", "False"):
            return v == "True"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def label(r: dict) -> str:
    if r["point"] == "original":
        return "original"
    parts = []
    for k in SETTINGS_ORDER:
        if r.get(k) is not None and k in r:
            parts.append(f"{k}={r[k]}")
    return " ".join(parts) or r["point"]


def table(rows: list[dict], markdown: bool = False) -> str:
    """One line per point: settings, MACs ratio, params ratio, latency ratio, metrics, status."""
    head = ("point", "MACs", "params", "latency", "top1", "agree", "KL", "status")
    lines = [head]
    for r in rows:
        def f(k, fmt):
            v = finite(r.get(k))
            return "" if v is None else fmt.format(v)

        lines.append((label(r), f("macs_ratio", "{:.3f}"), f("params_ratio", "{:.3f}"), f("latency_ratio", "{:.3f}"),
                      f("top1", "{:.4f}"), f("agree_top1", "{:.4f}"), f("kl", "{:.4f}"),
                      "ok" if r.get("status") == "ok" else f"error: {r.get('error')}"))
    out = [format_table(lines, markdown=True)]
    if not markdown:
        out.insert(0, "MACs, params and latency: converted / original; agree: top-1 agreement with the original")
    return "\n".join(out)
