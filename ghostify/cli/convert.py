"""``ghostify inspect``, ``convert``, ``eval``, ``models`` and ``env``: the conversion commands.

Heavy imports live inside the command bodies so ``ghostify --help`` stays instant.
"""
from __future__ import annotations

import sys

import click

from ..errors import GhostifyError
from ..outputs import atomic_write
from .options import (budget_options, check_calib_augment, check_input, default_input, parse_input_size, parse_override,
                      require_runtime, selection_options, trust_code_option, user_errors)

__all__ = ["inspect", "convert", "eval_", "models", "env", "COMMANDS"]


def _load_and_plan(model_spec, weights, ratio, dw_size, init, cheap, round_to, include, exclude, override, leaf,
                   trust_code):
    from ..config import build_config
    from ..conversion.plan import make_plan
    from ..zoo.models import get_model

    overrides = dict(parse_override(o) for o in override)
    cfg = build_config(ratio, dw_size, init, cheap, include, exclude, overrides, round_to=round_to)
    model = get_model(model_spec, weights=weights, trust_code=trust_code)
    return model, cfg, make_plan(model, cfg, leaf_modules=leaf)


@click.command()
@selection_options
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def inspect(model, weights, ratio, dw_size, init, cheap, round_to, include, exclude, override, leaf, input_size,
            calib_data, calib_size, calib_augment, max_layer_error, trust_code, as_json):
    """Show which convs of MODEL convert and which are kept, and why.

    With --init calib and --calib-data the conversion is run too, and each layer's relative
    output error (on the calibration batches and on held-out ones) is shown.
    """
    from ..outputs import to_json

    original, cfg, plan = _load_and_plan(model, weights, ratio, dw_size, init, cheap, round_to, include, exclude,
                                         override, leaf, trust_code)
    check_calib_augment(calib_augment, calib_data)
    fidelity = None
    if calib_data is not None and any(e.spec.init == "calib" for e in plan.converted):
        from ..conversion.rewrite import convert as do_convert, conversion_info

        size = parse_input_size(input_size, lambda: default_input(model))
        check_input(original, size)
        options = _calibration_options(calib_data, calib_size, calib_augment, max_layer_error, original, size)
        ghost = do_convert(original, config=cfg, plan=plan, leaf_modules=leaf, **options)
        info = conversion_info(ghost)
        plan, fidelity = info.plan, info.layer_info
    if as_json:
        d = plan.to_dict()
        if fidelity is not None:
            d["layer_info"] = fidelity
        click.echo(to_json(d, indent=2))
    else:
        click.echo(plan.table(fidelity=fidelity))


def _calibration_options(calib_data, calib_size, calib_augment, max_layer_error, model, size) -> dict:
    from ..zoo.data import calib_spec, resolve_data

    return {"calib_data": resolve_data(calib_spec(calib_data), batch_size=64, limit=calib_size,
                                       shuffle=False, model=model, input_size=size[1:]),
            "calib_augment": calib_augment, "max_layer_error": max_layer_error}


@click.command()
@selection_options
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the converted model (.safetensors).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--latency", is_flag=True, help="Measure CPU latency before/after (batch 1).")
@click.option("--no-fold", is_flag=True, help="Keep run-time channel reordering instead of folding it into consumers.")
@click.option("--scatter", is_flag=True,
              help="Let layers whose order cannot fold choose intrinsic channels freely (reordered at run time).")
