"""Adapter layers (LoRA, MELoRA, PRoLoRA), their injection into models, accounting and export."""

from melora_tune.adapters.base import AdapterLinear
from melora_tune.adapters.config import METHODS, AdapterConfig
from melora_tune.adapters.lora import LoRALinear
from melora_tune.adapters.melora import MELoRALinear
from melora_tune.adapters.prolora import PRoLoRALinear

LAYERS: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear,
    "melora": MELoRALinear,
    "prolora": PRoLoRALinear,
}


def layer_class(method: str) -> type[AdapterLinear]:
    return LAYERS[AdapterConfig(method=method).method]


def make_layer(base, cfg: AdapterConfig) -> AdapterLinear:
    return LAYERS[cfg.method](base, cfg)


__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLinear",
    "LoRALinear",
    "MELoRALinear",
    "PRoLoRALinear",
    "LAYERS",
    "layer_class",
    "make_layer",
]
