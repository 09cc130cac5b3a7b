"""ghostify: Conv -> Ghost surgery on trained CNNs.

Example:
    >>> import torch, torchvision, ghostify
    >>> model = torchvision.models.resnet18().eval()
    >>> ghost = ghostify.convert(model, ratio=2)
    >>> ghost(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])

Names are imported on first use, so ``ghostify --help`` does not pay for importing torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "convert": "conversion", "build_config": "conversion", "ConversionInfo": "conversion", "conversion_info": "conversion",
    "make_plan": "plan", "GhostConfig": "plan", "LayerSpec": "plan", "Plan": "plan", "PlanEntry": "plan",
    "GhostConv2d": "modules", "GhostModule": "modules", "DepthwiseCheap": "modules", "CHEAP_OPS": "modules",
    "register_cheap_op": "modules",
    "INITS": "transfer", "register_init": "transfer",
    "fold_channel_order": "fold",
    "report": "reporting", "ConversionReport": "reporting",
    "count": "counting", "measure_latency": "latency", "measure_layers": "latency",
    "sensitivity": "layer_sensitivity", "SensitivityTable": "layer_sensitivity",
    "allocate": "allocation", "Allocation": "allocation", "skip_slower": "allocation", "Sweep": "sweep",
    "evaluate": "evaluation", "layer_errors": "evaluation", "resolve_data": "data",
    "save": "serialization", "load": "serialization",
    "get_model": "zoo", "list_models": "zoo", "install_offline_weights": "zoo",
    "trace": "tracing", "GhostTracer": "tracing",
    "GhostifyError": "errors",
    "load_recipe": "recipe", "Recipe": "recipe",
    "fuse": "deploy", "export": "deploy", "ExportCheck": "deploy", "runtime_latency": "deploy", "torch_threads": "latency",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ghostify' has no attribute {name!r}")


def __dir__():
    return __all__
