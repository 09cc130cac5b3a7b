"""Sweeps: convert one model at every point of a grid of settings and measure each point side by side.

For each point (a combination of ``ratio``, ``dw_size``, ``init``, ``cheap``, ``scatter``,
``target_macs``, ... ) the sweep records MACs and params (fvcore), optionally latency
(original and converted measured alternately, :func:`ghostify.measure_latency`), and
accuracy and/or top-1 agreement and KL against the original on the evaluation data
(the original's outputs are computed once). The output folder gets:

* ``results.json``: the sweep's settings and one record per point (written after every
  point; a rerun with the same folder skips the points already done and retries failed ones);
* ``results.csv``: the same records, flat;
* ``summary.md``: the table and the Pareto-optimal points;
* ``plot.png``: the metric against MACs and against latency, Pareto front marked.

A point that fails is recorded with its error and the sweep goes on.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import GhostifyError, describe
from ..config import GhostConfig, LayerSpec, build_config, default_cheap
from ..outputs import atomic_write, to_json
from ..conversion.plan import make_plan
from ..conversion.rewrite import convert
from ..measure.counting import count
from ..measure.evaluation import compare_outputs, model_outputs
from ..measure.latency import measure_latency
from .allocation import allocate
from .timing import skip_slower
from .plotting import finite, pareto_front, plot_sweep
from .sensitivity import SensitivityTable, sensitivity
from .results import (SETTINGS_ORDER, check_sweep_folder, label, read_csv, read_results, table,  # noqa: F401
                      write_csv)

__all__ = ["Sweep", "grid_points", "pareto_front", "read_results", "write_csv", "read_csv", "table",
           "check_sweep_folder"]

def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in a stable order (keys in :data:`SETTINGS_ORDER` first).

    Example:
        >>> grid_points({"ratio": [2, 3], "init": ["copy"]})
        [{'ratio': 2, 'init': 'copy'}, {'ratio': 3, 'init': 'copy'}]
    """
    keys = sorted(grid, key=lambda k: (SETTINGS_ORDER.index(k) if k in SETTINGS_ORDER else len(SETTINGS_ORDER), k))
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _write(path: Path, data) -> None:
    atomic_write(path, data, force=True)  # the sweep's own files, rewritten as it goes


