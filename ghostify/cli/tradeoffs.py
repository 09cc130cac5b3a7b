"""``ghostify sweep``, ``sensitivity`` and ``report``: the trade-off commands (the library side is
:mod:`ghostify.tradeoffs`). Heavy imports live inside the command bodies so ``ghostify --help`` stays instant.
"""
from __future__ import annotations

import click

from ..errors import GhostifyError
from .options import (RATIO, RUNTIME_CHOICES, check_calib_augment, default_input, layer_options, parse_batch_sizes,
                      parse_floats, parse_input_size, parse_ints, parse_ratios, parse_words, runtime_timer,
                      trust_code_option, user_errors)

__all__ = ["sweep", "sensitivity", "report", "COMMANDS"]


def layer_opts(**kw):
    """Decorate a command with :func:`~ghostify.cli.options.layer_options`."""
    def add(fn):
        for opt in reversed(layer_options(**kw)):
            fn = opt(fn)
        return fn
    return add


@click.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (results.json/.csv, summary.md, plot.png); an existing sweep there resumes.")
@click.option("--weights", default="DEFAULT", show_default=True, help="As for convert.")
@click.option("--ratios", default="2,4", show_default=True, help="Uniform ratios to sweep.")
@click.option("--dw-sizes", default="", help="Cheap-op kernel sizes to sweep (default: 1 for mix, 3 otherwise).")
@click.option("--init", "inits", default="copy", show_default=True, help="Inits to sweep, e.g. copy,calib.")
@click.option("--cheap", "cheaps", default="",
              help="Cheap ops to sweep, e.g. dw,mix (default: mix for init calib, dw otherwise).")
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
    from ..tradeoffs.sweep import Sweep, check_sweep_folder, table
    from ..zoo.data import calib_spec, eval_spec, resolve_data
    from ..zoo.models import get_model, weights_digest

    check_sweep_folder(out_dir)
    sizes = parse_batch_sizes(batch_sizes)
    size = parse_input_size(input_size, lambda: default_input(model))
    grid = {"ratio": parse_ratios(ratios), "init": parse_words(inits)}
    grid.update({k: v for k, v in (("dw_size", parse_ints(dw_sizes)), ("cheap", parse_words(cheaps))) if v})  # else defaults
    flags = {"false": False, "true": True}
    try:
        grid["scatter"] = [flags[w.lower()] for w in parse_words(scatters)]
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
    extra = [{**first, "target_macs": t} for t in parse_floats(targets)]
    sw = Sweep(original, grid, out_dir, eval_data=ev, calib_data=calib, input_size=size, latency=latency,
               batch_sizes=sizes, threads=threads, repeats=repeats, meta=meta,
               alloc_ratios=tuple(parse_ratios(alloc_ratios)), alloc_method=alloc_method, alloc_eval_data=alloc_ev,
               extra_points=extra)
    if sens_file:
        from ..tradeoffs.sensitivity import SensitivityTable

        sw.alloc_table = SensitivityTable.load(sens_file)
    rows = sw.run()
    click.echo(table(rows))
    click.echo(f"wrote {out_dir}/results.json, results.csv, summary.md, plot.png", err=True)

