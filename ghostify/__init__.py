"""ghostify: Conv -> Ghost surgery on trained CNNs.

Example:
    >>> import torch, torchvision, ghostify
    >>> model = torchvision.models.resnet18().eval()
    >>> ghost = ghostify.convert(model, ratio=2)
    >>> ghost(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
"""
from .convert import ConversionInfo, convert
from .errors import GhostifyError
from .fold import fold_channel_order
from .modules import CHEAP_OPS, DepthwiseCheap, GhostConv2d, GhostModule, register_cheap_op
from .plan import GhostConfig, LayerSpec, Plan, PlanEntry, make_plan
from .transfer import INITS, register_init

__version__ = "0.1.0"

__all__ = [
    "convert", "make_plan", "GhostConfig", "LayerSpec", "Plan", "PlanEntry", "ConversionInfo",
    "GhostConv2d", "GhostModule", "DepthwiseCheap", "CHEAP_OPS", "register_cheap_op",
    "INITS", "register_init", "fold_channel_order", "GhostifyError", "__version__",
]
