"""``ghostify export``: a model (converted or not) fused, exported to ONNX or ``torch.export``, and checked.

A thin face over :func:`ghostify.export`; heavy imports live inside the command body.
"""
from __future__ import annotations

import click

from ..errors import GhostifyError
from .options import check_input, default_input, parse_input_size, trust_code_option, user_errors

__all__ = ["export", "COMMANDS"]

@click.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The file to write: OUT.onnx (ONNX Runtime runs it as is) or OUT.pt2 (torch.export).")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="Weights of MODEL when it is a name: DEFAULT, a weights enum name, none, or a state-dict file.")
@click.option("--input-size", default=None,
              help="N,C,H,W of the example input the export traces with (default: the size MODEL records, "
                   "else 1,3,224,224).")
@click.option("--check-data", default=None, metavar="SPEC",
              help="Check the file against PyTorch on this data (e.g. photos:heldout, imagefolder:PATH; first 64 "
                   "examples); default: random inputs of --input-size.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="The largest max relative error accepted; above it nothing is written.")
@click.option("--no-fuse", is_flag=True, help="Export the graph as it is (no BN folding, Ghost layers kept).")
@click.option("--dynamic-batch", is_flag=True, help="Let the batch size vary in the file (checked at two sizes).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the check as JSON.")
@trust_code_option
@user_errors
def export(model, output, weights, input_size, check_data, tolerance, no_fuse, dynamic_batch, force, as_json,
           trust_code):
    """Export MODEL (a .safetensors from ghostify convert, or any MODEL convert accepts, exported unconverted)
    to OUT.onnx or OUT.pt2, fused for inference, and check the file against the PyTorch model."""
    from ..deploy.export import export as do_export, require_onnx
    from ..outputs import check_output, to_json
    from ..zoo.models import get_model

    suffix = "." + str(output).rsplit(".", 1)[-1] if "." in str(output) else ""
    if suffix not in (".onnx", ".pt2"):
        raise GhostifyError(f"-o '{output}': the file must end in .onnx or .pt2 (e.g. -o model.onnx)")
    check_output(output, force=force)
    if suffix == ".onnx":
        require_onnx()
    size = parse_input_size(input_size, lambda: default_input(model))
    net = get_model(model, weights=weights, trust_code=trust_code)
    check_input(net, size)
    check = do_export(net, output, input_size=size, dynamic_batch=dynamic_batch, fuse=not no_fuse,
                      check_data=check_data, tolerance=tolerance, force=force)
    click.echo(to_json(check.to_dict(), indent=2) if as_json else check.summary())


COMMANDS = (export,)
