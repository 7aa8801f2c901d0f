"""How a sequence classifier turns token states into one vector: the model's own pooler, or a masked mean.

Why this is a setting: all-MiniLM-L6-v2 (the bundled model) was trained by
sentence-transformers with *mean* pooling (its ``1_Pooling/config.json``); the
``pooler`` that ``BertForSequenceClassification`` puts in front of the
classifier is an untrained leftover (tanh(W h_CLS)). Measured on the bundled
Rotten Tomatoes split (see the README, "A recipe that learns"): that pooler
squeezes the spread of the inputs' features about 5.6 times (per-dimension std
over 200 sentences 0.204 for h_CLS, 0.036 after the pooler), so the head
starts from nearly constant features, and trials fell to the majority class.

``pooling``:

* ``model``: the model's own head, unchanged (BERT: pooler on [CLS]).
* ``mean``: the mean of the token states over the attention mask, in place of
  the pooler (BERT-style models, whose classifier reads ``pooler_output``).
* ``cls``: the [CLS] state itself, without the pooler's dense + tanh.
* ``auto``: ``mean``/``cls`` when the checkpoint says it was trained that way
  (a sentence-transformers ``1_Pooling/config.json`` next to the weights) and
  the model has a pooler to replace; otherwise ``model``.

The replacement keeps the model class and every parameter name except the
pooler's, so checkpoints, ZeRO-3 and the PEFT export are unchanged; after
loading an exported PEFT adapter, ``apply_pooling(model, "mean")`` restores the
same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from melora_tune.errors import UsageError

POOLINGS = ("auto", "model", "mean", "cls")


class TokenPooler(nn.Module):
    """Stands in for a BERT-style pooler: ``forward(hidden_states)`` -> (batch, hidden), no parameters.

    The attention mask reaches it through a forward pre-hook on the whole model
    (``apply_pooling``), because the encoder calls its pooler with the hidden
    states alone."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("mean", "cls"):
            raise ValueError(f"TokenPooler mode must be mean or cls, got {mode!r}")
        self.mode = mode
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden_states[:, 0]
        mask = self.mask
        if mask is None or mask.shape[:2] != hidden_states.shape[:2]:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        mask = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def _stash_mask(pooler: TokenPooler):
    def hook(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask")
        if pooler.mask is None and len(args) > 1:
            pooler.mask = args[1]  # positional (input_ids, attention_mask, ...)

    return hook


def _pooler_owner(model: nn.Module) -> nn.Module | None:
    """The encoder module holding a ``pooler`` attribute (``model.bert`` for BERT), or None."""
    for module in model.modules():
        if getattr(module, "pooler", None) is not None and isinstance(module.pooler, nn.Module):
            return module
    return None


def checkpoint_pooling(model_dir: str | Path) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with (mean | cls), or None when it does not say."""
    config = Path(model_dir) / "1_Pooling" / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    return None


def resolve_pooling(pooling: str, model_dir: str | Path | None, model: nn.Module | None = None, *, task_type: str = "seq_cls") -> str:
    """``auto`` made concrete for this checkpoint (model | mean | cls); explicit values are checked."""
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if task_type != "seq_cls":
        return "model"
    has_pooler = model is None or _pooler_owner(model) is not None
    if pooling == "auto":
        trained = checkpoint_pooling(model_dir) if model_dir is not None else None
        return trained if trained is not None and has_pooler else "model"
    if pooling != "model" and not has_pooler:
        raise UsageError(
            f"pooling: {pooling} replaces a BERT-style pooler, and {type(model).__name__} has none "
            "(its classification head pools by itself): set pooling: model"
        )
    return pooling


def apply_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Replace the model's pooler by a ``TokenPooler`` (mean | cls); ``model`` leaves it as it is. In place."""
    if pooling == "model":
        return model
    owner = _pooler_owner(model)
    if owner is None:
        raise UsageError(f"pooling: {pooling} needs a model with a BERT-style pooler; {type(model).__name__} has none: set pooling: model")
    pooler = TokenPooler(pooling)
    owner.pooler = pooler
    model.register_forward_pre_hook(_stash_mask(pooler), with_kwargs=True)
    return model
