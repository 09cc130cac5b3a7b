"""One fine-tuning run (:class:`Session`): set-up, state, checkpoints, the run directory and the report."""
from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from ..conversion.rewrite import conversion_info, convert
from ..errors import GhostifyError, describe
from ..measure.counting import count
from ..measure.evaluation import evaluate
from ..outputs import atomic_write, to_json
from ..serialization import load, save
from ..zoo.models import get_model
from .datasets import build_dataset
from .distributed import Dist
from .loop import TrainingLoop
from .loss import GhostLayerOutputs, converted_names
from .recipe import Recipe, ghost_config, to_dict
from .report import report_markdown
from .rundir import begin_run_dir, commit_run_dir, is_run_dir, staging, truncate_jsonl, write_text
from .state import CKPT_FORMAT, EMA, lr_factor, make_optimizer, rng_state, seed_all, set_rng_state

__all__ = ["Session", "FinetuneResult", "convert_model", "evaluate_shards"]


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the fine-tuned model (unwrapped, eval mode), its report, the run directory."""

    model: nn.Module
    report: dict
    run_dir: Path
    losses: list[float] = field(default_factory=list)


def evaluate_shards(model: nn.Module, dataset: Dataset | None, dist: Dist, batch_size: int, baseline=None,
              workers: int = 0) -> dict:
    """``ghostify.evaluate`` on this rank's share of ``dataset``, combined over ranks."""
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


def convert_model(cfg: Recipe, teacher: nn.Module, calib: Dataset | None) -> nn.Module:
    """The recipe's conversion of ``teacher`` (calibrated on the first ``calib_size`` examples of ``calib``)."""
    c = cfg.conversion
    options = {}
    if c.init == "calib":
        options = {"calib_data": DataLoader(Subset(calib, range(min(c.calib_size, len(calib)))), batch_size=64),
                   "max_layer_error": c.max_layer_error}
    return convert(teacher, config=ghost_config(c), scatter=c.scatter, **options)


class Session(TrainingLoop):
    """One fine-tuning run: data, teacher and student, optimizer and state, the run directory, the report.

    The training loop itself is :class:`~ghostify.train.loop.TrainingLoop`'s.
    """

    def __init__(self, cfg: Recipe, run_dir: Path, dist: Dist, ckpt: dict | None, force: bool, progress: bool,
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
        self._sampling()

    def _sampling(self):
        """The batch per process, the sampler and the run's length in steps and epochs, from ``self.train_set``."""
        cfg, world = self.cfg, self.dist.world
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
        cfg, dist = self.cfg, self.dist
        m = cfg.model
        teacher = get_model(m.name, weights=m.weights, trust_code=self.trust_code, **m.kwargs)
        teacher = teacher.to(dist.device)  # calibrate on the device
        init_path = self.run_dir / "init.safetensors"
        if self.ckpt is None and dist.main:
            student = convert_model(cfg, teacher, self.calib_set)
            save(student, init_path)
        dist.barrier()
        if self.ckpt is not None or not dist.main:
            student = load(init_path, trust_code=self.trust_code)
        self.teacher = teacher.to(self.dist.device).eval().requires_grad_(False)
        self.student = student.to(self.dist.device)
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        self._converted_layers()

    def _converted_layers(self):
        self.converted = converted_names(self.student)

    def _hooks(self):
        """Keep the Ghost layers' and the teacher's convs' outputs when the loss has a feature term."""
        if self.cfg.loss.feature_weight > 0 and self.cfg.loss.teacher and self.converted:
            self.features = GhostLayerOutputs(self.student, self.teacher)

    # -- pieces of the loop ------------------------------------------------------------------------
    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.student

    def _evaluate(self, model, baseline=True) -> dict:
        t0 = time.perf_counter()
        try:
            return evaluate_shards(model, self.val_set, self.dist, max(self.per_rank, 64), self.teacher if baseline else None,
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
                 "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng_state(),
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
        seed_all(cfg.seed)
        self._data()  # data errors stop the run before any folder is made
        final = self.run_dir
        if self.ckpt is None:  # set up beside the old run; it is replaced once set-up has succeeded
            dist.barrier()
            self.run_dir = begin_run_dir(final, cfg) if dist.main else staging(final, "new")
            dist.barrier()
        self.features = None
        try:
            self._set_up_beside(final)
            self.run_dir = final
            losses = self._loop()
        finally:  # the models given back carry no hook of the run
            if self.features is not None:
                self.features.remove()
        return self._finish(losses)

    def _set_up_beside(self, final: Path):
        """Set up in ``self.run_dir``; a new run's folder then replaces ``final`` (removed if set-up fails)."""
        dist = self.dist
        try:
            self._set_up()
            if self.ckpt is None:
                dist.barrier()
                if dist.main:
                    commit_run_dir(self.run_dir, final)
                dist.barrier()
        except BaseException:
            if self.ckpt is None and dist.main and is_run_dir(self.run_dir) and self.run_dir != final:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _set_up(self):
        cfg, dist = self.cfg, self.dist
        self._models()
        student = self.student
        if cfg.train.sync_bn and dist.world > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            self.student = student
        self.opt = make_optimizer(cfg, student)
        factor = lr_factor(cfg, self.total_steps, self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = EMA(student, cfg.train.ema_decay)
        self._hooks()  # after the EMA's copy of the student, which must not carry them
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
        set_rng_state(ck["rng"])
        self.step, self.best, self.pre = ck["step"], ck["best"], ck["pre"]
        self.history, self.train_seconds = list(ck["history"]), ck["train_seconds"]
        self.acc = list(ck["loss_sums"]) if self.dist.main else [0.0] * 4
        self.eval_seconds = 0.0
        if self.dist.main:  # rows written after the checkpoint are redone
            truncate_jsonl(self.run_dir / "steps.jsonl", lambda r: r["step"] <= self.step)
            truncate_jsonl(self.run_dir / "epochs.jsonl", lambda r: r["epoch"] <= len(self.history))

    def _finish(self, losses: list[float]) -> FinetuneResult:
        final = self._eval_model()
        conversion_info(final)  # a deepcopy (the EMA's) keeps the info in .meta only: this puts .ghostify_info back
        final_eval = self.history[-1] if self.history else {}
        after = {k[4:]: v for k, v in final_eval.items() if k.startswith("val_")}
        report = None
        if self.dist.main:
            plain = copy.deepcopy(final).cpu().eval()  # save() reads its info, from .meta if need be
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
            write_text(self.run_dir / "report.json", to_json(report, indent=2) + "\n")
            write_text(self.run_dir / "report.md", report_markdown(report))
        return FinetuneResult(final.eval(), report or {}, self.run_dir, losses)
