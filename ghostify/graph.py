"""Graph queries the passes share: which module reads a node's output."""
from __future__ import annotations

import torch
from torch import fx, nn

__all__ = ["bn_output_scales"]


def bn_output_scales(converted: nn.Module, layers) -> dict[str, torch.Tensor]:
    """``|gamma| / sqrt(var + eps)`` of the eval-mode BatchNorm that alone reads a layer's output, by layer name.

    ``layers``: :class:`Layer` objects or names. The scales are in the channel order the BN
    reads (a folded layer's internal order), normalised to mean 1.
    """
    if not isinstance(converted, fx.GraphModule):
        return {}
    names = {getattr(layer, "name", layer) for layer in layers}
    out = {}
    for node in converted.graph.nodes:
        if node.op != "call_module" or node.target not in names or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = converted.get_submodule(user.target) if user.op == "call_module" else None
        if (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
                and bn.running_var is not None and user.args[0] is node):
            gamma = bn.weight.detach().double() if bn.weight is not None else 1.0
            scale = (gamma / (bn.running_var.double() + bn.eps).sqrt()).abs().cpu()
            out[node.target] = scale / scale.mean().clamp_min(1e-30)  # only the channels' relative weights matter
    return out
