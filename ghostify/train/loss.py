"""The fine-tuning losses: knowledge distillation from the original and the feature term on converted layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GhostifyError

__all__ = ["kd_loss", "feature_loss"]


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
