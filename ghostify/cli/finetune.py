"""``ghostify finetune``: run a fine-tuning recipe (one process, or every rank under ``torchrun``)."""
from __future__ import annotations

import click

from .options import trust_code_option, user_errors


@click.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set train.epochs=2 --set data.root=/data/cifar10.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue a run from its last.ckpt (or best.ckpt), at the exact step, with its own recipe "
                   "and folder (--set and -o that would change them are refused).")
@click.option("--force", is_flag=True, help="Replace an existing run directory (only one ghostify made; the old run "
                                            "is replaced once the new one has been set up).")
@click.option("-o", "--output-dir", default=None, help="Run directory (default: the recipe's output_dir or runs/NAME).")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe as YAML and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@trust_code_option
@user_errors
def finetune(recipe, overrides, resume, force, output_dir, print_recipe, as_json, no_progress, trust_code):
    """Convert a model and fine-tune it with knowledge distillation, as RECIPE (a YAML file) says.

    \b
    ghostify finetune recipes/mnist_resnet20_r2.yaml
    ghostify finetune recipes/cifar10_resnet56_r2.yaml --set data.root=/data/cifar10 --set model.weights=r56.pt
    torchrun --nproc_per_node 8 -m ghostify finetune recipes/imagenet_resnet50_r2.yaml --set data.root=/data/imagenet
    ghostify finetune --resume runs/mnist_resnet20_r2/last.ckpt
    """
    from ..errors import GhostifyError
    from ..outputs import to_json
    from ..train.recipe import dump_yaml, load_recipe

    if recipe is None and resume is None:
        raise GhostifyError("give a RECIPE (e.g. recipes/mnist_resnet20_r2.yaml) or --resume RUN/last.ckpt")
    if print_recipe:
        if recipe is None:
            raise GhostifyError("--print-recipe needs a RECIPE")
        click.echo(dump_yaml(load_recipe(recipe, overrides)), nl=False)
        return
    from ..train.run import finetune as run, report_markdown

    result = run(recipe, overrides=overrides, resume=resume, force=force, output_dir=output_dir,
                 progress=not no_progress, trust_code=trust_code)
    if result.report:  # rank 0
        click.echo(to_json(result.report, indent=2) if as_json else report_markdown(result.report))
        click.echo(f"run directory: {result.run_dir}", err=True)
