"""Adapter methods (LoRA, MELoRA, PRoLoRA, DoRA), their registry, injection into models, accounting and export.

Each method lives in one module here and registers itself (``adapters.registry``);
importing this package registers the built-in ones.
"""

from melora_tune.adapters.base import AdapterLinear
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.hyperparams import HYPERPARAMS, HyperParam
from melora_tune.adapters.method import Method
from melora_tune.adapters.registry import (
    all_methods,
    describe,
    format_lr,
    get_method,
    method_names,
    register_method,
    unregister_method,
)

# The built-in methods register themselves on import (order: how tables and --help list them).
from melora_tune.adapters.lora import LoRALinear
from melora_tune.adapters.melora import MELoRALinear
from melora_tune.adapters.prolora import PRoLoRALinear
from melora_tune.adapters.dora import DoRALinear


def layer_class(method: str) -> type[AdapterLinear]:
    return get_method(AdapterConfig(method=method).method).layer


def make_layer(base, cfg: AdapterConfig) -> AdapterLinear:
    return cfg.spec.make_layer(base, cfg)


def __getattr__(name: str):
    # Live views of the registry, so that methods registered later (plug-ins, tests) are included.
    if name == "METHODS":
        return method_names()
    if name == "LAYERS":
        return {m.name: m.layer for m in all_methods()}
    raise AttributeError(name)


__all__ = [
    "METHODS", "HYPERPARAMS", "HyperParam", "Method", "AdapterConfig", "AdapterLinear", "LoRALinear",
    "MELoRALinear", "PRoLoRALinear", "DoRALinear", "LAYERS", "all_methods", "describe", "format_lr", "get_method",
    "layer_class", "make_layer", "method_names", "register_method", "unregister_method",
]
