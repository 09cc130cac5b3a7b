"""``ghostify distill``: repair a converted model by distilling its original into it on a few unlabelled images."""
from __future__ import annotations

import click

from .options import parse_input_size, trust_code_option, user_errors

__all__ = ["distill"]


@click.command()
@click.argument("ghost", type=click.Path(dir_okay=False))
@click.option("--teacher", required=True, metavar="MODEL",
              help="The original model (torchvision name, package.module:callable or checkpoint).")
@click.option("--teacher-weights", default="DEFAULT", show_default=True, help="Weights of --teacher when it is a name.")
@click.option("--data", "data_spec", required=True, metavar="SPEC",
              help="Unlabelled images: photos (its calib split), imagefolder:PATH (class folders or not), "
                   "synthetic, mnist-sample, ...")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-5, show_default=True,
              help="AdamW learning rate (cosine schedule).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=10, show_default=True,
              help="Steps of linear learning-rate warm-up.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True)
@click.option("--feature-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the per-Ghost-layer feature loss (0: logits only).")
@click.option("--mix", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of the images mixed with another one (mixup or cutmix).")
@click.option("--jitter", type=click.FloatRange(0, 1), default=0.2, show_default=True, help="Colour jitter strength.")
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
              help="Smallest area a random resized crop keeps (1: no crops).")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Train on crops of this size.")
@click.option("--limit", type=click.IntRange(min=1), default=256, show_default=True, help="At most this many images.")
@click.option("--val-data", default=None, metavar="SPEC",
              help="Held-out images: agreement with the teacher before and after (e.g. photos:heldout).")
@click.option("--val-limit", type=click.IntRange(min=1), default=None)
@click.option("--input-size", default=None, help="Input shape for --data synthetic, e.g. 1,3,224,224.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Write the distilled model here (.safetensors).")
@click.option("--run-dir", default=None, help="Logs, checkpoints and report (default: OUTPUT without its suffix, "
                                              "plus .run).")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue a run from its last.ckpt, with the same options.")
@click.option("--force", is_flag=True, help="Overwrite --output and replace the run folder (only one ghostify made).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@trust_code_option
@user_errors
def distill(ghost, teacher, teacher_weights, data_spec, steps, batch_size, lr, warmup_steps, temperature, feature_weight, mix,
            jitter, crop_scale, image_size, limit, val_data, val_limit, input_size, output, run_dir, resume, force,
            seed, no_progress, trust_code):
    """Distil --teacher into GHOST (a converted .safetensors) on a few unlabelled images; write -o.

    \b
    ghostify convert mobilenet_v2 --ratio 2 --init calib --calib-data photos -o mnv2-r2.safetensors
    ghostify distill mnv2-r2.safetensors --teacher mobilenet_v2 --data photos --steps 400 \\
        --val-data photos:heldout -o mnv2-r2-distilled.safetensors
    ghostify distill mnv2-r2.safetensors ... --resume mnv2-r2-distilled.run/last.ckpt
    """
    from pathlib import Path

    from ..outputs import check_output
    from ..serialization import load, save
    from ..augment import AugmentConfig
    from ..train.distill import distill as run
    from ..zoo.data import calib_spec
    from ..zoo.models import get_model

    check_output(output, force=force, suffixes=(".safetensors",))
    student = load(ghost, trust_code=trust_code)
    original = get_model(teacher, weights=teacher_weights, trust_code=trust_code)
    size = parse_input_size(input_size)[1:] if input_size else None
    model = run(student, original, calib_spec(data_spec), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                temperature=temperature, feature_weight=feature_weight, image_size=image_size, limit=limit,
                augment=AugmentConfig(crop_scale=crop_scale, jitter=jitter, mix=mix), val_data=val_data,
                val_limit=val_limit, input_size=size, run_dir=run_dir or Path(output).with_suffix(".run"),
                resume=resume, force=force, seed=seed, progress=not no_progress, inplace=True)
    save(model, output, force=force)
    click.echo(f"wrote {output}", err=True)
