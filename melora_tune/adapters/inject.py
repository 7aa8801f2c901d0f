"""Put adapters into a model (PEFT-style suffix matching), freeze the rest, save and load them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from melora_tune.adapters.base import AdapterLinear
from melora_tune.adapters.config import CONFIG_NAME, META_KEY, WEIGHTS_NAME, AdapterConfig
from melora_tune.adapters.pooling import apply_pooling
from melora_tune.errors import UsageError


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the name equals the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last name components of a model's linear layers (what one can target)."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules that the targets select.

    Stricter than PEFT on purpose: every target must select at least one linear
    layer, so a typo ("valu") fails instead of silently adapting fewer layers.
    """
    linears = linear_modules(model)
    unmatched = [t for t in targets if not any(matches(name, t) for name in linears)]
    if unmatched:
        raise UsageError(
            f"target module{'s' if len(unmatched) > 1 else ''} {','.join(unmatched)} "
            f"match{'' if len(unmatched) > 1 else 'es'} no linear layer of "
            f"{type(model).__name__}; its linear layers are named: {', '.join(linear_suffixes(model))}"
        )
    return [name for name in linears if any(matches(name, t) for t in targets)]


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    found = []
    for name in names:
        hits = [m for m, _ in model.named_modules() if m and matches(m, name)]
        if not hits:
            raise UsageError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}")
        found.extend(hits)
    return found


# ---- model introspection: what to adapt and what to train in full when the config does not say ----

# Attention projections to adapt when the config names none, first match wins (PEFT's usual picks).
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, ELECTRA, MiniLM
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT, BART
    ("q_lin", "v_lin"),  # DistilBERT
    ("query_key_value",),  # Falcon, GPT-NeoX, BLOOM
    ("c_attn",),  # GPT-2 (a Conv1D, not nn.Linear: will fail with the list of linear layers)
    ("q", "v"),  # T5
)

# Names transformers gives the task heads of *ForSequenceClassification models (PEFT keeps
# "classifier" and "score" trainable for SEQ_CLS; DistilBERT adds pre_classifier, also new).
HEAD_NAMES: tuple[str, ...] = ("pre_classifier", "classifier", "score", "classification_head", "sequence_summary")


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention projections to adapt when a config names none (PEFT's usual picks, first match wins)."""
    names = list(linear_modules(model))
    for group in DEFAULT_TARGETS:
        if all(any(matches(n, t) for n in names) for t in group):
            return list(group)
    raise UsageError(
        f"no default attention projections found in {type(model).__name__}: set adapter.target_modules "
        f"(its linear layers are named: {', '.join(linear_suffixes(model))})"
    )


def find_head_modules(model: nn.Module, task_type: str, num_labels: int | None = None) -> list[str]:
    """The task head of a sequence classifier (trained with the adapters); [] for causal LM.

    Known head names among the model's top-level children first; otherwise the
    top-level module holding the last linear layer with ``num_labels`` outputs.
    """
    if task_type != "seq_cls":
        return []
    children = [name for name, _ in model.named_children()]
    heads = [name for name in HEAD_NAMES if name in children]
    if heads:
        return heads
    if num_labels:
        last = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.out_features == num_labels:
                last = name
        if last:
            return [last.split(".")[0]]
    raise UsageError(
        f"cannot tell which module of {type(model).__name__} is the classification head: "
        f"set adapter.modules_to_save (its top-level modules: {', '.join(children)})"
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@dataclass
class InjectionReport:
    """What ``inject_adapters`` did; the counts are of tensors with requires_grad."""

    adapted: list[str]
    saved_modules: list[str]
    adapter_params: int
    head_params: int
    equivalent_rank: int
    per_module: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.head_params


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> InjectionReport:
    """Replace every targeted nn.Linear by the cfg's adapter layer, in place.

    Every other parameter is frozen except those of ``cfg.modules_to_save``
    (e.g. a classification head), which stay trainable.
    """
    targets = find_targets(model, cfg.target_modules)
    saved = find_modules_to_save(model, cfg.modules_to_save)
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise UsageError(f"{overlap[0]} is both an adapter target and in modules_to_save: choose one")
    for p in model.parameters():
        p.requires_grad_(False)
    per_module = {}
    for name in targets:
        layer = cfg.spec.make_layer(model.get_submodule(name), cfg)
        _set_submodule(model, name, layer)
        per_module[name] = sum(p.numel() for p in layer.trainable_parameters().values())
    head = 0
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
            head += p.numel()
    return InjectionReport(targets, saved, sum(per_module.values()), head, cfg.equivalent_rank, per_module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, AdapterLinear)}


def adapter_state_dict(model: nn.Module, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """Only what training changed: the adapter tensors and the modules_to_save parameters."""
    state = {}
    for name, layer in adapter_layers(model).items():
        for t, p in layer.trainable_parameters().items():
            state[f"{name}.{t}"] = p.detach()
    for name in find_modules_to_save(model, cfg.modules_to_save):
        for pname, p in model.get_submodule(name).named_parameters():
            state[f"{name}.{pname}"] = p.detach()
    return state


def save_adapter(model: nn.Module, cfg: AdapterConfig, directory: str | Path, **meta) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (adapter and head tensors only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, cfg).items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "method": cfg.method})
    cfg.save(directory, **meta)
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> tuple[AdapterConfig, InjectionReport]:
    """Inject the saved config into a fresh base model and load its tensors (safetensors only); the pooling the
    trial trained with (``adapters.pooling``, saved in the config's provenance) is applied as well."""
    cfg = AdapterConfig.load(directory)
    try:
        pooling = (json.loads((Path(directory) / CONFIG_NAME).read_text()).get(META_KEY) or {}).get("pooling")
    except (OSError, ValueError):
        pooling = None
    if pooling not in (None, "model"):
        apply_pooling(model, pooling)
    report = inject_adapters(model, cfg)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise UsageError(f"no {WEIGHTS_NAME} in {directory}")
    load_adapter_weights(model, cfg, load_file(str(weights)))
    return cfg, report


def load_adapter_weights(model: nn.Module, cfg: AdapterConfig, state: dict[str, torch.Tensor]) -> None:
    expected = adapter_state_dict(model, cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(
            f"adapter weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "was it saved from the same base model and config?"
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            if tensor.shape != state[key].shape:
                raise UsageError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, model wants {tuple(tensor.shape)}")
            tensor.copy_(state[key].to(tensor.dtype))
