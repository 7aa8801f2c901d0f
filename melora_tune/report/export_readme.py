"""The README.md of an export: what was exported, how sure we are of it, and how to load it with melora-tune or
with PEFT alone."""

from __future__ import annotations

from typing import Any

from melora_tune.adapters.models import causal_lm_overrides, load_config

README = """# Exported adapter: {label}

Best {which} of search `{search}` on dataset `{dataset}`: **{label}**, score {score} ({status}).

{selection}

| | |
|---|---|
| method | {method} |
| hyperparameters | {hparams} |
| adapter parameters | {adapter_params} (equivalent rank {equivalent_rank}) |
| base model | `{model}` ({task_type}) |
| trial | {trial_id} (Optuna trial {optuna_trial}) |
| MLflow run | {run_id} (search parent run {parent_run_id}, tracking URI `{tracking_uri}`) |

The adapter weights are those of {weights_from}.

## Files

- `trial.yaml`: the trial's configuration. Train it again with `melora-tune train trial.yaml`.
- `adapter/`: native melora-tune adapter (`adapter_config.json`, `adapter_model.safetensors`: adapter and
  {head} tensors only).
- `peft/`: the same adapter as a standard PEFT LoRA of rank {equivalent_rank}; the update B @ A is identical,
  so the model's outputs are the same (no melora-tune needed to use it).
- `export.json`: machine-readable provenance.

## Load with melora-tune

```python
import torch
from transformers import {auto_class}
from melora_tune.adapters.inject import load_adapter
from melora_tune.adapters.models import resolve_model

base = {auto_class}.from_pretrained(resolve_model("{model}"){num_labels_arg}, dtype=torch.float32)
cfg, report = load_adapter(base, "adapter")   # injects the {method} layers and loads their weights
model = base.eval()
```

## Load with PEFT

```python
from transformers import {auto_class}
from peft import PeftModel

base = {auto_class}.from_pretrained("{base_path}"{num_labels_arg})
model = PeftModel.from_pretrained(base, "peft").eval()
model = model.merge_and_unload()   # optional: fold the adapter into the weights
```
{peft_pooling}
The tokenizer is the base model's: `AutoTokenizer.from_pretrained("{base_path}")`.
"""


def decoder_override(cfg) -> bool:
    """Whether the trial's causal LM is an encoder loaded with is_decoder=True (what its users must pass too)."""
    if cfg.task_type != "causal_lm":
        return False

    return bool(causal_lm_overrides(load_config(cfg.model)))


def render_readme(info: dict[str, Any]) -> str:
    return README.format(**info)


def peft_pooling(pooling: str) -> str:
    if pooling in (None, "model"):
        return ""
    return (f"\nThe trial's classifier read the *{pooling}*-pooled token states, not the model's own pooler "
            "(`pooling: " + pooling + "`); PEFT does not know that setting, so apply it after loading, or the logits differ:\n\n"
            "```python\nfrom melora_tune.adapters.pooling import apply_pooling\n"
            f"apply_pooling(model, \"{pooling}\")\n```\n")
