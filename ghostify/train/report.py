"""The run report as Markdown (``report.md``)."""
from __future__ import annotations

from .._util import format_size

__all__ = ["report_markdown"]


def report_markdown(r: dict) -> str:
    """The run report as a Markdown table (written to ``report.md``)."""
    def acc(d, key="top1"):
        return f"{100 * d[key]:.2f} %" if d and key in d else "-"

    lines = [f"# {r['name']}", "",
             f"{r['steps']} steps ({r['epochs']} epochs) on {r['world_size']} process(es), {r['device']}; "
             f"{r['train_seconds']:.0f} s training", "",
             "| model | MACs | params | top-1 | agreement with original |", "|---|---|---|---|---|",
             f"| original | {format_size(r['macs_before'])} | {format_size(r['params_before'])} | "
             f"{acc(r['original'])} | - |",
             f"| converted, before fine-tuning | {format_size(r['macs_after'])} | {format_size(r['params_after'])} | "
             f"{acc(r['before'])} | {acc(r['before'], 'agree_top1')} |",
             f"| converted, after fine-tuning{' (EMA)' if r['ema'] else ''} | {format_size(r['macs_after'])} | "
             f"{format_size(r['params_after'])} | {acc(r['after'])} | {acc(r['after'], 'agree_top1')} |", "",
             f"MACs ratio {r['macs_after'] / r['macs_before']:.3f}, params ratio "
             f"{r['params_after'] / r['params_before']:.3f}; {r['converted_layers']} convs converted. "
             f"Seconds per epoch: {', '.join(f'{s:.0f}' for s in r['seconds_per_epoch'])}.", ""]
    return "\n".join(lines)
