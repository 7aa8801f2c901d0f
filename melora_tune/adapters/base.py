"""The interface every adapted linear layer shares."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from melora_tune.adapters.config import AdapterConfig


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` with an explicit fan-in.

    With a = sqrt(5) the gain is sqrt(1/3), so the bound is 1/sqrt(fan_in): the
    init of ``nn.Linear`` and of PEFT's LoRA A. PRoLoRA needs the fan to be the
    full d_in even though its chunk is narrower (the "rectified" init).
    """
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class AdapterLinear(nn.Module, ABC):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    ``forward(x) = base(x) + scale * delta(dropout(x))`` for any leading batch
    shape. Subclasses define the trainable tensors (named in ``TRAINABLE``),
    ``lora_factors`` (dense A, B with the update equal to B @ A) and, when it is
    faster than the dense route, ``adapter_forward``.
    """

    TRAINABLE: tuple[str, ...] = ()

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.check(base.in_features, base.out_features, cfg)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = cfg.r
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    # ---- per-method pieces -------------------------------------------------
    @staticmethod
    @abstractmethod
    def check(d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        """Raise UsageError if cfg cannot adapt a (d_in -> d_out) linear layer."""

    @staticmethod
    @abstractmethod
    def count_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        """Trainable parameters this method adds to one (d_in -> d_out) layer."""

    @abstractmethod
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense A (R, d_in) and B (d_out, R), scale folded into B: delta_weight = B @ A."""

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_factors()
        return (x @ a.t()) @ b.t()

    # ---- shared behaviour --------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x)
        # An fp32 adapter on a low-precision base (QLoRA's NF4 with bf16 compute) computes in its own precision.
        dtype = getattr(self, self.TRAINABLE[0]).dtype
        return out + self.adapter_forward(h if h.dtype == dtype else h.to(dtype)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        return b @ a

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (for inference); ``unmerge`` undoes it."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.TRAINABLE}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale:g}"
