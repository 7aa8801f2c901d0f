"""The configuration of one trial: model, task, adapter, training and resources.

Loaded from YAML (``TrialConfig.from_yaml``), changed with flat ``key=value``
overrides (``apply_overrides``: dotted ``adapter.r=2`` or short aliases
``r=2``), and shipped to Ray workers as a plain dict (``to_dict``/``from_dict``).
Every mistake a user can make here becomes a one-line ``UsageError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from melora_tune.adapters import HYPERPARAMS, get_method
from melora_tune.adapters.config import AdapterConfig
from melora_tune.data.spec import TaskSpec
from melora_tune.errors import Schema, UsageError, describe_validation_error, did_you_mean

# The key of a trial's config in the dicts Ray passes around: a Tune param_space (the base TrialConfig dict of a
# search, plain JSON: Tune writes params.json) and a Ray Train train_loop_config (the PreparedTrial).
TRIAL_KEY = "trial"


class TaskSection(TaskSpec):
    """The data layer's ``TaskSpec`` as the trial config's ``task`` section (see there for the fields)."""

    __init__ = BaseModel.__init__  # nested: errors keep their location (task.seed)


class AdapterSection(AdapterConfig):
    """``AdapterConfig`` (the one adapter schema) with target_modules/modules_to_save None meaning
    "pick for this model" (``melora_tune.trial.prepare_trial`` resolves them)."""

    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None

    __init__ = BaseModel.__init__  # nested: errors keep their location (adapter.r)

    def adapter_config(self) -> AdapterConfig:
        """The ``AdapterConfig``; target_modules/modules_to_save must be resolved first."""
        if self.target_modules is None or self.modules_to_save is None:
            raise ValueError("resolve target_modules and modules_to_save first (melora_tune.trial.prepare_trial)")
        return AdapterConfig(**self.model_dump())


class TrainingSection(Schema):
    epochs: int = Field(2, ge=1)
    lr: float = Field(5e-4, gt=0)
    # The classification head's own rate (modules_to_save); None: the same as lr. See the README's
    # "A recipe that learns" for what was measured.
    head_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    micro_batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(128, ge=4)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    # ZeRO-3 only: keep the partitioned parameters (frozen base weights too) in CPU memory between uses
    # (DeepSpeed's offload_param); a GPU then holds little more than the layer being computed.
    offload_params: bool = False
    # Recompute each layer's activations in backward instead of keeping them: activation memory falls to the
    # layer inputs plus one layer's working set, for about a third more compute.
    gradient_checkpointing: bool = False
    # Load the frozen base model in 4-bit NF4 (bitsandbytes, QLoRA-style): 0.5 bytes a weight plus one fp32
    # absmax per block of 64 for the transformer's linear layers; embeddings, norms and heads stay 16-bit.
    quantization: Literal["none", "nf4"] = "none"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every_steps: int | None = Field(None, ge=1)  # None: evaluate after every epoch
    seed: int = 0
    keep_checkpoints: int = Field(2, ge=1)
    # Score the final model once on the task's test split (test_* metrics, test_score). Only confirmation
    # trials set it: a search's trials never load the test split, so selection cannot see it.
    score_test: bool = False
    # Also score the test split at every evaluation, not only the final one (implies score_test). Only a
    # search space's record_test sets it: recording a tabulated benchmark, where nothing is selected.
    test_every_eval: bool = False
    debug_inject_nan_at_step: int | None = Field(None, ge=1)  # test knob: the loss of this step becomes NaN

    @model_validator(mode="before")
    @classmethod
    def _every_eval_scores_test(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("test_every_eval"):
            data = {**data, "score_test": True}
        return data


class ResourcesSection(Schema):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # GPU share of each worker when use_gpu: 0.5 packs two trials' workers on a GPU. Ray only counts it;
    # it does not isolate GPU memory, so size fractions by measured peak memory.
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    # Restarts after a worker error or a lost node, each from the last checkpoint: Train's FailureConfig with
    # several workers; with one (trained in process) run_trial's own loop, or in a search Tune's FailureConfig.
    # A diverged loss is a result, not a failure, and is never retried.
    max_failures: int = Field(2, ge=0)
    # Memory of one GPU in GiB (a "24 GB" card is 24), what the memory check compares a trial's estimate with.
    # None: measure the driver's GPU (NVML, else torch.cuda) when CUDA is available there; on a driver without
    # CUDA a GPU trial's fit cannot be checked, and the dry run says so instead of refusing.
    gpu_memory_gb: float | None = Field(None, gt=0)


class TrialConfig(Schema):
    model: str = "minilm"
    task_type: Literal["seq_cls", "causal_lm"] = "seq_cls"
    # What the classifier reads (melora_tune.adapters.pooling): auto | model | mean | cls.
    pooling: Literal["auto", "model", "mean", "cls"] = "auto"
    task: TaskSection = Field(default_factory=TaskSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "trial config") -> "TrialConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a mapping of sections (model, task, adapter, training, resources), got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise UsageError(f"{source}: {describe_validation_error(err, cls)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrialConfig":
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"trial config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()
            raise UsageError(f"{path} is not valid YAML: {' '.join(first[:2])}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: list[str] | dict[str, Any] | None) -> "TrialConfig":
        return apply_overrides(self, overrides)

    @classmethod
    def from_sampled(cls, base: dict[str, Any], sampled: dict[str, Any]) -> "TrialConfig":
        """A search's base config dict with the sampled values (method, its hyperparameters, alpha, dropout, lr)
        merged in, validated once: the one place a search's choices enter a trial. Hyperparameters the sampled
        method does not use go back to their defaults, so two trials of one configuration have equal configs
        whatever else the space holds."""
        data = {**base, "adapter": dict(base.get("adapter") or {}), "training": dict(base.get("training") or {})}
        adapter = data["adapter"]
        for key in ("method", *HYPERPARAMS, "alpha", "dropout"):
            if key in sampled:
                adapter[key] = sampled[key]
        uses = get_method(adapter["method"]).hyperparams
        for key in HYPERPARAMS:
            if key not in uses:
                adapter[key] = HYPERPARAMS[key].default
        if "lr" in sampled:
            data["training"]["lr"] = float(sampled["lr"])
        if sampled.get("seed") is not None:  # a grid's space.seeds
            data["training"]["seed"] = int(sampled["seed"])
        return cls.from_dict(data, source="sampled trial")

    # ---- derived -------------------------------------------------------------
    def task_spec(self) -> TaskSpec:
        return self.task

    def precision_on(self, on_gpu: bool) -> str:
        if self.training.precision == "auto":
            return "bf16" if on_gpu else "fp32"
        return self.training.precision


# ---- error messages ----------------------------------------------------------

SECTIONS: dict[str, type[BaseModel]] = {
    "task": TaskSection,
    "adapter": AdapterSection,
    "training": TrainingSection,
    "resources": ResourcesSection,
}
TOP_LEVEL = ("model", "task_type", "pooling")


# ---- flat key=value overrides -------------------------------------------------

def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for section, model in SECTIONS.items():
        for name in model.schema_keys():
            out.setdefault(name, f"{section}.{name}")
    # "seed" means the training seed (the task's split seed stays task.seed); "name" the task name.
    out["seed"] = "training.seed"
    out["name"] = "task.name"
    out["batch_size"] = "training.micro_batch_size"
    out["gradient_accumulation_steps"] = "training.grad_accum"
    out["learning_rate"] = "training.lr"
    out["zero"] = "training.zero_stage"
    out["workers"] = "resources.num_workers"
    return out


ALIASES: dict[str, str] = _aliases()


def all_keys() -> list[str]:
    dotted = [f"{s}.{f}" for s, m in SECTIONS.items() for f in m.schema_keys()]
    return [*TOP_LEVEL, *dotted, *ALIASES]


def resolve_key(key: str) -> tuple[str, ...]:
    """'r' -> ('adapter', 'r'); 'training.lr' -> ('training', 'lr'); unknown -> UsageError with a suggestion."""
    key = key.strip()
    if key in TOP_LEVEL:
        return (key,)
    if key in ALIASES:
        return tuple(ALIASES[key].split("."))
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in SECTIONS and parts[1] in SECTIONS[parts[0]].schema_keys():
        return tuple(parts)
    raise UsageError(f"unknown setting {key!r}{did_you_mean(key, all_keys(), prefix=False)}: use a dotted key like adapter.r or training.lr, or a short one like r, lr, epochs")


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_value(text: str) -> Any:
    """YAML scalars (2, 5e-4, true, null, [a, b]); anything else stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
    return value


def parse_overrides(items: list[str] | None) -> dict[tuple[str, ...], Any]:
    """['method=melora', 'n=4', 'training.lr=5e-4'] -> {('adapter','method'): 'melora', ...}."""
    out: dict[tuple[str, ...], Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r} (e.g. --set method=melora n=4 r=2 lr=5e-4)")
        out[resolve_key(key)] = parse_value(raw.strip())
    return out


def apply_overrides(cfg: TrialConfig, overrides: list[str] | dict[str, Any] | None) -> TrialConfig:
    """A new TrialConfig with the overrides applied (list of 'k=v' strings or a {key: value} dict)."""
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        parsed = {resolve_key(k): v for k, v in overrides.items()}
    else:
        parsed = parse_overrides(list(overrides))
    data = cfg.to_dict()
    for path, value in parsed.items():
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return TrialConfig.from_dict(data, source="--set")


def load_trial_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrialConfig:
    cfg = TrialConfig.from_yaml(path) if path is not None else TrialConfig()
    return apply_overrides(cfg, overrides)
