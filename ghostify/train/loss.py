"""The fine-tuning losses: knowledge distillation from the original and the feature term on converted layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..conversion.rewrite import conversion_info
from ..errors import GhostifyError

__all__ = ["kd_loss", "feature_loss", "GhostLayerOutputs", "converted_names"]


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


def converted_names(model: nn.Module) -> list[str]:
    """The names of a ghostify model's Ghost layers (each replaced the original conv of that name)."""
    info = conversion_info(model)
    if info is None:
        raise GhostifyError("the student was not made by ghostify (no ghostify_info); convert the original with "
                            "ghostify.convert or load a converted model with ghostify.load")
    return [e.name for e in info.plan.converted]


class GhostLayerOutputs:
    """Forward hooks that keep each Ghost layer's output in ``student`` and the output of the conv of the same
    name in ``teacher``, for :func:`feature_loss` (:meth:`loss`) over the last forward pass of both.

    A context manager: the hooks are removed on leaving it, or by :meth:`remove`.

    Example:
        >>> import torch, ghostify
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3)).eval()
        >>> ghost = ghostify.convert(net, ratio=2, init="copy")     # the stem stays; conv '2' is a Ghost layer
        >>> x = torch.randn(2, 3, 8, 8)
        >>> with torch.no_grad(), GhostLayerOutputs(ghost, net) as outs:
        ...     _ = ghost(x), net(x)
        ...     outs.names, float(outs.loss()) > 0
        (['2'], True)
        >>> any(m._forward_hooks for m in [*ghost.modules(), *net.modules()])
        False
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        self.names = converted_names(student)
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.channel_maps: dict[str, torch.Tensor | None] = {}
        self._handles = []
        try:
            for name in self.names:
                ghost = student.get_submodule(name)
                self.channel_maps[name] = ghost.channel_map if ghost.emit_internal_order else None
                for mod, got in ((ghost, self.student_out), (_teacher_conv(teacher, name), self.teacher_out)):
                    self._handles.append(mod.register_forward_hook(
                        lambda mod, args, out, n=name, got=got: got.__setitem__(n, out)))
        except BaseException:
            self.remove()
            raise

    def loss(self) -> torch.Tensor:
        """:func:`feature_loss` of the outputs kept from the last forward passes."""
        if not self.student_out:
            raise GhostifyError("no Ghost layer output was kept: run the student and the teacher first")
        return feature_loss(self.student_out, self.teacher_out, self.channel_maps)

    def clear(self) -> None:
        """Drop the kept outputs (and the graphs they hold)."""
        self.student_out.clear()
        self.teacher_out.clear()

    def remove(self) -> None:
        """Remove every hook and drop the kept outputs."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "GhostLayerOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _teacher_conv(teacher: nn.Module, name: str) -> nn.Conv2d:
    try:
        mod = teacher.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, nn.Conv2d):
        raise GhostifyError(f"the feature loss compares each Ghost layer with the teacher's conv of the same name, "
                            f"but the teacher has no conv '{name}'; give the original model as the teacher, or "
                            "feature_weight=0 (logits only)")
    return mod
