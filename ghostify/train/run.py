"""Fine-tuning a converted model with knowledge distillation from the original, resumable, DDP-ready.

The original model is the teacher (eval mode, no gradients); the converted model learns
from ``alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, plus an optional
feature term on the outputs of the converted layers. One process or ``torchrun`` (DDP:
``gloo`` on CPU, ``nccl`` on CUDA); rank 0 writes everything.

A run directory holds::

    .ghostify-run        the marker (the run's id): only such a folder is ever replaced by --force
    recipe.yaml          the resolved recipe
    init.safetensors     the converted model before fine-tuning (ghostify.save format)
    steps.jsonl          per logged step: loss terms (averaged over ranks), lr, seconds
    epochs.jsonl/.csv    per epoch: train loss, validation metrics, wall time
    last.ckpt, best.ckpt training state (model, optimizer, scheduler, scaler, EMA, RNG, step)
    final.safetensors    the fine-tuned model: ``ghostify eval run/final.safetensors --data ...``
    report.json/.md      MACs, params, accuracy of original / converted before / after fine-tuning

Resuming (``resume=run/last.ckpt``) continues at the exact step: the data order of every
epoch is a function of (seed, epoch), augmentation of (seed, epoch, example), so a run
stopped mid-epoch and resumed ends with the same weights as one that never stopped.

Example:
    >>> from ghostify.train.recipe import from_dict
    >>> cfg = from_dict({"train": {"steps": 2, "batch_size": 16}, "data": {"limit": 64, "val_limit": 64}})
    >>> result = finetune(cfg, output_dir="/tmp/ft-demo", force=True, progress=False)  # doctest: +SKIP
    >>> result.report["after"]["top1"]                                                  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import GhostifyError
from ..trust import check_trusted
from .datasets import build_dataset  # noqa: F401  (the public names of fine-tuning, in one place)
from .distributed import setup_dist
from .loss import feature_loss, kd_loss  # noqa: F401
from .recipe import Recipe, check_registries, diff, from_dict, load_recipe, to_dict
from .report import report_markdown  # noqa: F401
from .rundir import RUN_MARKER, check_run_dir, is_run_dir  # noqa: F401
from .session import FinetuneResult, Session
from .state import load_checkpoint

__all__ = ["finetune", "FinetuneResult", "kd_loss", "feature_loss", "build_dataset", "is_run_dir", "RUN_MARKER",
           "report_markdown"]


def finetune(recipe: Recipe | str | os.PathLike, *, overrides: tuple[str, ...] | list[str] = (),
             resume: str | os.PathLike | None = None, force: bool = False, output_dir: str | os.PathLike | None = None,
             progress: bool = True, on_step: Callable[[int, float], None] | None = None,
             trust_code: bool = False) -> FinetuneResult:
    """Convert the recipe's model, fine-tune it with KD from the original, write the run directory.

    Args:
        recipe: a :class:`~ghostify.recipe.Recipe` or a YAML path (``overrides``: ``key=value`` strings).
            A recipe is code, like a script: its ``model.name`` may be any ``package.module:callable``.
        resume: a ``last.ckpt``/``best.ckpt`` of an earlier run: continue it at its step, in its
            directory, with its recipe. ``recipe``, ``overrides`` and ``output_dir`` may only repeat
            what the run already uses; a change is an error (start a new run to change it).
        force: replace an existing run directory (only one ghostify made). The new run is set up
            beside it and replaces it only once set-up has succeeded.
        trust_code: let files run code: a checkpoint given as ``model.name``, or a resumed
            checkpoint whose recipe names a ``package.module:callable`` (see :func:`ghostify.load`).
        on_step: called as ``on_step(step, loss)`` after every step (e.g. to stop a test run).

    Returns:
        A :class:`FinetuneResult`. Under ``torchrun`` every rank returns; only rank 0 writes.
    """
    if recipe is None:
        cfg = None
    elif isinstance(recipe, (str, os.PathLike)):
        cfg = load_recipe(recipe, overrides)
    else:
        cfg = from_dict(to_dict(recipe), overrides)
    if cfg is None and resume is None:
        raise GhostifyError("give a recipe, or --resume RUN/last.ckpt")
    if output_dir is not None and not str(output_dir).strip():
        raise GhostifyError("-o: the run folder is empty; give a folder name (e.g. -o runs/NAME)")
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(Path(resume))
        saved = from_dict(ckpt["recipe"])
        wanted = cfg if cfg is not None else from_dict(ckpt["recipe"], overrides)
        changed = [k for k in diff(saved, wanted) if k not in ("output_dir", "name")]
        run_dir = Path(resume).parent
        if output_dir is not None and Path(output_dir).resolve() != run_dir.resolve():
            changed.append(f"the run folder ({output_dir})")
        if changed:
            raise GhostifyError(f"--resume continues the run in '{run_dir}' with its own recipe; it cannot change "
                                f"{', '.join(changed)}. Resume without them, or start a new run with -o NEW")
        check_trusted(saved.model.name, str(resume), trust_code)
        cfg = saved
    else:
        if output_dir is not None:
            cfg.output_dir = str(output_dir)
        run_dir = cfg.run_dir
        check_run_dir(run_dir, force, Path(recipe) if isinstance(recipe, (str, os.PathLike)) else None)
    check_registries(cfg)
    cfg.spec(cfg.data.train), cfg.spec(cfg.data.val)  # a missing data.root fails here, before any work
    dist = setup_dist(cfg.train.device)
    try:
        return Session(cfg, run_dir, dist, ckpt, force, progress, on_step, trust_code).run()
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
