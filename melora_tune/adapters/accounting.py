"""Exact adapter parameter counts from a model's config alone (no weights are loaded).

The model is built on PyTorch's ``meta`` device: every module and shape exists
but no memory is allocated and nothing is read from disk beyond config.json, so
this works for any architecture transformers knows, at any size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.inject import find_modules_to_save, find_targets
from melora_tune.adapters.models import auto_class, causal_lm_overrides, load_config


@dataclass(frozen=True)
class LinearShape:
    name: str
    d_in: int
    d_out: int


class ModelSpec:
    """The shapes of a model's linear layers, for accounting and budget reasoning."""

    def __init__(self, model: nn.Module, name: str = "") -> None:
        self.model = model
        self.name = name or type(model).__name__

    @classmethod
    def from_pretrained(cls, name_or_path: str, task: str = "seq_cls", num_labels: int | None = None) -> "ModelSpec":
        overrides = {"num_labels": num_labels} if num_labels is not None and task == "seq_cls" else {}
        return cls.from_config(load_config(name_or_path, **overrides), task=task, name=name_or_path)

    @classmethod
    def from_config(cls, config, task: str = "seq_cls", name: str = "") -> "ModelSpec":
        if task == "causal_lm":
            for key, value in causal_lm_overrides(config).items():  # as the trial loads it (and no warning)
                config = copy.deepcopy(config)
                setattr(config, key, value)
        with torch.device("meta"):
            model = auto_class(task).from_config(config)
        return cls(model, name or getattr(config, "name_or_path", ""))

    def targets(self, target_modules: list[str]) -> list[LinearShape]:
        out = []
        for name in find_targets(self.model, target_modules):
            mod = self.model.get_submodule(name)
            out.append(LinearShape(name, mod.in_features, mod.out_features))
        return out

    def head_params(self, modules_to_save: list[str]) -> int:
        return sum(
            p.numel() for name in find_modules_to_save(self.model, modules_to_save) for p in self.model.get_submodule(name).parameters()
        )

    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def check_config(shapes: list[LinearShape], cfg: AdapterConfig) -> None:
    """Raise UsageError if cfg does not fit every targeted layer."""
    method = cfg.spec
    for s in shapes:
        method.check(s.d_in, s.d_out, cfg)


def adapter_params(shapes: list[LinearShape], cfg: AdapterConfig) -> int:
    """Trainable adapter parameters of cfg over these layers (checks feasibility first)."""
    check_config(shapes, cfg)
    method = cfg.spec
    return sum(method.count_params(s.d_in, s.d_out, cfg) for s in shapes)


def account(spec: ModelSpec, cfg: AdapterConfig) -> dict:
    """Everything a user or a search wants to know about cfg on this model, before training."""
    shapes = spec.targets(cfg.target_modules)
    params = adapter_params(shapes, cfg)
    total = spec.total_params()
    return {
        "method": cfg.method,
        **cfg.method_params(),
        "alpha": cfg.alpha,
        "adapter_params": params,
        "head_params": spec.head_params(cfg.modules_to_save),
        "equivalent_rank": cfg.equivalent_rank,
        "adapted_layers": len(shapes),
        "target_modules": list(cfg.target_modules),
        "base_params": total,
        "adapter_fraction": params / total if total else 0.0,
    }
