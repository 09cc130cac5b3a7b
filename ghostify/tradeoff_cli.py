"""The trade-off commands: ``ghostify sweep``, ``ghostify sensitivity``, ``ghostify report``, and the budget
options of ``ghostify convert`` (``--target-macs``, ``--target-latency``, ``--skip-slower``, ``--plan``).

Heavy imports live inside the command bodies so ``ghostify --help`` stays instant.
"""
from __future__ import annotations

import json

import click

from .errors import GhostifyError, describe
from .ratio import check_ratio


def _floats(text: str | None) -> list[float]:
    try:
        return [float(t) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated numbers, e.g. 0.9,0.8") from None


def _ints(text: str | None) -> list[int]:
    try:
        return [int(t) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated integers, e.g. 2,3,4") from None


def _batch_sizes(text: str | None) -> tuple[int, ...]:
    sizes = _ints(text)
    if not sizes or any(b < 1 for b in sizes):
        raise GhostifyError(f"--batch-sizes '{text}': expected comma-separated batch sizes >= 1, e.g. 1,8")
    return tuple(sizes)


class _Ratio(click.ParamType):
    name = "RATIO"

    def convert(self, value, param, ctx):
        try:
            return check_ratio(float(value))
        except ValueError:
            self.fail(f"{value!r} is not a ratio; use a number >= 1, e.g. 2 or 1.5", param, ctx)


RATIO = _Ratio()


def _ratios(text: str | None) -> list[int | float]:
    """Comma-separated ratios: integers >= 1 or fractions > 1 (``2,3,4`` or ``1.5,2``)."""
    try:
        return [check_ratio(float(t)) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated ratios >= 1, e.g. 2,3,4 or 1.5,2") from None


def _words(text: str | None) -> list[str]:
    return [t for t in (text or "").replace(" ", "").split(",") if t]


def calib_spec(spec: str) -> str:
    """Calibrate on a source's calibration/training split unless the user named one."""
    return {"mnist": "mnist:train", "photos": "photos:calib"}.get(spec, spec)


def eval_spec(spec: str) -> str:
    """Evaluate on a source's held-out split unless the user named one."""
    return {"mnist": "mnist:test", "photos": "photos:heldout"}.get(spec, spec)


def _fraction(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"{value} is not a fraction in (0, 1]; e.g. 0.8 keeps 80 % of the original")
    return value


# -- convert's budget options ---------------------------------------------------------------------

def budget_options(fn):
    """The options ``ghostify convert`` takes for budgeted allocation and latency-aware skipping."""
    opts = [
        click.option("--target-macs", type=float, default=None, callback=_fraction, metavar="F",
                     help="Choose a ratio per conv (or keep it) so the model has <= F of the original MACs, "
                          "least predicted loss first (greedy; see ghostify sensitivity)."),
        click.option("--target-latency", type=float, default=None, callback=_fraction, metavar="F",
                     help="As --target-macs, on per-layer latency measured here (batch of --input-size)."),
        click.option("--ratios", "budget_ratios", default="2,3,4", show_default=True,
                     help="Candidate ratios per conv for --target-macs/--target-latency."),
        click.option("--sensitivity", "sensitivity_file", type=click.Path(dir_okay=False), default=None,
                     help="A table from `ghostify sensitivity -o FILE` (else measured now, from --calib-data "
                          "alone unless --sensitivity-data is given)."),
        click.option("--sensitivity-data", default=None, metavar="SPEC",
                     help="Evaluate each layer converted alone on this data (KL against the original) "
                          "instead of calibration's held-out error; keep it apart from your test data."),
        click.option("--sensitivity-method", type=click.Choice(["alone", "proxy", "context"]), default=None,
                     help="How --sensitivity-data ranks the convs (default alone; see ghostify sensitivity). "
                          "context: each conv moved alone away from the uniform model nearest the budget, all "
                          "recalibrated (slow; the most faithful with --init calib)."),
        click.option("--skip-slower", is_flag=True,
                     help="Keep a conv when its Ghost layer, timed alone on its real input, is not faster."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Intra-op threads for latency measurements (default: torch's)."),
        click.option("--plan", "plan_file", type=click.Path(dir_okay=False), default=None,
                     help="Replay a plan: a JSON plan (--save-plan) or a model saved by ghostify."),
        click.option("--save-plan", type=click.Path(dir_okay=False), default=None,
                     help="Write the executed per-layer plan as JSON."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def load_plan(path: str):
    """A plan from a JSON file (``--save-plan``) or from a model saved by ``ghostify.save``."""
    from pathlib import Path

    from .plan import Plan

    try:
        if Path(path).suffix == ".safetensors":
            from .serialization import read_metadata

            return Plan.from_dict(read_metadata(path)["plan"])
        return Plan.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, GhostifyError):
            raise
        raise GhostifyError(f"'{path}' is not a plan (JSON from --save-plan, or a ghostify .safetensors): "
                            f"{describe(exc)}") from None


def budget_plan(original, plan, budget: dict, *, size, ratio, dw_size, init, cheap, include, exclude, overrides, leaf,
                calib_data):
    """The plan ``convert`` executes once the budget options have had their say (printed on stderr)."""
    import torch

    from .allocation import allocate, skip_slower
    from .layer_sensitivity import SensitivityTable

    if budget.get("plan_file"):
        from .plan import check_plan

        plan = check_plan(load_plan(budget["plan_file"]), original, leaf_modules=leaf,
                          source=f"the plan in '{budget['plan_file']}'")
        click.echo(f"replaying the plan in {budget['plan_file']}: {len(plan.converted)} convs convert", err=True)
    target_macs, target_latency = budget.get("target_macs"), budget.get("target_latency")
    if target_macs is not None and target_latency is not None:
        raise GhostifyError("give --target-macs or --target-latency, not both")
    if target_macs is not None or target_latency is not None:
        table = SensitivityTable.load(budget["sensitivity_file"]) if budget.get("sensitivity_file") else None
        eval_data = None
        if table is None and budget.get("sensitivity_data"):
            from .data import resolve_data

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
        alloc = allocate(original, target_macs=target_macs, target_latency=target_latency, table=table,
                         ratios=_ratios(budget.get("budget_ratios")) or [ratio], dw_size=dw_size, init=init,
                         cheap=cheap, include=include, exclude=exclude, overrides=overrides, calib_data=calib_data,
                         eval_data=eval_data, method=budget.get("sensitivity_method"), input_size=size,
                         only_faster=budget.get("skip_slower", False),
                         threads=budget.get("threads"), leaf_modules=leaf)
        plan = alloc.plan
        click.echo(alloc.summary(), err=True)
    elif budget.get("skip_slower"):
        plan = skip_slower(original, plan, torch.randn(*size), threads=budget.get("threads"))
        click.echo(f"--skip-slower: {len(plan.converted)} convs are faster as Ghost layers and convert", err=True)
    if target_macs is not None or target_latency is not None or budget.get("skip_slower"):
        click.echo(plan.table(), err=True)
    return plan


def save_plan(plan, path: str, *, force: bool = False) -> None:
    """Write ``plan`` as JSON (``--save-plan``): atomically, never over a file without ``force``."""
    from .outputs import atomic_write

    atomic_write(path, plan.to_json(indent=1), force=force)
    click.echo(f"wrote the plan to {path}", err=True)


# -- commands -----------------------------------------------------------------------------------------

def register(cli, user_errors, selection_parsers, trust_code_option):
    """Add ``sweep``, ``sensitivity`` and ``report`` to the ``ghostify`` group."""
    parse_input_size, default_input = selection_parsers

    @cli.command()
    @click.argument("model")
    @click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
                  help="Output folder (results.json/.csv, summary.md, plot.png); an existing sweep there resumes.")
    @click.option("--weights", default="DEFAULT", show_default=True, help="As for convert.")
    @click.option("--ratios", default="2,4", show_default=True, help="Uniform ratios to sweep.")
    @click.option("--dw-sizes", default="3", show_default=True, help="Cheap-op kernel sizes to sweep.")
    @click.option("--init", "inits", default="copy", show_default=True, help="Inits to sweep, e.g. copy,calib.")
    @click.option("--cheap", "cheaps", default="dw", show_default=True, help="Cheap ops to sweep, e.g. dw,mix.")
    @click.option("--scatter", "scatters", default="false", show_default=True, help="false, true or false,true.")
    @click.option("--target-macs", "targets", default="", help="Also budgeted allocations, e.g. 0.9,0.8 "
                                                               "(with the first --dw-sizes/--init/--cheap).")
    @click.option("--alloc-ratios", default="2,3,4", show_default=True, help="Candidate ratios for --target-macs.")
    @click.option("--alloc-method", type=click.Choice(["proxy", "alone"]), default="proxy", show_default=True,
                  help="Sensitivity measure for --target-macs (see ghostify sensitivity).")
    @click.option("--alloc-data", default=None, metavar="SPEC", help="Data for --alloc-method alone.")
    @click.option("--sensitivity", "sens_file", type=click.Path(dir_okay=False), default=None,
                  help="A ready sensitivity table for --target-macs (ghostify sensitivity -o FILE).")
    @click.option("--calib-data", default=None, metavar="SPEC", help="Calibration data for init calib.")
    @click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True)
    @click.option("--eval", "eval_data", required=True, metavar="SPEC",
                  help="Evaluation data: accuracy with labels, agreement with the original always.")
    @click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="At most this many examples.")
    @click.option("--latency", is_flag=True, help="Measure latency (original and converted alternately).")
    @click.option("--batch-sizes", default="1", show_default=True, help="Latency batch sizes; the first is plotted.")
    @click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default torch's).")
    @click.option("--repeats", type=click.IntRange(min=2), default=10, show_default=True)
    @click.option("--input-size", default=None, help="224, C,H,W or N,C,H,W (default: the model's, else 1,3,224,224).")
    @trust_code_option
    @user_errors
    def sweep(model, out_dir, weights, ratios, dw_sizes, inits, cheaps, scatters, targets, alloc_ratios, alloc_method,
              alloc_data, sens_file, calib_data, calib_size, eval_data, eval_limit, latency, batch_sizes, threads,
              repeats, input_size, trust_code):
        """Convert MODEL at every point of a grid; table, results.json/.csv, summary.md and plot.png in -o."""
        from .data import resolve_data
        from .sweep import Sweep, check_sweep_folder, table
        from .zoo import get_model, weights_digest

        check_sweep_folder(out_dir)
        sizes = _batch_sizes(batch_sizes)
        size = parse_input_size(input_size, lambda: default_input(model))
        grid = {"ratio": _ratios(ratios), "dw_size": _ints(dw_sizes), "init": _words(inits), "cheap": _words(cheaps)}
        flags = {"false": False, "true": True}
        try:
            grid["scatter"] = [flags[w.lower()] for w in _words(scatters)]
        except KeyError:
            raise GhostifyError(f"--scatter '{scatters}': use false, true or false,true") from None
        original = get_model(model, weights=weights, trust_code=trust_code).eval()
        calib = (resolve_data(calib_spec(calib_data), batch_size=32, limit=calib_size) if calib_data else None)
        ev = resolve_data(eval_spec(eval_data), batch_size=50, limit=eval_limit)
        alloc_ev = resolve_data(alloc_data, batch_size=32, limit=64) if alloc_data else None
        # everything that changes a point's numbers: a resumed sweep must match it all
        meta = {"model": model, "weights": weights,  # random weights differ per run but are all "none"
                "weights_digest": weights_digest(original) if weights.lower() != "none" else "random",
                "eval": f"{eval_spec(eval_data)} (limit {eval_limit})",
                "calib": f"{calib_spec(calib_data)} (limit {calib_size})" if calib_data else None,
                "alloc": {"ratios": alloc_ratios, "method": alloc_method, "data": alloc_data,
                          "sensitivity": sens_file}, "repeats": repeats}
        first = {k: v[0] for k, v in grid.items() if k != "ratio" and v}
        extra = [{**first, "target_macs": t} for t in _floats(targets)]
        sw = Sweep(original, grid, out_dir, eval_data=ev, calib_data=calib, input_size=size, latency=latency,
                   batch_sizes=sizes, threads=threads, repeats=repeats, meta=meta,
                   alloc_ratios=tuple(_ratios(alloc_ratios)), alloc_method=alloc_method, alloc_eval_data=alloc_ev,
                   extra_points=extra)
        if sens_file:
            from .layer_sensitivity import SensitivityTable

            sw.alloc_table = SensitivityTable.load(sens_file)
        rows = sw.run()
        click.echo(table(rows))
        click.echo(f"wrote {out_dir}/results.json, results.csv, summary.md, plot.png", err=True)

    @cli.command()
    @click.argument("model")
    @click.option("--weights", default="DEFAULT", show_default=True, help="As for convert.")
    @click.option("--ratio", "ratios", default="2", show_default=True, help="Ratio(s) to measure, e.g. 2 or 2,4.")
    @click.option("--dw-size", type=int, default=3, show_default=True)
    @click.option("--init", "init", default="calib", show_default=True, help="calib (fitted) or copy.")
    @click.option("--cheap", default="dw", show_default=True, help="dw, mix or auto.")
    @click.option("--calib-data", default=None, metavar="SPEC", help="Calibration data for init calib.")
    @click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True)
    @click.option("--eval", "eval_data", default=None, metavar="SPEC",
                  help="Evaluate each layer converted alone here (method alone).")
    @click.option("--eval-limit", type=click.IntRange(min=1), default=None)
    @click.option("--method", type=click.Choice(["alone", "proxy", "context"]), default=None,
                  help="alone: evaluate (default with --eval); proxy: calibration's held-out error only; "
                       "context: each layer moved alone away from the uniform --reference model, all recalibrated.")
    @click.option("--reference", type=RATIO, default=None,
                  help="The uniform ratio --method context starts from (default: the smallest of --ratio).")
    @click.option("--measure", type=click.Choice(["kl", "agree", "top1", "error"]), default=None,
                  help="The loss: kl (default for alone), agree (-log agreement), top1 (accuracy drop), error.")
    @click.option("--exclude", multiple=True, metavar="GLOB")
    @click.option("--input-size", default=None)
    @click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the table as JSON.")
    @click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a bar chart (PNG).")
    @click.option("--force", is_flag=True, help="Overwrite -o and --plot if they exist.")
    @click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
    @trust_code_option
    @user_errors
    def sensitivity(model, weights, ratios, dw_size, init, cheap, calib_data, calib_size, eval_data, eval_limit,
                    method, reference, measure, exclude, input_size, output, plot, force, as_json, trust_code):
        """For each conv of MODEL converted alone: MACs saved and the loss in accuracy/agreement."""
        from .data import resolve_data
        from .layer_sensitivity import sensitivity as measure_sensitivity
        from .outputs import check_output, to_json
        from .zoo import get_model

        if output is not None:
            check_output(output, force=force)
        if plot is not None:
            check_output(plot, force=force, option="--plot")
        size = parse_input_size(input_size, lambda: default_input(model))
        original = get_model(model, weights=weights, trust_code=trust_code).eval()
        calib = resolve_data(calib_spec(calib_data), batch_size=32, limit=calib_size) if calib_data else None
        ev = resolve_data(eval_data, batch_size=50, limit=eval_limit) if eval_data else None
        table = measure_sensitivity(original, ratios=_ratios(ratios), dw_size=dw_size, init=init, cheap=cheap,
                                    calib_data=calib, eval_data=ev, method=method or ("alone" if ev else "proxy"),
                                    measure=measure, input_size=size, exclude=exclude, reference=reference)
        table.settings["model"] = model
        if output is not None:
            table.save(output, force=force)
            click.echo(f"wrote {output}", err=True)
        if plot is not None:
            table.plot(plot, force=force)
            click.echo(f"wrote {plot}", err=True)
        click.echo(to_json(table.to_dict(), indent=1) if as_json else table.table())

    @cli.command()
    @click.argument("model")
    @click.option("--baseline", default=None, metavar="MODEL",
                  help="The original (name, module:callable or checkpoint); default: rebuilt from MODEL's recipe "
                       "with random weights (MACs and latency do not depend on them).")
    @click.option("--baseline-weights", default="DEFAULT", show_default=True)
    @click.option("--latency", is_flag=True, help="Measure latency before/after (alternately).")
    @click.option("--per-layer", is_flag=True, help="With --latency: also each conv's time inside the model (hooks).")
    @click.option("--batch-sizes", default="1", show_default=True)
    @click.option("--threads", type=click.IntRange(min=1), default=None)
    @click.option("--repeats", type=click.IntRange(min=2), default=10, show_default=True)
    @click.option("--input-size", default=None)
    @click.option("--json", "as_json", is_flag=True)
    @trust_code_option
    @user_errors
    def report(model, baseline, baseline_weights, latency, per_layer, batch_sizes, threads, repeats, input_size,
               as_json, trust_code):
        """Before/after report of a converted MODEL (.safetensors from ghostify): MACs, params, latency, per layer."""
        from .conversion import conversion_info
        from .outputs import to_json
        from .reporting import report as make_report
        from .serialization import load, read_metadata
        from .zoo import build_arch, get_model, signature_digest

        sizes = _batch_sizes(batch_sizes)
        ghost = load(model, trust_code=trust_code)
        if baseline:
            original = get_model(baseline, weights=baseline_weights, trust_code=trust_code)
            source = conversion_info(ghost).source
            if source is not None and signature_digest(original) != signature_digest(source[1]):
                raise GhostifyError(f"--baseline {baseline} is not the model '{model}' was converted from (its "
                                    "layers or shapes differ); pass the original model, or leave --baseline out "
                                    "to rebuild it from the file")
        else:
            arch = read_metadata(model).get("arch")
            if arch is None:
                raise GhostifyError(f"'{model}' records no architecture; pass --baseline MODEL")
            original = build_arch(arch, trust_code=trust_code, source=model)
            click.echo("baseline: rebuilt from the recorded architecture with random weights", err=True)
        size = parse_input_size(input_size, lambda: default_input(model))
        rep = make_report(original, ghost, input_size=size, latency=latency, batch_sizes=sizes,
                          repeats=repeats, threads=threads, name=model)
        layers = None
        if latency and per_layer:
            layers = per_layer_times(original, ghost, size, repeats=repeats, threads=threads)
        if as_json:
            d = rep.to_dict()
            d["layer_latency"] = layers
            click.echo(to_json(d, indent=2))
            return
        click.echo(rep.table())
        if layers:
            click.echo(per_layer_table(layers))


def per_layer_times(original, ghost, size, *, repeats: int = 10, threads=None) -> dict:
    """Each converted conv's median time inside the original and inside the converted model (hooks)."""
    import torch

    from .conversion import conversion_info
    from .latency import measure_layers

    names = [e.name for e in conversion_info(ghost).plan.converted]
    x = torch.randn(*size)
    before = measure_layers(original, x, names, repeats=repeats, threads=threads)
    after = measure_layers(ghost, x, names, repeats=repeats, threads=threads)
    return {n: {"before_ms": before[n]["median_ms"], "after_ms": after[n]["median_ms"]} for n in names
            if n in before and n in after}


def per_layer_table(layers: dict) -> str:
    rows = [("layer", "conv ms", "ghost ms", "ghost/conv")]
    for n, t in layers.items():
        rows.append((n, f"{t['before_ms']:.3f}", f"{t['after_ms']:.3f}", f"{t['after_ms'] / t['before_ms']:.2f}"))
    tb, ta = sum(t["before_ms"] for t in layers.values()), sum(t["after_ms"] for t in layers.values())
    rows.append(("all converted", f"{tb:.3f}", f"{ta:.3f}", f"{ta / tb:.2f}" if tb else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "per-layer latency inside the model (hooks; medians):\n" + "\n".join(lines)

