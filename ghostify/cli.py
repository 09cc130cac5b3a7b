"""The ``ghostify`` command line. Heavy imports live inside the commands so ``--help`` is instant.

Tables and JSON go to stdout, progress and notes to stderr. User errors print one line,
``Error: ...``, and exit non-zero; ``-v`` shows the traceback of unexpected errors.
"""
from __future__ import annotations

import functools
import math
import sys

import click

from .errors import GhostifyError
from .ratio import check_ratio
from .tradeoff_cli import RATIO, budget_options

# Python-API fields the layer options mirror (ghostify.LayerSpec); kept in step by a test.
LAYER_OPTIONS = ("ratio", "dw_size", "init", "cheap")


class _Group(click.Group):
    """A click group whose usage errors print one line instead of the usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)


def _user_errors(fn):
    """Turn GhostifyError into a one-line ClickException; other errors too unless -v."""

    @functools.wraps(fn)
    def wrapper(*args, verbose=False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GhostifyError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if verbose:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise click.ClickException(f"{type(exc).__name__}: {first} (run with -v for the traceback)") from None

    return click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of unexpected errors.")(wrapper)




def trust_code_option(fn):
    """``--trust-code``: let model files run code (every command that loads a MODEL file takes it)."""
    return click.option("--trust-code", is_flag=True,
                        help="Let checkpoint files run code: build the package.module:callable architecture a file "
                             "names, or unpickle a whole torch.save-d model. Only for files you trust; without it "
                             "a file is read as data (torchvision names and ghostify's own builders still load).")(fn)


def _parse_override(text: str) -> tuple[str, dict | None]:
    pattern, sep, spec = text.partition(":")
    if not sep or not pattern:
        raise GhostifyError(f"--override '{text}': expected PATTERN:skip or PATTERN:ratio=4,dw_size=1")
    if spec.strip().lower() in ("skip", "none"):
        return pattern, None
    out: dict = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in LAYER_OPTIONS:
            raise GhostifyError(f"--override '{text}': '{item}' is not KEY=VALUE with KEY in {', '.join(LAYER_OPTIONS)}")
        if key in ("ratio", "dw_size"):
            try:
                value = check_ratio(float(value)) if key == "ratio" else int(value)
            except ValueError:
                kind = "a number >= 1" if key == "ratio" else "an integer"
                raise GhostifyError(f"--override '{text}': {key} must be {kind} (got '{value}')") from None
        out[key] = value
    return pattern, out


def _parse_input_size(text: str | None, default=(1, 3, 224, 224)) -> tuple[int, ...]:
    if not text:  # ``default`` may be a function: a size recorded in a file is read only when needed
        return tuple(default() if callable(default) else default)
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise GhostifyError(f"--input-size '{text}': give 224, C,H,W or N,C,H,W") from None
    if len(dims) == 1:
        return (1, 3, dims[0], dims[0])
    if len(dims) == 3:
        return (1,) + dims
    if len(dims) == 4 and all(d > 0 for d in dims):
        return dims
    raise GhostifyError(f"--input-size '{text}': give 224, C,H,W or N,C,H,W")


def _odd(ctx, param, value):
    if value is not None and (value < 1 or value % 2 == 0):
        raise click.BadParameter(f"{value} is not an odd integer >= 1 (the cheap op keeps the map size); try 3")
    return value


def _selection_options(fn):
    opts = [
        click.option("--weights", default="DEFAULT", show_default=True,
                     help="DEFAULT, a weights enum name (IMAGENET1K_V2), none, or a state-dict file."),
        click.option("--ratio", type=RATIO, default=2, show_default=True,
                     help="s: keep ceil(n/s) intrinsic filters per converted conv (2, 3, 4, ... or a fraction "
                          "like 1.5)."),
        click.option("--dw-size", type=int, default=3, show_default=True, callback=_odd,
                     help="Kernel size of the cheap depthwise op (odd)."),
        click.option("--init", "init", default="copy", show_default=True,
                     help="Weight transfer: copy (exact intrinsic channels, fitted ghosts), calib (fitted on --calib-data) "
                          "or random."),
        click.option("--cheap", default="dw", show_default=True, help="Cheap-op family: dw (depthwise, as the paper), mix (1x1 from the intrinsic maps), "
                          "or auto (per layer, the better fit per MAC; needs --init calib)."),
        click.option("--include", multiple=True, metavar="GLOB", help="Convert only convs whose name matches."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Never convert convs whose name matches."),
        click.option("--override", multiple=True, metavar="PATTERN:SPEC",
                     help="Per-layer settings, e.g. 'layer4.*:ratio=4' or 'fc:skip' (exact name beats glob)."),
        click.option("--leaf", multiple=True, metavar="NAME", help="Module name the tracer must not trace through."),
        click.option("--input-size", default=None, help="224, C,H,W or N,C,H,W (default 1,3,224,224)."),
        click.option("--calib-data", default=None, metavar="SPEC",
                     help="Calibration data for --init calib: mnist, photos, imagefolder:PATH, cifar10:PATH, "
                          "synthetic (made from the model's BN statistics), ..."),
        click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Calibration examples."),
        click.option("--max-layer-error", type=click.FloatRange(min=0), default=None,
                     help="With --init calib: keep a layer as a conv when its held-out relative error exceeds this."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return trust_code_option(fn)


def _load_and_plan(model_spec, weights, ratio, dw_size, init, cheap, include, exclude, override, leaf, trust_code):
    from .conversion import build_config
    from .plan import make_plan
    from .zoo import get_model

    overrides = dict(_parse_override(o) for o in override)
    cfg = build_config(ratio, dw_size, init, cheap, include, exclude, overrides)
    model = get_model(model_spec, weights=weights, trust_code=trust_code)
    return model, cfg, make_plan(model, cfg, leaf_modules=leaf)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ghostify")
def cli():
    """ghostify: Conv -> Ghost surgery on trained CNNs."""


@cli.command()
@_selection_options
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_user_errors
def inspect(model, weights, ratio, dw_size, init, cheap, include, exclude, override, leaf, input_size, calib_data,
            calib_size, max_layer_error, trust_code, as_json):
    """Show which convs of MODEL convert and which are kept, and why.

    With --init calib and --calib-data the conversion is run too, and each layer's relative
    output error (on the calibration batches and on held-out ones) is shown.
    """
    from .outputs import to_json

    original, cfg, plan = _load_and_plan(model, weights, ratio, dw_size, init, cheap, include, exclude, override, leaf,
                                         trust_code)
    fidelity = None
    if calib_data is not None and any(e.spec.init == "calib" for e in plan.converted):
        from .conversion import convert as do_convert, conversion_info

        size = _parse_input_size(input_size, lambda: _default_input(model))
        _check_input(original, size)
        ghost = do_convert(original, config=cfg, plan=plan, leaf_modules=leaf,
                           **_calibration_options(calib_data, calib_size, max_layer_error, original, size))
        info = conversion_info(ghost)
        plan, fidelity = info.plan, info.layer_info
    if as_json:
        d = plan.to_dict()
        if fidelity is not None:
            d["layer_info"] = fidelity
        click.echo(to_json(d, indent=2))
    else:
        click.echo(plan.table(fidelity=fidelity))


def _calibration_options(calib_data, calib_size, max_layer_error, model, size) -> dict:
    from .data import resolve_data

    return {"calib_data": resolve_data(_calibration_split(calib_data), batch_size=64, limit=calib_size,
                                       shuffle=False, model=model, input_size=size[1:]),
            "max_layer_error": max_layer_error}


@cli.command()
@_selection_options
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the converted model (.safetensors).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--latency", is_flag=True, help="Measure CPU latency before/after (batch 1).")
@click.option("--no-fold", is_flag=True, help="Keep run-time channel reordering instead of folding it into consumers.")
@click.option("--scatter", is_flag=True,
              help="Let layers whose order cannot fold choose intrinsic channels freely (reordered at run time).")
@budget_options
@_user_errors
def convert(model, weights, ratio, dw_size, init, cheap, include, exclude, override, leaf, input_size, calib_data,
            calib_size, max_layer_error, trust_code, output, force, as_json, latency, no_fold, scatter, **budget):
    """Convert MODEL (torchvision name, package.module:callable or checkpoint) and report the trade-off."""
    import time

    from .conversion import convert as do_convert
    from .outputs import check_output, to_json
    from .reporting import report
    from .serialization import save
    from .tradeoff_cli import budget_plan, save_plan

    if output is not None:  # every output is checked before the work starts
        check_output(output, force=force, suffixes=(".safetensors",))
    if budget.get("save_plan") is not None:
        check_output(budget["save_plan"], force=force, option="--save-plan")
    size = _parse_input_size(input_size, lambda: _default_input(model))
    original, cfg, plan = _load_and_plan(model, weights, ratio, dw_size, init, cheap, include, exclude, override, leaf,
                                         trust_code)
    _check_input(original, size)
    t0 = time.perf_counter()
    options = {}
    if calib_data is not None:
        options = _calibration_options(calib_data, calib_size, max_layer_error, original, size)
    elif any(e.spec.init == "calib" for e in plan.converted):
        raise GhostifyError("--init calib needs --calib-data (e.g. mnist, imagefolder:PATH)")
    if any(budget[k] for k in ("target_macs", "target_latency", "skip_slower", "plan_file")):
        plan = budget_plan(original, plan, budget, size=size, ratio=ratio, dw_size=dw_size, init=init, cheap=cheap,
                           include=include, exclude=exclude, overrides=dict(_parse_override(o) for o in override),
                           leaf=leaf, calib_data=options.get("calib_data"))
        t0 = time.perf_counter()
    ghost = do_convert(original, config=cfg, plan=plan, fold=not no_fold, scatter=scatter, leaf_modules=leaf,
                       **options)
    if budget.get("save_plan") is not None:
        save_plan(ghost.ghostify_info.plan, budget["save_plan"], force=force)
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


def _calibration_split(spec: str) -> str:
    """Calibrate on a source's training split unless the user named one."""
    return {"mnist": "mnist:train"}.get(spec, spec)