@click.command()
@click.argument("model")
@click.option("--weights", default="DEFAULT", show_default=True, help="As for convert.")
@click.option("--ratio", "ratios", default="2", show_default=True, help="Ratio(s) to measure, e.g. 2 or 2,4.")
@layer_opts(skip=("ratio",), defaults={"init": "calib"})
@click.option("--calib-data", default=None, metavar="SPEC", help="Calibration data for init calib.")
@click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--calib-augment", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Fit on N augmented views of the calibration images too (as convert --calib-augment).")
@click.option("--eval", "eval_data", default=None, metavar="SPEC",
              help="Evaluate each layer converted alone here (method alone).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None)
@click.option("--method", type=click.Choice(["alone", "proxy", "context"]), default=None,
              help="alone: evaluate (default with --eval); proxy: calibration's held-out error only; "
                   "context: each layer moved alone away from the uniform --reference model, all recalibrated.")
@click.option("--reference", type=RATIO, default=None,
              help="The uniform ratio --method context starts from (default: the smallest of --ratio).")
@click.option("--measure", type=click.Choice(["kl", "agree", "top1", "error", "output"]), default=None,
              help="The loss: kl (default for alone), agree (-log agreement), top1 (accuracy drop), output (relative "
                   "error of a trunk's output, squared), error (proxy).")
@click.option("--exclude", multiple=True, metavar="GLOB")
@click.option("--input-size", default=None)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the table as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a bar chart (PNG).")
@click.option("--force", is_flag=True, help="Overwrite -o and --plot if they exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@trust_code_option
@user_errors
def sensitivity(model, weights, ratios, dw_size, init, cheap, round_to, calib_data, calib_size, calib_augment,
                eval_data, eval_limit, method, reference, measure, exclude, input_size, output, plot, force, as_json,
                trust_code):
    """For each conv of MODEL converted alone: MACs saved and the loss in accuracy/agreement."""
    from ..config import build_config
    from ..outputs import check_output, to_json
    from ..tradeoffs.sensitivity import sensitivity as measure_sensitivity
    from ..zoo.data import calib_spec, resolve_data
    from ..zoo.models import get_model

    check_calib_augment(calib_augment, calib_data)
    if output is not None:
        check_output(output, force=force)
    if plot is not None:
        check_output(plot, force=force, option="--plot")
    size = parse_input_size(input_size, lambda: default_input(model))
    original = get_model(model, weights=weights, trust_code=trust_code).eval()
    calib = resolve_data(calib_spec(calib_data), batch_size=32, limit=calib_size) if calib_data else None
    ev = resolve_data(eval_data, batch_size=50, limit=eval_limit) if eval_data else None
    ratio_list = parse_ratios(ratios)
    cfg = build_config(min(ratio_list), dw_size, init, cheap, exclude=exclude, round_to=round_to)
    table = measure_sensitivity(original, config=cfg, ratios=ratio_list, calib_data=calib, eval_data=ev,
                                method=method or ("alone" if ev else "proxy"), measure=measure, input_size=size,
                                reference=reference, calib_augment=calib_augment)
    table.settings["model"] = model
    if output is not None:
        table.save(output, force=force)
        click.echo(f"wrote {output}", err=True)
    if plot is not None:
        table.plot(plot, force=force)
        click.echo(f"wrote {plot}", err=True)
    click.echo(to_json(table.to_dict(), indent=1) if as_json else table.table())

@click.command()
@click.argument("model")
@click.option("--baseline", default=None, metavar="MODEL",
              help="The original (name, module:callable or checkpoint); default: rebuilt from MODEL's recipe "
                   "with random weights (MACs and latency do not depend on them).")
@click.option("--baseline-weights", default="DEFAULT", show_default=True)
@click.option("--latency", is_flag=True, help="Measure latency before/after (alternately).")
@click.option("--per-layer", is_flag=True, help="With --latency: also each conv's time inside the model (hooks).")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default=None,
              help="With --latency: time both models fused for inference in eager PyTorch (torch), torch.compile "
                   "(compile) or ONNX Runtime (ort; needs pip install 'ghostify[deploy]'); default: eager, unfused.")
@click.option("--batch-sizes", default="1", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--repeats", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--input-size", default=None)
@click.option("--json", "as_json", is_flag=True)
@trust_code_option
@user_errors
def report(model, baseline, baseline_weights, latency, per_layer, runtime, batch_sizes, threads, repeats, input_size,
           as_json, trust_code):
    """Before/after report of a converted MODEL (.safetensors from ghostify): MACs, params, latency, per layer."""
    from ..conversion.rewrite import conversion_info
    from ..measure.latency import per_layer_times
    from ..measure.reporting import report as make_report
    from ..outputs import to_json
    from ..serialization import load, read_metadata
    from ..zoo.models import build_arch, get_model, signature_digest

    if runtime and not latency:
        raise GhostifyError("--runtime says where --latency is measured; add --latency")
    if per_layer and runtime:
        raise GhostifyError("--per-layer times layers in eager PyTorch by hooks; leave out --runtime for it")
    timer = runtime_timer(runtime)
    sizes = parse_batch_sizes(batch_sizes)
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
                      repeats=repeats, threads=threads, name=model, timer=timer)
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


COMMANDS = (sweep, sensitivity, report)
