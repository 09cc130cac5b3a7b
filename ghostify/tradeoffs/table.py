"""The sensitivity table: one row per conv and ratio (what converting it alone saves and costs), saved as JSON."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._util import format_size, format_table
from ..errors import GhostifyError
from ..outputs import atomic_write, to_json
from .plotting import pyplot

__all__ = ["LayerSensitivity", "SensitivityTable", "MEASURES", "LOSS_TEXT", "loss_of"]

MEASURES = ("kl", "agree", "top1", "error", "output")


@dataclass
class LayerSensitivity:
    """One conv converted alone at one ratio."""

    name: str
    ratio: int
    macs_before: int
    macs_after: int
    loss: float
    metrics: dict = field(default_factory=dict)  # agree_top1, kl, top1, heldout_error, ... where measured

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after


@dataclass
class SensitivityTable:
    """The rows of :func:`sensitivity` plus what they were measured with.

    ``measure`` names the loss (see the module doc); ``total_macs`` is the whole original
    model's MACs on ``input_size``; ``settings`` the conversion settings (dw_size, init, cheap...).
    """

    measure: str
    method: str
    total_macs: int
    rows: list[LayerSensitivity]
    baseline: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    input_size: tuple[int, ...] = (1, 3, 224, 224)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.name for r in self.rows))

    @property
    def ratios(self) -> list[int]:
        return sorted({r.ratio for r in self.rows})

    def options(self, name: str) -> list[LayerSensitivity]:
        """The rows of layer ``name``, by ratio."""
        return sorted((r for r in self.rows if r.name == name), key=lambda r: r.ratio)

    def table(self) -> str:
        """One line per layer and ratio, most harmful per MAC saved first within each ratio."""
        head = (f"sensitivity ({self.method}, loss = {LOSS_TEXT[self.measure]}), total MACs "
                f"{format_size(self.total_macs)}")
        rows = [("layer", "ratio", "MACs", "saved", "saved %", "loss", "loss/GMAC", *self._metric_keys())]
        for r in sorted(self.rows, key=lambda r: (r.ratio, -_per_gmac(r))):
            rows.append((r.name, str(r.ratio), format_size(r.macs_before), format_size(r.macs_saved),
                         f"{100 * r.macs_saved / self.total_macs:.2f}", f"{r.loss:.4g}", f"{_per_gmac(r):.4g}",
                         *(_fmt(r.metrics.get(k)) for k in self._metric_keys())))
        return head + "\n" + format_table(rows)

    def _metric_keys(self) -> list[str]:
        return [k for k in ("agree_top1", "kl", "top1", "output_error", "heldout_error", "calib_error")
                if any(k in r.metrics for r in self.rows)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def save(self, path: str | Path, *, force: bool = True) -> Path:
        """Write the table as JSON (atomically; ``force=False`` refuses an existing file)."""
        return atomic_write(path, to_json(self.to_dict(), indent=1), force=force)

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        d = dict(d)
        d["rows"] = [LayerSensitivity(**r) for r in d["rows"]]
        d["input_size"] = tuple(d.get("input_size", (1, 3, 224, 224)))
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GhostifyError(f"'{path}' is not a sensitivity table written by ghostify sensitivity ({exc})") from None

    def plot(self, path: str | Path, *, force: bool = True) -> Path:
        """A horizontal bar chart of the loss per layer (one bar per ratio), written as PNG (atomically)."""
        plt = pyplot()
        names, ratios = self.layers, self.ratios
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.18 * len(names) * max(1, len(ratios)) ** 0.5))
        h = 0.8 / len(ratios)
        for i, r in enumerate(ratios):
            loss = {x.name: x.loss for x in self.rows if x.ratio == r}
            ax.barh([j + i * h for j in range(len(names))], [loss.get(n, 0.0) for n in names], height=h,
                    label=f"ratio {r}")
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(names))], names, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=max(1e-6, min((x.loss for x in self.rows if x.loss > 0), default=1e-3)))
        ax.set_xlabel(f"loss when converted alone: {LOSS_TEXT[self.measure]}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), force=force)
        finally:
            plt.close(fig)


LOSS_TEXT = {"kl": "mean KL(original || converted), nats", "agree": "-log(top-1 agreement)",
              "top1": "top-1 accuracy drop", "error": "held-out relative output error squared (calibration data)",
             "output": "relative error of the model's output squared"}


def _per_gmac(r: LayerSensitivity) -> float:
    return r.loss / (r.macs_saved / 1e9) if r.macs_saved > 0 else math.inf


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def loss_of(measure: str, metrics: dict, baseline: dict) -> float:
    """The loss a row records, from its metrics (see :data:`LOSS_TEXT`)."""
    if measure == "kl":
        return max(metrics["kl"], 0.0)
    if measure == "agree":
        return -math.log(max(metrics["agree_top1"], 1e-6))
    if measure == "top1":
        return baseline["top1"] - metrics["top1"]
    if measure == "output":
        return metrics["output_error"] ** 2
    return metrics.get("heldout_error", metrics.get("calib_error", 0.0)) ** 2
