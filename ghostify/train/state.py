"""Training state: checkpoints (read as data only), every RNG's state, the EMA, the LR schedule and optimizer."""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import GhostifyError
from ..arch import load_pickle
from .recipe import Recipe

__all__ = ["CKPT_FORMAT", "CKPT_KEYS", "load_checkpoint", "rng_state", "set_rng_state", "seed_all", "EMA", "lr_factor",
           "make_optimizer"]

CKPT_FORMAT = "ghostify-finetune/1"


CKPT_KEYS = {"step": int, "recipe": dict, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict,
              "rng": dict, "history": list, "world_size": int, "loss_sums": list, "pre": dict,
              "train_seconds": (int, float)}


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise GhostifyError(f"checkpoint '{path}' does not exist")
    ckpt = load_pickle(path)  # data only: a checkpoint that would need code to load is refused
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise GhostifyError(f"'{path}' is not a ghostify fine-tuning checkpoint (last.ckpt / best.ckpt of a run)")
    bad = [k for k, tp in CKPT_KEYS.items() if not isinstance(ckpt.get(k), tp)]
    if bad:
        raise GhostifyError(f"'{path}' is an incomplete or corrupt fine-tuning checkpoint ({', '.join(bad)} "
                            "missing or malformed); resume from the run's other checkpoint or start again")
    return ckpt


def rng_state() -> dict:
    """Every RNG's state as tensors, numbers and tuples: a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EMA:
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


def lr_factor(cfg: Recipe, total: int, per_epoch: int) -> Callable[[int], float]:
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


def make_optimizer(cfg: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)  # no weight decay on BN and biases
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
