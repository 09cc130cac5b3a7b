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
    >>> from ghostify.recipe import from_dict
    >>> cfg = from_dict({"train": {"steps": 2, "batch_size": 16}, "data": {"limit": 64, "val_limit": 64}})
    >>> result = finetune(cfg, output_dir="/tmp/ft-demo", force=True, progress=False)  # doctest: +SKIP
    >>> result.report["after"]["top1"]                                                  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from .errors import GhostifyError, describe
from .outputs import atomic_write, to_json
from .recipe import Recipe, check_registries, diff, dump_yaml, from_dict, load_recipe, to_dict

__all__ = ["finetune", "FinetuneResult", "kd_loss", "feature_loss", "build_dataset", "is_run_dir", "RUN_MARKER"]

CKPT_FORMAT = "ghostify-finetune/1"
RUN_MARKER = ".ghostify-run"  # only ghostify writes it (the run's id): --force replaces only folders holding it


# -- loss ------------------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, *,
            temperature: float = 4.0, alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinton's distillation loss: ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T)``.

    KL is averaged over the batch (``batchmean``); the ``T^2`` keeps its gradient scale
    independent of ``T``. Without labels the CE term is dropped (weight 1 on KD); without a
    teacher the KD term is dropped (weight 1 on CE).

    Example:
        >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> loss, parts = kd_loss(s, t, torch.tensor([0, 1]), temperature=2.0, alpha=0.5)
        >>> round(parts["ce"], 4), parts["kd"]                # CE = log 3, KL = 0
        (1.0986, 0.0)
    """
    if teacher is None and labels is None:
        raise GhostifyError("the loss needs labels or a teacher (loss.teacher=true)")
    parts: dict[str, float] = {}
    total = student.new_zeros(())
    w_ce = alpha if teacher is not None else 1.0
    w_kd = (1.0 - alpha) if labels is not None else 1.0
    if labels is not None and w_ce > 0:
        ce = F.cross_entropy(student, labels)
        total = total + w_ce * ce
        parts["ce"] = ce.item()
    if teacher is not None and w_kd > 0:
        t = temperature
        kd = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                      log_target=True, reduction="batchmean") * t * t
        total = total + w_kd * kd
        parts["kd"] = kd.item()
    return total, parts


def feature_loss(student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor],
                 channel_maps: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2``: Ghost layer output vs the original conv's output.

    ``channel_maps[name]`` is the Ghost layer's ``channel_map`` when it emits its internal
    order (folded layers: internal channel ``i`` is original channel ``map[i]``), else None.
    """
    losses = []
    for name, s in student_feats.items():
        t = teacher_feats[name]
        cmap = channel_maps.get(name)
        if cmap is not None:
            t = t[:, cmap]
        losses.append((s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


# -- data ------------------------------------------------------------------------------------------


class _Items(Dataset):
    """``(x, y)`` examples with an optional augmentation seeded by (seed, epoch, index), for exact resumes."""

    def __init__(self, get: Callable[[int], tuple], n: int, input_size: tuple[int, ...], augment=None, seed=0):
        self.get, self.n, self.input_size = get, n, tuple(input_size)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x, y = self.get(i)
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF_FFFF)
                x = self.augment(x)
        return x, y

    def set_epoch(self, epoch: int):
        self.epoch = epoch


def _crop_flip(pad: int):
    def augment(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        x = F.pad(x, (pad, pad, pad, pad))[:, i:i + h, j:j + w]
        return x.flip(-1) if torch.rand(()) < 0.5 else x

    return augment


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch file is data, not code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
        for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch does not hold")


def _read_cifar_batch(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise pickle.UnpicklingError("no data and labels in it")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise GhostifyError(f"'{file}' is not a CIFAR-10 batch file (python version): {exc}; "
                            "it is read as data only") from None
    return d


def _cifar10(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 (the python version): ``data_batch_1..5`` (train) or ``test_batch``, as uint8 NCHW and labels."""
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        file = folder / name
        if not file.is_file():
            raise GhostifyError(f"no CIFAR-10 at '{path}': {file} is missing (expected the python version, "
                                "unpacked: cifar-10-batches-py/); set data.root=PATH to the folder holding it")
        d = _read_cifar_batch(file)
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def build_dataset(spec: str, *, split: str, augment: bool, image_size: int | None = None, limit: int | None = None,
                  seed: int = 0) -> _Items:
    """A map-style dataset of ``(x, y)`` for training (``split="train"``) or validation (``"val"``).

    ``cifar10:PATH`` reads the train or test split by ``split`` (random crop with 4 padding
    and flip when ``augment``); ``imagefolder:PATH`` reads one subfolder per class (random
    resized crop and flip when ``augment``, else resize and centre crop; ``image_size``
    default 224); any other spec goes through :func:`ghostify.resolve_data` and is held in memory.
    """
    from .data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, resolve_data

    name, _, arg = spec.partition(":")
    if name == "cifar10":
        x, y = _cifar10(Path(arg).expanduser(), split)
        if limit:
            x, y = x[:limit], y[:limit]
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD))
        get = lambda i: ((x[i].float() / 255 - mean) / std, y[i])
        return _Items(get, len(x), (3, 32, 32), _crop_flip(4) if augment else None, seed)
    if name == "imagefolder":
        from torchvision import datasets, transforms as T

        size = image_size or 224
        path = Path(arg).expanduser()
        if not path.is_dir():
            raise GhostifyError(f"image folder '{arg}' does not exist; set data.root=PATH (for {spec!r}) or give "
                                "imagefolder:PATH with one subfolder of images per class")
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        plain = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
        try:
            ds = datasets.ImageFolder(str(path), transform=plain)
        except (FileNotFoundError, OSError) as exc:
            raise GhostifyError(f"image folder '{path}': {exc}; it needs one subfolder of images per class") from None
        if augment:  # the random crop replaces the resize; the seeded augmentation runs on the loaded image
            ds.transform = None
            crop = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
        n = min(limit, len(ds)) if limit else len(ds)
        return _Items(lambda i: ds[i], n, (3, size, size), crop if augment else None, seed)
    src = resolve_data(spec, batch_size=4096, limit=limit)
    xs, ys = [], []
    for bx, by in src:
        if by is None:
            raise GhostifyError(f"the data {spec!r} has no labels; fine-tuning needs (x, y) pairs "
                                "(KD alone: keep the labels out with loss.alpha=0)")
        xs.append(bx)
        ys.append(by)
    x, y = torch.cat(xs), torch.cat(ys)
    return _Items(lambda i: (x[i], y[i]), len(x), tuple(x.shape[1:]), None, seed)


class _EMA:
    """An exponential moving average of a model's floating-point parameters and buffers.

    Integer buffers (a Ghost layer's ``channel_map``, BN's batch counter) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        current = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.is_floating_point():
                v.lerp_(current[k].detach(), 1 - self.decay)
            else:
                v.copy_(current[k])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class _SkipSampler(Sampler):
    """The indices of ``base`` from position ``skip`` on (a resumed epoch)."""

    def __init__(self, base: Sampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return max(0, len(self.base) - self.skip)


# -- distributed -----------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _setup_dist(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise GhostifyError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    if world <= 1:
        return _Dist(device=torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local,
                 torch.device("cuda", local) if cuda else torch.device("cpu"), owns)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the fine-tuned model (unwrapped, eval mode), its report, the run directory."""

    model: nn.Module
    report: dict
    run_dir: Path
    losses: list[float] = field(default_factory=list)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text, force=True)  # files of the run itself


def is_run_dir(path: Path) -> bool:
    """True when ``path`` is a folder that ghostify made for a fine-tuning run (it holds the run marker)."""
    marker = Path(path) / RUN_MARKER
    try:
        return marker.is_file() and not marker.is_symlink() and bool(json.loads(marker.read_text()).get("run_id"))
    except (OSError, ValueError, AttributeError):
        return False


def _staging(run_dir: Path, what: str) -> Path:
    """The hidden sibling a new run is set up in (``new``) or an old run waits in while it is replaced (``old``)."""
    return run_dir.parent / f".{run_dir.name}.ghostify-{what}"


def _check_run_dir(run_dir: Path, force: bool, recipe_path: Path | None) -> None:
    """Refuse, before any work, a run folder that is not ghostify's to replace."""
    target, cwd = run_dir.resolve(), Path.cwd().resolve()
    why = ("the file system root" if target == Path(target.anchor) else "your home folder"
           if target == Path.home().resolve() else "the current folder" if target == cwd
           else "a parent of the current folder" if target in cwd.parents else None)
    if why is None and recipe_path is not None and target in recipe_path.resolve().parents:
        why = "the folder holding the recipe"
    if why:
        raise GhostifyError(f"the run folder '{run_dir}' is {why}; a run needs a folder of its own: "
                            "-o runs/NAME (or --set output_dir=...)")
    old = _staging(run_dir, "old")
    if is_run_dir(old) and os.environ.get("RANK", "0") == "0":
        # a replacement was cut short: the old run is put back, or dropped if the new one is in place
        if run_dir.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, run_dir)
            print(f"note: restored the run '{run_dir}' that an interrupted --force was replacing", file=sys.stderr)
    if not (run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))):
        return
    if not force:
        raise GhostifyError(f"output directory '{run_dir}' exists and is not empty; pass --force to replace it, "
                            f"--resume {run_dir / 'last.ckpt'} to continue it, or --set output_dir=OTHER")
    if not is_run_dir(run_dir):
        raise GhostifyError(f"output directory '{run_dir}' holds files but is not a ghostify run ({RUN_MARKER} "
                            "missing); refusing to delete it even with --force: choose --set output_dir=OTHER")


def _begin_run_dir(run_dir: Path, cfg: Recipe) -> Path:
    """A fresh staging folder for the new run, with its marker and recipe; the old run is not touched yet."""
    import uuid

    new = _staging(run_dir, "new")
    if new.exists() or new.is_symlink():
        if not is_run_dir(new):
            raise GhostifyError(f"'{new}' is in the way of the new run and is not a ghostify run; move it away")
        shutil.rmtree(new)  # left by a set-up that was killed
    new.mkdir(parents=True)
    _write_text(new / RUN_MARKER, json.dumps({"run_id": uuid.uuid4().hex, "name": cfg.name}) + "\n")
    _write_text(new / "recipe.yaml", dump_yaml(cfg))
    return new


def _commit_run_dir(new: Path, run_dir: Path) -> None:
    """Put the set-up run in place: the old run (if any) is moved aside, replaced, then deleted."""
    old = _staging(run_dir, "old")
    if run_dir.exists():
        os.rename(run_dir, old)
    os.rename(new, run_dir)
    if old.exists():
        shutil.rmtree(old)


def _truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        _write_text(path, "".join(json.dumps(r) + "\n" for r in rows if keep(r)))


def _lr_factor(cfg: Recipe, total: int, per_epoch: int) -> Callable[[int], float]:
    s = cfg.schedule
    warm = s.warmup_steps or round(s.warmup_epochs * per_epoch)
    milestones = sorted(round(float(m) * per_epoch) for m in s.milestones)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if s.name == "cosine":
            p = (step - warm) / max(1, total - warm)
            return s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        if s.name == "step":
            return s.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def _optimizer(cfg: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)  # no weight decay on BN and biases
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def _rng_state() -> dict:
    """Every RNG's state as tensors, numbers and tuples: a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _evaluate(model: nn.Module, dataset: Dataset | None, dist: _Dist, batch_size: int, baseline=None,
              workers: int = 0) -> dict:
    """``ghostify.evaluate`` on this rank's share of ``dataset``, combined over ranks."""
    from .evaluation import evaluate

    if dataset is None:
        return {}
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers)
    res = evaluate(model, loader, baseline=baseline, progress=False, device=dist.device) if len(shard) else {}
    keys = ("top1", "top5") + (("agree_top1", "agree_top5", "kl") if baseline is not None else ())
    n = res.get("examples", 0)
    sums = dist.sum([n] + [res.get(k, 0.0) * n for k in keys])
    if sums[0] == 0:
        return {}
    return {"examples": int(sums[0]), **{k: v / sums[0] for k, v in zip(keys, sums[1:])}}


_CKPT_KEYS = {"step": int, "recipe": dict, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict,
              "rng": dict, "history": list, "world_size": int, "loss_sums": list, "pre": dict,
              "train_seconds": (int, float)}


def _load_ckpt(path: Path) -> dict:
    from .zoo import load_pickle

    if not path.is_file():
        raise GhostifyError(f"checkpoint '{path}' does not exist")
    ckpt = load_pickle(path)  # data only: a checkpoint that would need code to load is refused
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise GhostifyError(f"'{path}' is not a ghostify fine-tuning checkpoint (last.ckpt / best.ckpt of a run)")
    bad = [k for k, tp in _CKPT_KEYS.items() if not isinstance(ckpt.get(k), tp)]
    if bad:
        raise GhostifyError(f"'{path}' is an incomplete or corrupt fine-tuning checkpoint ({', '.join(bad)} "
                            "missing or malformed); resume from the run's other checkpoint or start again")
    return ckpt


def _convert(cfg: Recipe, teacher: nn.Module, calib: Dataset | None) -> nn.Module:
    from .conversion import convert

    c = cfg.conversion
    options = {}
    if c.init == "calib":
        options = {"calib_data": DataLoader(Subset(calib, range(min(c.calib_size, len(calib)))), batch_size=64),
                   "max_layer_error": c.max_layer_error}
    return convert(teacher, ratio=c.ratio, dw_size=c.dw_size, init=c.init, cheap=c.cheap, include=c.include,
                   exclude=c.exclude, overrides=c.overrides, scatter=c.scatter, **options)


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
    from .zoo import check_trusted

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
        ckpt = _load_ckpt(Path(resume))
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
        _check_run_dir(run_dir, force, Path(recipe) if isinstance(recipe, (str, os.PathLike)) else None)
    check_registries(cfg)
    cfg.spec(cfg.data.train), cfg.spec(cfg.data.val)  # a missing data.root fails here, before any work
    dist = _setup_dist(cfg.train.device)
    try:
        return _Run(cfg, run_dir, dist, ckpt, force, progress, on_step, trust_code).run()
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


class _Run:
    def __init__(self, cfg: Recipe, run_dir: Path, dist: _Dist, ckpt: dict | None, force: bool, progress: bool,
                 on_step, trust_code: bool = False):
        self.cfg, self.run_dir, self.dist, self.ckpt, self.force = cfg, run_dir, dist, ckpt, force
        self.trust_code = trust_code
        self.progress, self.on_step = progress and dist.main, on_step
        cuda = dist.device.type == "cuda"
        t = cfg.train
        self.amp = None
        if cuda and t.amp != "off":
            self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                t.amp, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        elif t.amp in ("bf16", "fp16"):
            print(f"note: train.amp={t.amp} applies on CUDA only; training in float32 on CPU", file=sys.stderr)
        self.channels_last = t.channels_last == "on" or (t.channels_last == "auto" and cuda)

    # -- set-up ------------------------------------------------------------------------------------
    def _data(self):
        cfg, d = self.cfg, self.cfg.data
        train_spec = cfg.spec(d.train)
        self.train_set = build_dataset(train_spec, split="train", augment=d.augment, image_size=d.image_size,
                                       limit=d.limit, seed=cfg.seed)
        self.val_set = (build_dataset(cfg.spec(d.val), split="val", augment=False, image_size=d.image_size,
                                      limit=d.val_limit) if d.val else None)
        self.input_size = self.train_set.input_size
        if cfg.conversion.init == "calib":
            spec = train_spec if cfg.conversion.calib_data == "train" else cfg.spec(cfg.conversion.calib_data)
            self.calib_set = build_dataset(spec, split="train", augment=False, image_size=d.image_size,
                                           limit=cfg.conversion.calib_size)
        else:
            self.calib_set = None
        world = self.dist.world
        if cfg.train.batch_size % world:
            raise GhostifyError(f"recipe key 'train.batch_size': {cfg.train.batch_size} does not split over "
                                f"{world} processes; use a multiple of {world}")
        self.per_rank = cfg.train.batch_size // world
        self.sampler = DistributedSampler(self.train_set, num_replicas=world, rank=self.dist.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = len(self.sampler) // self.per_rank
        if self.steps_per_epoch < 1:
            raise GhostifyError(f"one batch of {cfg.train.batch_size} needs more than the {len(self.train_set)} "
                                "training examples; lower train.batch_size or data.limit")
        self.total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        if self.total_steps < 1:
            raise GhostifyError("nothing to train: set train.epochs > 0 or train.steps >= 1")
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _models(self):
        from .serialization import load, save
        from .zoo import get_model

        cfg, dist = self.cfg, self.dist
        m = cfg.model
        teacher = get_model(m.name, weights=m.weights, trust_code=self.trust_code, **m.kwargs)
        teacher = teacher.to(dist.device)  # calibrate on the device
        init_path = self.run_dir / "init.safetensors"
        if self.ckpt is None and dist.main:
            student = _convert(cfg, teacher, self.calib_set)
            save(student, init_path)
        dist.barrier()
        if self.ckpt is not None or not dist.main:
            student = load(init_path, trust_code=self.trust_code)
        self.teacher = teacher.to(self.dist.device).eval().requires_grad_(False)
        self.student = student.to(self.dist.device)
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        info = student.ghostify_info
        self.converted = [e.name for e in info.plan.converted]
        self.channel_maps = {}
        for name in self.converted:
            g = self.student.get_submodule(name)
            self.channel_maps[name] = g.channel_map if g.emit_internal_order else None

    def _hooks(self):
        self.s_feats, self.t_feats = {}, {}
        if self.cfg.loss.feature_weight <= 0 or not self.cfg.loss.teacher:
            return
        for name in self.converted:
            self.student.get_submodule(name).register_forward_hook(
                lambda mod, args, out, n=name: self.s_feats.__setitem__(n, out))
            self.teacher.get_submodule(name).register_forward_hook(
                lambda mod, args, out, n=name: self.t_feats.__setitem__(n, out))

    # -- pieces of the loop ------------------------------------------------------------------------
    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.student

    def _evaluate(self, model, baseline=True) -> dict:
        t0 = time.perf_counter()
        try:
            return _evaluate(model, self.val_set, self.dist, max(self.per_rank, 64), self.teacher if baseline else None,
                             self.cfg.data.workers)
        finally:
            self.eval_seconds += time.perf_counter() - t0

    def _save(self, name: str, extra_best: bool = False) -> None:
        acc = self.dist.sum(self.acc)  # every rank takes part; the totals are saved
        if not self.dist.main:
            return
        state = {"format": CKPT_FORMAT, "step": self.step, "recipe": to_dict(self.cfg),
                 "model": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None, "rng": _rng_state(),
                 "best": self.best, "pre": self.pre, "history": self.history, "train_seconds": self.train_seconds,
                 "world_size": self.dist.world, "loss_sums": acc}
        path = self.run_dir / name
        atomic_write(path, lambda tmp: torch.save(state, tmp), force=True)
        if extra_best:
            atomic_write(self.run_dir / "best.ckpt", lambda tmp: shutil.copyfile(path, tmp), force=True)

    def _log(self, name: str, row: dict) -> None:
        if self.dist.main:
            with open(self.run_dir / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _epoch_csv(self) -> None:
        if not self.dist.main or not self.history:
            return
        keys = list(dict.fromkeys(k for row in self.history for k in row))

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, keys)
                w.writeheader()
                w.writerows(self.history)

        atomic_write(self.run_dir / "epochs.csv", write, force=True)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        cfg, dist = self.cfg, self.dist
        _seed_all(cfg.seed)
        self._data()  # data errors stop the run before any folder is made
        final = self.run_dir
        if self.ckpt is None:  # set up beside the old run; it is replaced once set-up has succeeded
            dist.barrier()
            self.run_dir = _begin_run_dir(final, cfg) if dist.main else _staging(final, "new")
            dist.barrier()
        try:
            self._set_up()
            if self.ckpt is None:
                dist.barrier()
                if dist.main:
                    _commit_run_dir(self.run_dir, final)
                dist.barrier()
        except BaseException:
            if self.ckpt is None and dist.main and is_run_dir(self.run_dir) and self.run_dir != final:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.run_dir = final
        losses = self._loop()
        return self._finish(losses)

    def _set_up(self):
        cfg, dist = self.cfg, self.dist
        self._models()
        self._hooks()
        student = self.student
        if cfg.train.sync_bn and dist.world > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            self.student = student
        self.opt = _optimizer(cfg, student)
        factor = _lr_factor(cfg, self.total_steps, self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = _EMA(student, cfg.train.ema_decay)
        self.step, self.best, self.history, self.train_seconds, self.pre = 0, None, [], 0.0, None
        self.eval_seconds, self.acc = 0.0, [0.0] * 4
        if self.ckpt is not None:
            try:
                self._restore()
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
                raise GhostifyError(f"the checkpoint does not fit the run in '{self.run_dir}' ({describe(exc)}); "
                                    "it is corrupt or from another run") from None
        else:
            self.pre = {"original": self._evaluate(self.teacher, baseline=False),
                        "converted": self._evaluate(student)}
            if dist.main and self.pre["original"]:
                print(f"original top-1 {self.pre['original']['top1']:.4f}, converted before fine-tuning "
                      f"{self.pre['converted']['top1']:.4f}", file=sys.stderr)
        self.ddp = student
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(student, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    def _restore(self):
        ck = self.ckpt
        if ck["world_size"] != self.dist.world:
            print(f"note: the checkpoint was written by {ck['world_size']} processes, resuming with "
                  f"{self.dist.world}: the data order differs from the uninterrupted run", file=sys.stderr)
        self.student.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"])
        self.step, self.best, self.pre = ck["step"], ck["best"], ck["pre"]
        self.history, self.train_seconds = list(ck["history"]), ck["train_seconds"]
        self.acc = list(ck["loss_sums"]) if self.dist.main else [0.0] * 4
        self.eval_seconds = 0.0
        if self.dist.main:  # rows written after the checkpoint are redone
            _truncate_jsonl(self.run_dir / "steps.jsonl", lambda r: r["step"] <= self.step)
            _truncate_jsonl(self.run_dir / "epochs.jsonl", lambda r: r["epoch"] <= len(self.history))

    def _train_mode(self):
        self.student.train()
        if self.cfg.train.freeze_bn:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _step(self, x, y) -> tuple[float, dict]:
        cfg, dev = self.cfg, self.dist.device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        use_teacher = cfg.loss.teacher
        self.lr = self.opt.param_groups[0]["lr"]  # the rate this step uses
        with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            t_out = None
            if use_teacher:
                with torch.no_grad():
                    t_out = self.teacher(x)
            s_out = self.ddp(x)
            loss, parts = kd_loss(s_out.float(), t_out, y, temperature=cfg.loss.temperature,
                                  alpha=cfg.loss.alpha if use_teacher else 1.0)
            if self.s_feats:
                feat = feature_loss(self.s_feats, self.t_feats, self.channel_maps)
                loss = loss + cfg.loss.feature_weight * feat
                parts["feat"] = feat.item()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.train.clip_grad_norm is not None:
            self.scaler.unscale_(self.opt)
            parts["grad_norm"] = float(nn.utils.clip_grad_norm_(self.student.parameters(), cfg.train.clip_grad_norm))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.student)
        self.s_feats.clear()
        self.t_feats.clear()
        return loss.item(), parts

    def _loop(self) -> list[float]:
        from tqdm.auto import tqdm

        cfg, dist = self.cfg, self.dist
        losses: list[float] = []
        start_epoch, skip = divmod(self.step, self.steps_per_epoch)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"finetune {cfg.name}", file=sys.stderr,
                   disable=not self.progress, mininterval=2.0)
        acc = self.acc  # [epoch loss sum, epoch steps, log-window loss sum, log-window steps]
        base, seg0, ev0 = self.train_seconds, time.perf_counter(), self.eval_seconds
        elapsed = lambda: base + time.perf_counter() - seg0 - (self.eval_seconds - ev0)
        for epoch in range(start_epoch, self.num_epochs):
            if self.step >= self.total_steps:
                break
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            begin = skip if epoch == start_epoch else 0
            loader = DataLoader(self.train_set, batch_size=self.per_rank, drop_last=True,
                                sampler=_SkipSampler(self.sampler, begin * self.per_rank),
                                num_workers=cfg.data.workers, pin_memory=dist.device.type == "cuda")
            self._train_mode()
            e0, eval0 = time.perf_counter(), self.eval_seconds
            for x, y in loader:
                ts = time.perf_counter()
                loss, parts = self._step(x, y)
                self.step += 1
                losses.append(loss)
                acc[:] = [acc[0] + loss, acc[1] + 1, acc[2] + loss, acc[3] + 1]
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    keys = sorted(parts)
                    red = dist.sum(acc[2:] + [parts[k] for k in keys])
                    row = {"step": self.step, "epoch": epoch + 1, "loss": red[0] / red[1],
                           **{k: v / dist.world for k, v in zip(keys, red[2:])},
                           "lr": self.lr, "step_seconds": time.perf_counter() - ts}
                    self._log("steps.jsonl", row)
                    acc[2:] = [0.0, 0.0]
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", refresh=False)
                bar.update()
                if self.on_step is not None:
                    self.on_step(self.step, loss)
                end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if (not end_of_epoch and cfg.train.checkpoint_every
                        and self.step % cfg.train.checkpoint_every == 0):
                    self.train_seconds = elapsed()
                    self._save("last.ckpt")
                if self.step >= self.total_steps:
                    break
            self.train_seconds = elapsed()
            self._end_epoch(epoch, time.perf_counter() - e0 - (self.eval_seconds - eval0))
            self.train_seconds = elapsed()
        bar.close()
        return losses

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        cfg = self.cfg
        red = self.dist.sum(self.acc[:2])
        self.acc[:2] = [0.0, 0.0]
        row = {"epoch": epoch + 1, "step": self.step, "train_loss": red[0] / max(red[1], 1),
               "train_seconds_epoch": round(seconds, 2)}
        last = self.step >= self.total_steps
        if cfg.train.eval_every_epoch or last:
            t0 = time.perf_counter()
            res = self._evaluate(self._eval_model())
            row.update({f"val_{k}": v for k, v in res.items()})
            row["eval_seconds"] = round(time.perf_counter() - t0, 2)
        self.history.append(row)
        self._log("epochs.jsonl", row)
        self._epoch_csv()
        top1 = row.get("val_top1")
        better = top1 is not None and (self.best is None or top1 > self.best)
        if better:
            self.best = top1
        self._save("last.ckpt", extra_best=better or (self.best is None and last))
        if self.dist.main and top1 is not None:
            print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val top-1 {top1:.4f} "
                  f"({seconds:.0f} s)", file=sys.stderr)

    def _finish(self, losses: list[float]) -> FinetuneResult:
        from .conversion import conversion_info
        from .counting import count
        from .serialization import save

        final = self._eval_model()
        final_eval = self.history[-1] if self.history else {}
        after = {k[4:]: v for k, v in final_eval.items() if k.startswith("val_")}
        report = None
        if self.dist.main:
            plain = copy.deepcopy(final).cpu().eval()
            if conversion_info(plain) is None:
                plain.ghostify_info = self.student.ghostify_info
            save(plain, self.run_dir / "final.safetensors", force=True)
            x = torch.zeros(1, *self.input_size)
            teacher = copy.deepcopy(self.teacher).cpu().float().to(memory_format=torch.contiguous_format)
            c0, c1 = count(teacher, x), count(plain.to(memory_format=torch.contiguous_format), x)
            report = {"name": self.cfg.name, "recipe": to_dict(self.cfg), "steps": self.step,
                      "epochs": len(self.history), "world_size": self.dist.world,
                      "device": str(self.dist.device), "train_seconds": round(self.train_seconds, 1),
                      "seconds_per_epoch": [r["train_seconds_epoch"] for r in self.history],
                      "macs_before": c0.macs, "macs_after": c1.macs, "params_before": c0.params,
                      "params_after": c1.params, "converted_layers": len(self.converted),
                      "original": self.pre["original"], "before": self.pre["converted"], "after": after,
                      "best_top1": self.best, "final": "final.safetensors", "ema": self.ema is not None}
            _write_text(self.run_dir / "report.json", to_json(report, indent=2) + "\n")
            _write_text(self.run_dir / "report.md", report_markdown(report))
        return FinetuneResult(final.eval(), report or {}, self.run_dir, losses)


def report_markdown(r: dict) -> str:
    """The run report as a Markdown table (written to ``report.md``)."""
    from .counting import format_size

    def acc(d, key="top1"):
        return f"{100 * d[key]:.2f} %" if d and key in d else "-"

    lines = [f"# {r['name']}", "",
             f"{r['steps']} steps ({r['epochs']} epochs) on {r['world_size']} process(es), {r['device']}; "
             f"{r['train_seconds']:.0f} s training", "",
             "| model | MACs | params | top-1 | agreement with original |", "|---|---|---|---|---|",
             f"| original | {format_size(r['macs_before'])} | {format_size(r['params_before'])} | "
             f"{acc(r['original'])} | - |",
             f"| converted, before fine-tuning | {format_size(r['macs_after'])} | {format_size(r['params_after'])} | "
             f"{acc(r['before'])} | {acc(r['before'], 'agree_top1')} |",
             f"| converted, after fine-tuning{' (EMA)' if r['ema'] else ''} | {format_size(r['macs_after'])} | "
             f"{format_size(r['params_after'])} | {acc(r['after'])} | {acc(r['after'], 'agree_top1')} |", "",
             f"MACs ratio {r['macs_after'] / r['macs_before']:.3f}, params ratio "
             f"{r['params_after'] / r['params_before']:.3f}; {r['converted_layers']} convs converted. "
             f"Seconds per epoch: {', '.join(f'{s:.0f}' for s in r['seconds_per_epoch'])}.", ""]
    return "\n".join(lines)
