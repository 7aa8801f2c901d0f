"""Lossless export of any of our adapters as a standard PEFT LoRA adapter.

Every method's update is a product B @ A (``AdapterLinear.lora_factors``):
MELoRA(n, r) is LoRA of rank n r with block-diagonal A and B, PRoLoRA is LoRA
of rank r with its chunks materialised. The scale is folded into B and PEFT's
``lora_alpha`` is set equal to the rank, so PEFT's own scaling is exactly 1.

PEFT writes the files itself: we build the PEFT model as a skeleton on the
``meta`` device (no memory, no copy of the base weights) and hand
``save_pretrained`` the real tensors, so the folder is whatever this PEFT
version writes and ``PeftModel.from_pretrained`` loads it with no custom code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.inject import adapter_layers, find_modules_to_save, matches

PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def _peft_targets(skeleton: nn.Module, targets: list[str], suffixes: list[str]) -> list[str]:
    """The user's suffixes when PEFT's suffix rule selects exactly our layers, else the full names."""
    selected = {name for name, _ in skeleton.named_modules() if any(matches(name, s) for s in suffixes)}
    return list(suffixes) if selected == set(targets) else sorted(targets)


def export_peft_lora(
    model: nn.Module,
    cfg: AdapterConfig,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str = "seq_cls",
) -> Path:
    """Write the model's adapters as a standard PEFT adapter folder, the way the method declares
    (``Method.export_peft``: a lossless LoRA for LoRA/MELoRA/PRoLoRA, a native adapter for PEFT's own methods)."""
    if not adapter_layers(model):
        raise ValueError("the model has no melora-tune adapter layers to export")
    cfg.spec.export_peft(model, cfg, out_dir, base_model_name_or_path, task_type)
    return Path(out_dir)


@torch.no_grad()
def export_lora_factors(
    model: nn.Module,
    cfg: AdapterConfig,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str = "seq_cls",
) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` of a PEFT LoRA equal to B @ A of every layer."""
    layers = adapter_layers(model)
    factors = {name: layer.lora_factors() for name, layer in layers.items()}
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter layers disagree on rank: {sorted(ranks)}")
    rank = ranks.pop()
    state = {}
    for name, (a, b) in factors.items():
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.default.weight"] = a
        state[f"{prefix}.lora_B.default.weight"] = b
    # PEFT scaling = lora_alpha / r = 1: our scale lives in B
    return save_peft_adapter(model, cfg, out_dir, state, base_model_name_or_path, task_type,
                             lora_kwargs=dict(r=rank, lora_alpha=rank))


@torch.no_grad()
def save_peft_adapter(
    model: nn.Module,
    cfg: AdapterConfig,
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    base_model_name_or_path: str | None,
    task_type: str,
    lora_kwargs: dict,
) -> Path:
    """Save PEFT-named adapter tensors (``base_model.model.<layer>.lora_*.default.*``) plus the
    modules_to_save through a meta-device PEFT skeleton, so the files are what this PEFT version writes."""
    from peft import LoraConfig, get_peft_model  # heavy: PEFT (pulls transformers)

    layers = adapter_layers(model)
    saved = find_modules_to_save(model, cfg.modules_to_save)
    with torch.device("meta"):
        skeleton = type(model)(model.config)
        lora_cfg = LoraConfig(
            lora_dropout=float(cfg.dropout),
            target_modules=_peft_targets(skeleton, list(layers), list(cfg.target_modules)),
            modules_to_save=list(cfg.modules_to_save) or None,
            task_type=PEFT_TASK_TYPES.get(task_type),
            bias="none",
            base_model_name_or_path=base_model_name_or_path,
            **lora_kwargs,
        )
        peft_model = get_peft_model(skeleton, lora_cfg)
    # get_peft_model sets this from the skeleton's config.name_or_path (None when the config has none): the base
    # model the caller names is what PeftModel.from_pretrained should load
    peft_model.peft_config["default"].base_model_name_or_path = (
        str(base_model_name_or_path) if base_model_name_or_path is not None else (model.config.name_or_path or None)
    )
    inner = peft_model.base_model.model
    for name in layers:
        assert isinstance(inner.get_submodule(name).lora_A["default"], nn.Linear)
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    for name in saved:
        for pname, p in model.get_submodule(name).named_parameters():
            state[f"base_model.model.{name}.modules_to_save.default.{pname}"] = p.detach().float().contiguous().cpu()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    return out_dir
