"""What the commands share: option builders (the layer options generated from ``LayerSpec``'s fields), parsers
of option values, the user-error wrapper, the model's default input size. Torch-free at import."""
from __future__ import annotations

import functools
import math
from dataclasses import fields

import click

from ..config import LayerSpec
from ..errors import GhostifyError
from ..ratio import check_ratio, parse_ratios  # noqa: F401  (parse_ratios: for the commands)

LAYER_FIELDS = tuple(f.name for f in fields(LayerSpec))  # ratio, dw_size, init, cheap, round_to: --override's keys


def user_errors(fn):
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


class _Ratio(click.ParamType):
    name = "RATIO"

    def convert(self, value, param, ctx):
        try:
            return check_ratio(float(value))
        except ValueError:
            self.fail(f"{value!r} is not a ratio; use a number >= 1, e.g. 2 or 1.5", param, ctx)


RATIO = _Ratio()


def parse_floats(text: str | None) -> list[float]:
    try:
        return [float(t) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated numbers, e.g. 0.9,0.8") from None


def parse_ints(text: str | None) -> list[int]:
    try:
        return [int(t) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        raise GhostifyError(f"'{text}': expected comma-separated integers, e.g. 2,3,4") from None


def parse_batch_sizes(text: str | None) -> tuple[int, ...]:
    sizes = parse_ints(text)
    if not sizes or any(b < 1 for b in sizes):
        raise GhostifyError(f"--batch-sizes '{text}': expected comma-separated batch sizes >= 1, e.g. 1,8")
    return tuple(sizes)


def parse_words(text: str | None) -> list[str]:
    return [t for t in (text or "").replace(" ", "").split(",") if t]


def parse_override(text: str) -> tuple[str, dict | None]:
    pattern, sep, spec = text.partition(":")
    if not sep or not pattern:
        raise GhostifyError(f"--override '{text}': expected PATTERN:skip or PATTERN:ratio=4,dw_size=1")
    if spec.strip().lower() in ("skip", "none"):
        return pattern, None
    out: dict = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in LAYER_FIELDS:
            raise GhostifyError(f"--override '{text}': '{item}' is not KEY=VALUE with KEY in {', '.join(LAYER_FIELDS)}")
        if key in ("ratio", "dw_size", "round_to"):
            try:
                value = check_ratio(float(value)) if key == "ratio" else int(value)
            except ValueError:
                kind = "a number >= 1" if key == "ratio" else "an integer"
                raise GhostifyError(f"--override '{text}': {key} must be {kind} (got '{value}')") from None
        out[key] = value
    return pattern, out


def parse_input_size(text: str | None, default=(1, 3, 224, 224)) -> tuple[int, ...]:
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


def check_calib_augment(calib_augment: int, calib_data) -> None:
    """``--calib-augment N`` varies the calibration images: refused (naming the fix) without ``--calib-data``."""
    if calib_augment and not calib_data:
        raise GhostifyError("--calib-augment N adds views of the calibration images: give --calib-data SPEC too")


def odd(ctx, param, value):
    if value is not None and (value < 1 or value % 2 == 0):
        raise click.BadParameter(f"{value} is not an odd integer >= 1 (the cheap op keeps the map size); try 3")
    return value


def layer_options(*, skip=(), defaults: dict | None = None) -> list:
    """``--ratio``, ``--dw-size``, ``--init``, ``--cheap``, ``--round-to``: generated from :class:`ghostify.LayerSpec`'s
    fields (name, default, help; the ``ratio``, ``odd`` and ``min`` checks) so that the CLI and the Python API cannot
    drift.
    ``skip`` leaves fields out; ``defaults`` replaces defaults (e.g. ``{"init": "calib"}``)."""
    out = []
    for f in fields(LayerSpec):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kw = {"default": default, "help": f.metadata["help"], "show_default": default is not None}
        if f.metadata.get("ratio"):
            kw["type"] = RATIO
        elif f.metadata.get("odd"):
            kw.update(type=int, callback=odd)
        elif f.metadata.get("min") is not None:
            kw["type"] = click.IntRange(min=f.metadata["min"])
        out.append(click.option("--" + f.name.replace("_", "-"), f.name, **kw))
    return out


def selection_options(fn):
    """The options of ``inspect`` and ``convert``: weights, the layer settings, selection, calibration."""
    opts = [
        click.option("--weights", default="DEFAULT", show_default=True,
                     help="DEFAULT, a weights enum name (IMAGENET1K_V2), none, or a state-dict file."),
        *layer_options(),
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
        click.option("--calib-augment", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                     help="Fit on N augmented views of the calibration images too (crops, flips, jitter, mixing): "
                          "with few images the fit learns them rather than the model. Memory grows with the "
                          "examples (MobileNetV2, 224 px: 256 crops + 256 views fit in 24 GiB, + 768 do not)."),
        click.option("--max-layer-error", type=click.FloatRange(min=0), default=None,
                     help="With --init calib: keep a layer as a conv when its held-out relative error exceeds this."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return trust_code_option(fn)


def fraction(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"{value} is not a fraction in (0, 1]; e.g. 0.8 keeps 80 % of the original")
    return value


def budget_options(fn):
    """The options ``ghostify convert`` takes for budgeted allocation and latency-aware skipping."""
    opts = [
        click.option("--target-macs", type=float, default=None, callback=fraction, metavar="F",
                     help="Choose a ratio per conv (or keep it) so the model has <= F of the original MACs, "
                          "least predicted loss first (greedy; see ghostify sensitivity)."),
        click.option("--target-latency", type=float, default=None, callback=fraction, metavar="F",
                     help="As --target-macs, on per-layer latency measured here (batch of --input-size; "
                          "in --runtime), then checked on the whole model: the layers are asked for more "
                          "(or less) until it meets F; refused when it cannot."),
        click.option("--no-whole-model", is_flag=True,
                     help="With --target-latency: trust the layers timed alone, without timing the whole "
                          "converted model (quicker; the model may miss F)."),
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
                     help="Keep a conv when its Ghost layer, timed alone on its real input, is not faster; then, "
                          "while the whole model is not faster, also the layers that gained least."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Intra-op threads for latency measurements (default: torch's)."),
        click.option("--repeats", type=click.IntRange(min=2), default=None,
                     help="Runs per timing for --target-latency and --skip-slower (default 10; more gives "
                          "steadier plans on a busy machine, at the cost of time)."),
        click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="torch", show_default=True,
                     help="Where --skip-slower and --target-latency time each layer (with its BN and activation, "
                          "fused): eager PyTorch, ONNX Runtime (ort; needs pip install 'ghostify[deploy]') or "
                          "torch.compile."),
        click.option("--plan", "plan_file", type=click.Path(dir_okay=False), default=None,
                     help="Replay a plan: a JSON plan (--save-plan) or a model saved by ghostify."),
        click.option("--save-plan", type=click.Path(dir_okay=False), default=None,
                     help="Write the executed per-layer plan as JSON."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


RUNTIME_CHOICES = ("torch", "ort", "compile")


def require_runtime(runtime: str | None) -> None:
    """Fail now, in one line naming the extra to install, when ``runtime`` needs ONNX and it is missing."""
    if runtime == "ort":
        from ..deploy.export import require_onnx

        require_onnx()


def runtime_timer(runtime: str | None):
    """The ``timer`` for :func:`ghostify.report` that times in ``runtime`` (None: eager, unfused)."""
    if runtime is None:
        return None
    require_runtime(runtime)
    import functools

    from ..deploy.runtime import runtime_latency

    return functools.partial(runtime_latency, runtime=runtime)


def default_input(model_spec: str):
    """The input size a checkpoint recorded, else ImageNet's."""
    from pathlib import Path

    path = Path(model_spec)
    arch = {}
    if path.suffix == ".safetensors" and path.is_file():
        from ..serialization import read_metadata

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


def check_input(model, size):
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*size))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GhostifyError(f"the model does not run on input {size}: {first}; "
                            "pass --input-size matching the model (e.g. 1,1,28,28 for MNIST)") from None