@budget_options
@user_errors
def convert(model, weights, ratio, dw_size, init, cheap, round_to, include, exclude, override, leaf, input_size,
            calib_data, calib_size, calib_augment, max_layer_error, trust_code, output, force, as_json, latency,
            no_fold, scatter, **budget):
    """Convert MODEL (torchvision name, package.module:callable or checkpoint) and report the trade-off."""
    import time

    from ..conversion.rewrite import convert as do_convert
    from ..outputs import check_output, to_json
    from ..measure.reporting import report
    from ..serialization import save

    if output is not None:  # every output is checked before the work starts
        check_output(output, force=force, suffixes=(".safetensors",))
    if budget.get("save_plan") is not None:
        check_output(budget["save_plan"], force=force, option="--save-plan")
    if budget.get("runtime", "torch") != "torch":
        if not (budget.get("skip_slower") or budget.get("target_latency")):
            raise GhostifyError(f"--runtime {budget['runtime']} says where --skip-slower/--target-latency time "
                                "the layers; add one of them")
        require_runtime(budget["runtime"])
    if budget.get("no_whole_model") and budget.get("target_latency") is None:
        raise GhostifyError("--no-whole-model changes how --target-latency checks its plan; add --target-latency F")
    if budget.get("repeats") and not (budget.get("skip_slower") or budget.get("target_latency")):
        raise GhostifyError("--repeats sets how often --target-latency/--skip-slower time a model; add one of them")
    size = parse_input_size(input_size, lambda: default_input(model))
    original, cfg, plan = _load_and_plan(model, weights, ratio, dw_size, init, cheap, round_to, include, exclude,
                                         override, leaf, trust_code)
    check_input(original, size)
    t0 = time.perf_counter()
    options = {}
    check_calib_augment(calib_augment, calib_data)
    if calib_data is not None:
        options = _calibration_options(calib_data, calib_size, calib_augment, max_layer_error, original, size)
    elif any(e.spec.init == "calib" for e in plan.converted):
        raise GhostifyError("--init calib needs --calib-data (e.g. mnist, imagefolder:PATH)")
    if any(budget[k] for k in ("target_macs", "target_latency", "skip_slower", "plan_file")):
        from ..tradeoffs.budget import budget_plan

        plan = budget_plan(original, plan, budget, config=cfg, size=size, leaf=leaf,
                           calib_data=options.get("calib_data"), calib_augment=calib_augment)
        t0 = time.perf_counter()
    ghost = do_convert(original, config=cfg, plan=plan, fold=not no_fold, scatter=scatter, leaf_modules=leaf,
                       **options)
    if budget.get("save_plan") is not None:
        _save_plan(ghost.ghostify_info.plan, budget["save_plan"], force=force)
    seconds = time.perf_counter() - t0
    click.echo(f"converted {len(plan.converted)} of {len(plan.entries)} convs in {seconds:.2f} s", err=True)
    rep = report(original, ghost, input_size=size, latency=latency, name=model)
    if output is not None:
        save(ghost, output, force=force)
        click.echo(f"wrote {output}", err=True)
    if as_json:
        d = rep.to_dict()
        d["seconds"] = seconds
        d["output"] = output
        click.echo(to_json(d, indent=2))
    else:
        click.echo(rep.table())


@click.command("eval")
@click.argument("model")
@click.option("--data", "data_spec", required=True, metavar="SPEC", help="mnist:test, imagefolder:PATH, ...")
@click.option("--baseline", default=None, metavar="MODEL",
              help="Original model to measure agreement against (name, module:callable or checkpoint).")
@click.option("--weights", default="DEFAULT", show_default=True, help="Weights of MODEL when it is a name.")
@click.option("--baseline-weights", default="DEFAULT", show_default=True, help="Weights of --baseline.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate on at most this many examples.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@trust_code_option
@user_errors
def eval_(model, data_spec, baseline, weights, baseline_weights, batch_size, limit, as_json, trust_code):
    """Accuracy of MODEL on labelled data, or its agreement with --baseline."""
    from ..zoo.data import resolve_data
    from ..measure.evaluation import evaluate
    from ..outputs import to_json
    from ..zoo.models import get_model

    net = get_model(model, weights=weights, trust_code=trust_code)
    ref = get_model(baseline, weights=baseline_weights, trust_code=trust_code) if baseline else None
    res = evaluate(net, resolve_data(data_spec, batch_size=batch_size, limit=limit), baseline=ref)
    res = {"model": model, "baseline": baseline, "data": data_spec, **res}
    if as_json:
        click.echo(to_json(res, indent=2))
    else:
        click.echo("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in res.items()))


@click.command()
@user_errors
def models():
    """List the torchvision model names MODEL accepts."""
    from ..zoo.models import list_models

    click.echo("\n".join(list_models()))


@click.command()
@user_errors
def env():
    """Print versions and hardware, for bug reports."""
    import platform

    import torch

    from .. import __version__

    lines = [f"ghostify: {__version__}", f"python: {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}"]
    for pkg in ("torch", "torchvision", "fvcore", "click", "safetensors", "numpy", "scipy", "tqdm", "yaml"):
        try:
            mod = __import__(pkg)
            lines.append(f"{pkg}: {getattr(mod, '__version__', 'installed')}")
        except ImportError:
            lines.append(f"{pkg}: not installed")
    lines += [f"cuda available: {torch.cuda.is_available()}"
              + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""),
              f"torch threads: {torch.get_num_threads()}", f"torch hub dir: {torch.hub.get_dir()}"]
    click.echo("\n".join(lines))


def _save_plan(plan, path: str, *, force: bool = False) -> None:
    """Write ``plan`` as JSON (``--save-plan``): atomically, never over a file without ``force``."""
    atomic_write(path, plan.to_json(indent=1), force=force)
    click.echo(f"wrote the plan to {path}", err=True)


COMMANDS = (inspect, convert, eval_, models, env)
