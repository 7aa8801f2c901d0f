"""DoRA (Liu et al., ICML 2024) through PEFT's own layer: a method we do not implement ourselves.

The layer is PEFT's ``lora.Linear`` built with ``LoraConfig(use_dora=True)``;
this module only wraps it in our ``AdapterLinear`` interface (so injection,
saving, checkpoints and the trial loop treat it like any other method),
counts its parameters by building it on the ``meta`` device, and exports it
as a native PEFT DoRA adapter.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from melora_tune.adapters.base import AdapterLinear
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.export import save_peft_adapter
from melora_tune.adapters.inject import adapter_layers
from melora_tune.adapters.method import Method
from melora_tune.adapters.registry import register_method
from melora_tune.errors import UsageError

ADAPTER_NAME = "default"


def _peft_lora_config(cfg: AdapterConfig, **extra):
    from peft import LoraConfig  # heavy: PEFT (pulls transformers)

    return LoraConfig(r=cfg.r, lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout), use_dora=True, **extra)


class DoRALinear(AdapterLinear):
    r"""DoRA: :math:`W' = m \cdot (W + sBA) / \lVert W + sBA \rVert_{row}`, s = alpha / r, m (d_out) trainable.

    The weight is split into a magnitude ``m`` (initialised to the row norms of W) and a
    direction updated by LoRA(r) (A Kaiming-uniform, B zero), so training starts at the
    base model. Trainable params: r (d_in + d_out) + d_out. PEFT computes the forward
    (``peft.tuners.lora.Linear`` with its DoRA variant) and the merge.
    """

    TRAINABLE = ("lora_A", "lora_B", "lora_magnitude")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__(base, cfg)
        from peft.tuners.lora.layer import Linear as PeftLoraLinear  # heavy: PEFT (pulls transformers)

        self.dropout = nn.Identity()  # PEFT's layer applies lora_dropout itself
        self.peft = PeftLoraLinear(base, ADAPTER_NAME, config=_peft_lora_config(cfg), r=cfg.r, lora_alpha=float(cfg.alpha))

    @property
    def lora_A(self) -> nn.Parameter:
        return self.peft.lora_A[ADAPTER_NAME].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.peft.lora_B[ADAPTER_NAME].weight

    @property
    def lora_magnitude(self) -> nn.Parameter:
        return self.peft.lora_magnitude_vector[ADAPTER_NAME].weight

    @staticmethod
    def check(d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        if cfg.r > min(d_in, d_out):
            raise UsageError(f"DoRA rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of a {d_in}->{d_out} layer")

    @staticmethod
    def count_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        return _meta_count(d_in, d_out, cfg.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peft(x)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("DoRA's update rescales W's rows: it is not a product B @ A (export it as PEFT DoRA)")

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """W' - W, read off the layer itself (identity in, bias out) so it is exactly what PEFT computes."""
        was_training = self.peft.training
        self.peft.eval()
        eye = torch.eye(self.in_features, dtype=self.base.weight.dtype, device=self.base.weight.device)
        delta = (self.peft(eye) - self.base(eye)).t()
        self.peft.train(was_training)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.peft.merge()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.peft.unmerge()
            self.merged = False


@lru_cache(maxsize=4096)
def _meta_count(d_in: int, d_out: int, r: int) -> int:
    """The requires_grad parameters of PEFT's DoRA layer on a (d_in -> d_out) linear, built on the meta device."""
    with torch.device("meta"):
        layer = DoRALinear(nn.Linear(d_in, d_out), AdapterConfig(method="dora", r=r, target_modules=["x"]))
    return sum(p.numel() for p in layer.peft.parameters() if p.requires_grad)


@register_method
class DoRA(Method):
    """DoRA(r) from PEFT: LoRA(r) on the direction plus a trainable magnitude per output row."""

    name = "dora"
    label = "DoRA"
    summary = "DoRA (Liu et al., 2024) via PEFT: LoRA(r) on the weight's direction plus a magnitude vector"
    hyperparams = ("r",)
    layer = DoRALinear
    marker, color = "D", "#9467bd"

    def export_peft(self, model, cfg, out_dir, base_model_name_or_path, task_type):
        state = {}
        for name, layer in adapter_layers(model).items():
            prefix = f"base_model.model.{name}"
            state[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"] = layer.lora_A
            state[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"] = layer.lora_B
            state[f"{prefix}.lora_magnitude_vector.{ADAPTER_NAME}.weight"] = layer.lora_magnitude
        save_peft_adapter(model, cfg, out_dir, state, base_model_name_or_path, task_type,
                          lora_kwargs=dict(r=cfg.r, lora_alpha=float(cfg.alpha), use_dora=True))

    def peft_description(self, cfg):
        return f"a native PEFT DoRA adapter (LoraConfig(use_dora=True), r={cfg.r}, lora_alpha={cfg.alpha:g})"