@dataclass
class Sweep:
    """A grid of conversion settings over one model, measured point by point into ``out_dir``.

    Args:
        model: the trained original (``nn.Module``).
        grid: ``{setting: [values]}``; settings are ``convert`` keywords (``ratio``, ``dw_size``,
            ``init``, ``cheap``, ``scatter``) or ``target_macs`` / ``target_latency`` (a budgeted
            allocation, :func:`ghostify.allocate`) or ``skip_slower`` (bool).
        out_dir: the output folder; an existing sweep there is resumed.
        eval_data: batches of ``x`` or ``(x, y)``; accuracy needs labels, agreement does not.
        calib_data: for points with ``init="calib"``.
        fixed: convert keywords applied to every point (e.g. ``{"exclude": [...]}``).
        meta: what identifies the sweep (model and data names); a resumed sweep must match it.
        alloc_ratios: candidate ratios for the allocation points.
        alloc_method: sensitivity method for the allocation points (``"proxy"`` or ``"alone"``).
        alloc_eval_data: the data ``alloc_method="alone"`` evaluates on (keep it apart from ``eval_data``).
        alloc_table: a ready :class:`~ghostify.layer_sensitivity.SensitivityTable` for the allocation points.
        extra_points: points measured besides the grid's (e.g. ``{"init": "calib", "target_macs": 0.8}``).
        config: the base :class:`~ghostify.GhostConfig` every point starts from (a point's ``ratio``,
            ``dw_size``, ``init`` and ``cheap`` replace its global settings); default ``GhostConfig()``.
        runner: measures one point (``None``: the original) and returns its record; default: convert,
            count, time and evaluate as described above.

    Example:
        >>> import torch, torchvision, tempfile
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> data = [torch.randn(4, 3, 32, 32)]
        >>> sw = Sweep(net, {"ratio": [2, 4]}, tempfile.mkdtemp(), eval_data=data, input_size=(1, 3, 32, 32))
        >>> rows = sw.run(progress=False)
        >>> [r["status"] for r in rows], rows[1]["macs_ratio"] < 1
        (['ok', 'ok', 'ok'], True)
    """

    model: Any
    grid: dict[str, list]
    out_dir: str | Path
    eval_data: Any = None
    calib_data: Any = None
    input_size: tuple[int, ...] = (1, 3, 224, 224)
    latency: bool = False
    batch_sizes: tuple[int, ...] = (1,)
    threads: int | None = None
    repeats: int = 10
    fixed: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    alloc_ratios: tuple[int, ...] = (2, 3, 4)
    alloc_method: str = "proxy"
    alloc_eval_data: Any = None
    alloc_table: Any = None
    extra_points: list[dict] = field(default_factory=list)
    runner: Callable[[dict | None], dict] | None = None
    config: GhostConfig | None = None

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self._refs = None
        self._tables: dict[str, Any] = {}

    # -- running --------------------------------------------------------------------------------
    def points(self) -> list[dict]:
        return grid_points(self.grid) + [dict(p) for p in self.extra_points]

    def run(self, progress: bool = True) -> list[dict]:
        """Measure every point not already done; write the outputs; return all rows (original first)."""
        from tqdm import tqdm

        check_sweep_folder(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "grid": self.grid, "extra_points": self.extra_points, "input_size": list(self.input_size), "latency": self.latency,
                "batch_sizes": list(self.batch_sizes), "threads": self.threads}
        rows = self._resume(meta)
        done = {r["point"] for r in rows if r["status"] == "ok"}
        todo = [None] + self.points()  # None: the original model
        todo = [p for p in todo if (point_key(p) if p is not None else "original") not in done]
        rows = [r for r in rows if r["status"] == "ok"]
        if progress and len(todo) < len(self.points()) + 1:
            print(f"sweep: resuming in {self.out_dir}: {len(rows)} points done, {len(todo)} to go", file=sys.stderr)
        bar = tqdm(todo, disable=not progress, file=sys.stderr, desc="sweep", unit="point")
        for settings in bar:
            key = "original" if settings is None else point_key(settings)
            bar.set_postfix_str(key if len(key) < 60 else key[:57] + "...")
            t0 = time.perf_counter()
            try:
                row = (self.runner or self._measure)(settings)
                row.update(status="ok", error=None)
            except Exception as exc:  # recorded, and the sweep goes on
                row = {"status": "error", "error": describe(exc), "traceback": traceback.format_exc(limit=4)}
                if progress:
                    tqdm.write(f"sweep: point {key} failed: {describe(exc)}", file=sys.stderr)
            row = {"point": key, **(settings or {}), **row, "seconds": time.perf_counter() - t0}
            rows.append(row)
            self._save(meta, rows)
        self.write_outputs(rows)
        return rows

    def _resume(self, meta: dict) -> list[dict]:
        if not (self.out_dir / "results.json").exists():
            return []
        old = read_results(self.out_dir)
        # every setting but the grid (a resumed sweep may add points) must match, or rows would mix
        plain = lambda v: json.loads(to_json(v, default=str))  # noqa: E731  (tuples and lists compare equal)
        for key in sorted((set(meta) | set(old["meta"])) - {"grid", "extra_points"}):
            if plain(old["meta"].get(key)) != plain(meta.get(key)):
                raise GhostifyError(f"'{self.out_dir}' holds a sweep with another {key} "
                                    f"({old['meta'].get(key)!r}, not {meta.get(key)!r}); use another output folder")
        return old["rows"]

    def _save(self, meta: dict, rows: list[dict]) -> None:
        _write(self.out_dir / "results.json", to_json({"meta": meta, "rows": rows}, indent=1, default=str))

    # -- one point --------------------------------------------------------------------------------
    def _measure(self, settings: dict | None) -> dict:
        model = self.model.eval()
        x = torch.zeros(*self.input_size)
        if self._refs is None:
            self._inputs, self._labels = _split(self.eval_data)
            self._refs = model_outputs(model, self._inputs) if self._inputs else None
            self._base_counts = count(model, x)
        base = self._base_counts
        row: dict = {}
        if settings is None:
            ghost = model
            row["converted"] = 0
        else:
            s = dict(settings)
            opts = {**self.fixed, **s}
            opts = {k: v for k, v in opts.items() if k not in ("target_macs", "target_latency", "skip_slower")}
            if opts.get("init", "copy") == "calib":
                if self.calib_data is None:
                    raise GhostifyError("init='calib' needs calibration data: --calib-data")
                opts["calib_data"] = self.calib_data
            plan = self._plan(s, opts)
            ghost = convert(model, plan=plan, **{k: v for k, v in opts.items() if k not in _SPEC_KEYS})
            row["converted"] = len(ghost.ghostify_info.plan.converted)
            spec = self.point_config(opts).global_spec
            row["cheap"], row["dw_size"] = default_cheap(spec.init, spec.cheap, spec.dw_size)
        counts = count(ghost, x)
        row.update(macs=counts.macs, macs_ratio=counts.macs / base.macs, params=counts.params,
                   params_ratio=counts.params / base.params)
        if self.latency:
            lat = {}
            for b in self.batch_sizes:
                xb = torch.randn(b, *self.input_size[1:])
                res = measure_latency({"original": model, "ghost": ghost}, xb, repeats=self.repeats,
                                      threads=self.threads)
                lat[str(b)] = {"original_ms": res["original"]["median_ms"], "ghost_ms": res["ghost"]["median_ms"],
                               "ratio": res["ghost"]["median_ms"] / res["original"]["median_ms"]}
            row["latency"] = lat
            first = lat[str(self.batch_sizes[0])]
            row.update(latency_ms=first["ghost_ms"], latency_ratio=first["ratio"])
        if self._refs is not None:
            row.update(compare_outputs(model_outputs(ghost.eval(), self._inputs), self._refs, self._labels))
        return row

    def point_config(self, opts: dict) -> GhostConfig:
        """One point's configuration: the sweep's ``config`` (else the defaults) with the point's layer settings
        (``ratio``, ``dw_size``, ``init``, ``cheap``) and ``include``/``exclude``/``overrides`` added."""
        cfg = build_config(include=opts.get("include", ()), exclude=opts.get("exclude", ()),
                           overrides=opts.get("overrides"), config=self.config or GhostConfig())
        return cfg.with_global(**{k: opts[k] for k in LAYER_KEYS if k in opts})

    def _plan(self, s: dict, opts: dict):
        cfg = self.point_config(opts)
        if s.get("target_macs") is not None or s.get("target_latency") is not None:
            table = self._table({k: opts[k] for k in _SPEC_KEYS if k in opts}, opts, cfg)
            alloc = allocate(self.model, config=cfg, target_macs=s.get("target_macs"),
                             target_latency=s.get("target_latency"), table=table, ratios=self.alloc_ratios,
                             input_size=self.input_size, only_faster=bool(s.get("skip_slower")),
                             threads=self.threads, repeats=self.repeats, progress=False)
            return alloc.plan
        plan = make_plan(self.model, cfg)
        if s.get("skip_slower"):
            plan = skip_slower(self.model, plan, torch.randn(*self.input_size), repeats=self.repeats,
                               threads=self.threads, progress=False)
        return plan

    def _table(self, spec: dict, opts: dict, cfg: GhostConfig):
        """The sensitivity table for allocation points, cached in the folder (one per conversion setting)."""
        base = {k: v for k, v in spec.items() if k != "ratio"}
        key = point_key({**base, "method": self.alloc_method, "ratios": list(self.alloc_ratios)})
        if self.alloc_table is not None:
            return self.alloc_table
        if key not in self._tables:
            name = f"sensitivity-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"  # the same in every process
            path = self.out_dir / name
            cached = SensitivityTable.load(path) if path.exists() else None
            if cached is not None and cached.settings.get("key") == key:
                self._tables[key] = cached
            else:
                table = sensitivity(self.model, config=cfg, ratios=self.alloc_ratios, method=self.alloc_method,
                                    calib_data=opts.get("calib_data"), eval_data=self.alloc_eval_data,
                                    input_size=self.input_size, progress=False)
                table.settings["key"] = key
                table.save(path)
                self._tables[key] = table
        return self._tables[key]

    # -- outputs ----------------------------------------------------------------------------------
    def metric_name(self, rows: list[dict]) -> str:
        return "top1" if any(finite(r.get("top1")) is not None for r in rows) else "agree_top1"

    def write_outputs(self, rows: list[dict]) -> dict[str, Path]:
        """results.csv, summary.md and plot.png from ``rows`` (results.json is written as the sweep runs)."""
        metric = self.metric_name(rows)
        paths = {"json": self.out_dir / "results.json", "csv": write_csv(rows, self.out_dir / "results.csv")}
        paths["png"] = plot_sweep(rows, self.out_dir / "plot.png", metric, title=self.meta.get("model", ""))
        md = [f"# Sweep: {self.meta.get('model', 'model')}", "",
              f"Evaluation: {self.meta.get('eval', '?')}; calibration: {self.meta.get('calib', '-')}; "
              f"input {tuple(self.input_size)}; metric {metric}.", "", table(rows, markdown=True), "",
              "Pareto-optimal points (" + metric + " against MACs): "
              + ", ".join(f"`{label(r)}`" for r in pareto_front(_ok(rows), "macs_ratio", metric)), ""]
        if any(finite(r.get("latency_ratio")) is not None for r in rows):
            md.append("Pareto-optimal points (" + metric + " against latency): "
                      + ", ".join(f"`{label(r)}`" for r in pareto_front(_ok(rows), "latency_ratio", metric)))
            md.append("")
        md.append("![plot](plot.png)")
        _write(self.out_dir / "summary.md", "\n".join(md) + "\n")
        paths["md"] = self.out_dir / "summary.md"
        return paths


LAYER_KEYS = tuple(f.name for f in fields(LayerSpec))  # ratio, dw_size, init, cheap, round_to
_SPEC_KEYS = (*LAYER_KEYS, "include", "exclude", "overrides")


def _split(data):
    if data is None:
        return None, None
    pairs = [b if isinstance(b, (tuple, list)) else (b, None) for b in data]
    labels = [y for _, y in pairs]
    return [x for x, _ in pairs], (labels if all(y is not None for y in labels) else None)


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


