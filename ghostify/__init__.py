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
    "convert": "conversion.rewrite", "ConversionInfo": "conversion.rewrite", "conversion_info": "conversion.rewrite",
    "build_config": "config", "GhostConfig": "config", "LayerSpec": "config", "default_cheap": "config",
    "make_plan": "conversion.plan", "Plan": "conversion.plan", "PlanEntry": "conversion.plan",
    "GhostConv2d": "layers", "GhostModule": "layers", "DepthwiseCheap": "layers", "CHEAP_OPS": "layers",
    "register_cheap_op": "layers",
    "INITS": "init.registry", "register_init": "init.registry",
    "fold_channel_order": "conversion.fold",
    "report": "measure.reporting", "ConversionReport": "measure.reporting",
    "count": "measure.counting", "measure_latency": "measure.latency", "measure_layers": "measure.latency",
    "sensitivity": "tradeoffs.sensitivity", "SensitivityTable": "tradeoffs.sensitivity",
    "allocate": "tradeoffs.allocation", "Allocation": "tradeoffs.allocation", "skip_slower": "tradeoffs.timing",
    "Sweep": "tradeoffs.sweep",
    "evaluate": "measure.evaluation", "layer_errors": "measure.evaluation", "compare_outputs": "measure.evaluation",
    "resolve_data": "zoo.data",
    "save": "serialization", "load": "serialization",
    "get_model": "zoo.models", "list_models": "zoo.models", "install_offline_weights": "zoo.models",
    "trace": "conversion.tracing", "GhostTracer": "conversion.tracing",
    "GhostifyError": "errors",
    "load_recipe": "train.recipe", "Recipe": "train.recipe", "kd_loss": "train.loss",
    "distill": "train.distill", "AugmentConfig": "augment",
    "fuse": "deploy", "export": "deploy", "ExportCheck": "deploy", "runtime_latency": "deploy",
    "torch_threads": "measure.latency",
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
