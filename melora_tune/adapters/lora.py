"""LoRA (Hu et al., 2021): the baseline."""

from __future__ import annotations

import torch
from torch import nn

from melora_tune.adapters.base import AdapterLinear, kaiming_uniform_
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.method import Method
from melora_tune.adapters.registry import register_method
from melora_tune.errors import UsageError


class LoRALinear(AdapterLinear):
    r"""LoRA: :math:`\Delta W = s\,BA`, :math:`A \in R^{r \times d_{in}}`, :math:`B \in R^{d_{out} \times r}`, :math:`s = \alpha / r`.

    A is Kaiming-uniform (a = sqrt 5, as PEFT), B is zero so training starts at
    the base model. Trainable params: r (d_in + d_out).
    """

    TRAINABLE = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__(base, cfg)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, dtype=w.dtype, device=w.device))
        kaiming_uniform_(self.lora_A, fan_in=self.in_features)

    @staticmethod
    def check(d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        if cfg.r > min(d_in, d_out):
            raise UsageError(f"LoRA rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of a {d_in}->{d_out} layer")

    @staticmethod
    def count_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        return cfg.r * (d_in + d_out)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scale

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale


@register_method
class LoRA(Method):
    """LoRA(r): the baseline every other method is compared with."""

    name = "lora"
    label = "LoRA"
    summary = "LoRA (Hu et al., 2021): s B A of rank r"
    hyperparams = ("r",)
    layer = LoRALinear
    marker, color = "s", "#d62728"
