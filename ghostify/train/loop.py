"""The training loop of a fine-tuning run: one KD step, epochs with exact resumes, logging and checkpoints."""
from __future__ import annotations

import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from .datasets import SkipSampler
from .loss import kd_loss

__all__ = ["TrainingLoop"]


class TrainingLoop:
    """The loop half of :class:`~ghostify.train.session.Session` (which sets up every attribute used here)."""

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
            if self.features is not None:
                feat = self.features.loss()
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
        if self.features is not None:
            self.features.clear()
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
                                sampler=SkipSampler(self.sampler, begin * self.per_rank),
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
