"""The budget behind ``ghostify convert``'s options: replay a saved plan, allocate ratios under a MACs or latency
budget, keep the convs whose Ghost layer is not faster."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..config import GhostConfig
from ..conversion.plan import Plan, check_plan
from ..errors import GhostifyError, describe
from ..ratio import parse_ratios
from ..serialization import read_metadata
from ..zoo.data import resolve_data
from .allocation import allocate
from .timing import skip_slower
from .table import SensitivityTable

__all__ = ["load_plan", "budget_plan"]


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def load_plan(path: str):
    """A plan from a JSON file (``--save-plan``) or from a model saved by ``ghostify.save``."""
    try:
        if Path(path).suffix == ".safetensors":
            return Plan.from_dict(read_metadata(path)["plan"])
        return Plan.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, GhostifyError):
            raise
        raise GhostifyError(f"'{path}' is not a plan (JSON from --save-plan, or a ghostify .safetensors): "
                            f"{describe(exc)}") from None


def budget_plan(original, plan, budget: dict, *, config: GhostConfig, size, leaf=(), calib_data=None,
                calib_augment: int = 0):
    """The plan ``convert`` executes once the budget options have had their say (notes on stderr).

    ``budget`` holds the options of ``ghostify convert`` (``plan_file``, ``target_macs``,
    ``target_latency``, ``budget_ratios``, ``sensitivity_file``, ``sensitivity_data``,
    ``sensitivity_method``, ``skip_slower``, ``threads``, ``repeats``, ``runtime``, ``no_whole_model``);
    ``config`` is the conversion's configuration, passed as is to :func:`~ghostify.allocate`.
    """
    init = config.global_spec.init
    # how --target-latency and --skip-slower time; without --repeats the callee's default number of runs
    timing = {"threads": budget.get("threads"), "runtime": budget.get("runtime", "torch")}
    if budget.get("repeats"):
        timing["repeats"] = budget["repeats"]
    if budget.get("plan_file"):
        plan = check_plan(load_plan(budget["plan_file"]), original, leaf_modules=leaf,
                          source=f"the plan in '{budget['plan_file']}'")
        _note(f"replaying the plan in {budget['plan_file']}: {len(plan.converted)} convs convert")
    target_macs, target_latency = budget.get("target_macs"), budget.get("target_latency")
    if target_macs is not None and target_latency is not None:
        raise GhostifyError("give --target-macs or --target-latency, not both")
    if target_macs is not None or target_latency is not None:
        table = SensitivityTable.load(budget["sensitivity_file"]) if budget.get("sensitivity_file") else None
        eval_data = None
        if table is None and budget.get("sensitivity_data"):
            eval_data = resolve_data(budget["sensitivity_data"], batch_size=32, limit=64)
        if table is None and init == "calib" and calib_data is None:
            raise GhostifyError("--target-macs with --init calib needs --calib-data (or --sensitivity FILE)")
        if table is None and budget.get("sensitivity_method") in ("alone", "context") and eval_data is None:
            raise GhostifyError(f"--sensitivity-method {budget['sensitivity_method']} evaluates the model: give "
                                f"--sensitivity-data SPEC (data your final test does not use)")
        if table is None and init != "calib" and eval_data is None:
            raise GhostifyError(f"--target-macs/--target-latency rank the convs by measured loss; with --init {init} "
                                f"give --sensitivity-data SPEC (e.g. photos:calib) or --sensitivity FILE, or use "
                                f"--init calib --calib-data SPEC")
        alloc = allocate(original, config=config, target_macs=target_macs, target_latency=target_latency,
                         table=table, ratios=parse_ratios(budget.get("budget_ratios")) or [config.global_spec.ratio],
                         calib_data=calib_data, eval_data=eval_data, method=budget.get("sensitivity_method"),
                         input_size=size, only_faster=budget.get("skip_slower", False), leaf_modules=leaf,
                         whole_model=not budget.get("no_whole_model"), calib_augment=calib_augment, **timing)
        plan = alloc.plan
        _note(alloc.summary())
    elif budget.get("skip_slower"):
        plan = skip_slower(original, plan, torch.randn(*size), **timing)
        _note(f"--skip-slower: {len(plan.converted)} convs are faster as Ghost layers and convert")
    if target_macs is not None or target_latency is not None or budget.get("skip_slower"):
        _note(plan.table())
    return plan
