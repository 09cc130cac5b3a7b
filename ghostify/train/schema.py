"""Typed dataclasses from plain data (YAML, ``--set``): sections built key by key, values coerced to the
field's type and checked against its metadata, every error naming the key and the valid choices.
Torch-free."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Union

from ..errors import GhostifyError
from ..ratio import check_ratio

__all__ = ["build_section", "coerce", "type_hints", "unknown_key", "type_name", "all_finite"]


def type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def unknown_key(key: str, prefix: str, names) -> str:
    where = f"in section '{prefix}'" if prefix else "at the top level"
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown recipe key '{prefix + '.' if prefix else ''}{key}' {where}{hint}; valid keys: {', '.join(names)}"


def build_section(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GhostifyError(f"recipe section '{prefix or 'top level'}' must be a mapping, not {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise GhostifyError(unknown_key(str(key), prefix, fields))
        path = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_section(hints[key], value, path)
        else:
            kwargs[key] = coerce(value, hints[key], fields[key], path)
    return cls(**kwargs)


def type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a mapping"}.get(base, getattr(base, "__name__", str(base)))
    return name + (" or null" if type(None) in typing.get_args(tp) else "")


def coerce(value: Any, tp, f: dataclasses.Field, path: str) -> Any:
    """``value`` (read from YAML or ``--set``) as the field's type ``tp``, checked against the field's metadata
    (``choices``, ``min``/``max``/``open``, ``odd``, ``ratio``, ``plain_name``); errors name the key ``path``."""
    full, origin = tp, typing.get_origin(tp)
    optional = origin in (Union, types.UnionType) and type(None) in typing.get_args(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))

    def bad(extra: str = "") -> GhostifyError:
        return GhostifyError(f"recipe key '{path}': expected {type_name(full)}"
                             f"{extra}, got {value!r}")

    out = _as_type(value, tp, bad)
    if tp in (list, dict) and not all_finite(out):
        raise bad(" with finite numbers only")
    return _checked(out, value, f.metadata, path)


def _as_type(value: Any, tp, bad) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            out = value.lower() in ("true", "yes", "on")
        else:
            raise bad()
    elif tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad()
        out = int(value)
    elif tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not math.isfinite(out):
            raise bad(" (a finite number)")
    elif tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad()
        out = str(value)
    elif tp is list:
        out = list(value) if isinstance(value, (list, tuple)) else [value] if isinstance(value, str) else None
        if out is None:
            raise bad()
    elif tp is dict:
        if not isinstance(value, dict):
            raise bad()
        out = dict(value)
    else:  # pragma: no cover - every field type is listed above
        out = value
    return out


def _checked(out: Any, value: Any, meta, path: str) -> Any:
    if meta.get("plain_name") and (out in ("", ".", "..") or any(c in out for c in "/\\\0")):
        raise GhostifyError(f"recipe key '{path}': {out!r} is not a plain name (it names the run folder runs/NAME); "
                            "use letters, digits, '-' and '_', or set output_dir for a folder elsewhere")
    if "choices" in meta and out not in meta["choices"]:
        raise GhostifyError(f"recipe key '{path}': '{out}' is not one of {', '.join(meta['choices'])}")
    if "min" in meta and isinstance(out, (int, float)):
        if out < meta["min"] or (meta.get("open") and out == meta["min"]):
            raise GhostifyError(f"recipe key '{path}': must be {'>' if meta.get('open') else '>='} {meta['min']}, "
                                f"got {out}")
    if "max" in meta and isinstance(out, (int, float)) and out > meta["max"]:
        raise GhostifyError(f"recipe key '{path}': must be <= {meta['max']}, got {out}")
    if meta.get("odd") and out % 2 == 0:
        raise GhostifyError(f"recipe key '{path}': must be odd (the cheap op keeps the map size), got {out}")
    if meta.get("ratio"):
        try:
            out = check_ratio(out)
        except ValueError:
            raise GhostifyError(f"recipe key '{path}': must be a number >= 1 (an integer, or a fraction > 1 "
                                f"such as 1.5), got {value!r}") from None
    return out


def all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return True