@cli.command("eval")
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
@_user_errors
def eval_(model, data_spec, baseline, weights, baseline_weights, batch_size, limit, as_json, trust_code):
    """Accuracy of MODEL on labelled data, or its agreement with --baseline."""
    from .data import resolve_data
    from .evaluation import evaluate
    from .outputs import to_json
    from .zoo import get_model

    net = get_model(model, weights=weights, trust_code=trust_code)
    ref = get_model(baseline, weights=baseline_weights, trust_code=trust_code) if baseline else None
    res = evaluate(net, resolve_data(data_spec, batch_size=batch_size, limit=limit), baseline=ref)
    res = {"model": model, "baseline": baseline, "data": data_spec, **res}
    if as_json:
        click.echo(to_json(res, indent=2))
    else:
        click.echo("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in res.items()))


def _default_input(model_spec: str):
    """The input size a checkpoint recorded, else ImageNet's."""
    from pathlib import Path

    path = Path(model_spec)
    arch = {}
    if path.suffix == ".safetensors" and path.is_file():
        from .serialization import read_metadata

        arch = read_metadata(path).get("arch") or {}
    elif path.suffix in (".pt", ".pth") and path.is_file():
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            arch = obj.get("arch") or {} if isinstance(obj, dict) else {}
        except Exception:  # a full pickled model or a corrupt file: get_model reports it
            arch = {}
    size = arch.get("input_size", (1, 3, 224, 224)) if isinstance(arch, dict) else (1, 3, 224, 224)
    try:
        dims = tuple(int(d) for d in size)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 4 or min(dims) < 1 or math.prod(dims) > 2**26:  # a file cannot make us allocate gigabytes
        raise GhostifyError(f"'{model_spec}' records an implausible input size {size!r}; pass --input-size")
    return dims


def _check_input(model, size):
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*size))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GhostifyError(f"the model does not run on input {size}: {first}; "
                            "pass --input-size matching the model (e.g. 1,1,28,28 for MNIST)") from None


@cli.command()
@_user_errors
def models():
    """List the torchvision model names MODEL accepts."""
    from .zoo import list_models

    click.echo("\n".join(list_models()))


@cli.command()
@_user_errors
def env():
    """Print versions and hardware, for bug reports."""
    import platform

    import torch

    from . import __version__

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


from .finetune_cli import finetune as _finetune  # noqa: E402  (its module imports _user_errors from here)

cli.add_command(_finetune)


from .tradeoff_cli import register as _register_tradeoff  # noqa: E402  sweep, sensitivity, report

_register_tradeoff(cli, _user_errors, (_parse_input_size, _default_input), trust_code_option)


def main(argv=None):
    """Console-script entry point."""
    cli.main(args=argv, prog_name="ghostify")


if __name__ == "__main__":
    main()

