"""The adapter configuration: one typed record shared by every method, saved as JSON.

This pydantic model is the single schema of an adapter: the trial config's
``adapter`` section subclasses it (``trial.config.AdapterSection``) and the
search space's fixed ``adapter`` section takes its shared fields. Its integer
hyperparameters are the registered vocabulary (``adapters.hyperparams``): ``r``
is a field (every method has a rank), the others (MELoRA's ``n``, PRoLoRA's ``u``,
``m``, ``m_b``, a plug-in's own) are keys the methods declare, checked here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, field_validator, model_validator

from melora_tune.adapters.hyperparams import HYPERPARAMS, RANK, HyperParam, HyperparamSchema
from melora_tune.adapters.registry import get_method
from melora_tune.errors import StandaloneSchema, UsageError, did_you_mean

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_KEY = "melora_tune"  # provenance saved next to the config (ignored when loading)

def split_list(value: Any) -> Any:
    """'query,value' -> ['query', 'value'] (YAML, CLI and JSON all accept either form)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def check_alpha(value: Any) -> Any:
    """alpha: a positive finite number (the scale is alpha / r); shared by every schema with an alpha."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"adapter alpha must be a positive finite number (the scale is alpha / r), got {value!r}")
    return value


def check_dropout(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"adapter dropout must be in [0, 1), got {value!r}")
    return value


def check_targets(value: Any) -> Any:
    if value is not None and not value:
        raise ValueError("target_modules is empty: name at least one linear module, e.g. query,value")
    return value


class AdapterConfig(StandaloneSchema, HyperparamSchema):
    """What to adapt and how.

    ``r`` is always the rank of one factor pair: the rank of LoRA, the rank of
    *each* MELoRA mini (equivalent rank ``n * r``), the total rank of PRoLoRA
    (``u`` of which are unshared). Every registered hyperparameter is a key
    (``cfg.n``, ``cfg.m_b``...); those a method does not use keep their defaults.
    """

    model_config = ConfigDict(extra="allow")  # the registered hyperparameters (HyperparamSchema checks them)
    hyperparams_after = "dropout"

    method: str = "melora"
    r: int = RANK.default
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = ["query", "value"]
    modules_to_save: list[str] = []

    _split = field_validator("target_modules", "modules_to_save", mode="before")(split_list)
    _alpha = field_validator("alpha")(check_alpha)
    _dropout = field_validator("dropout")(check_dropout)
    _targets = field_validator("target_modules")(check_targets)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        key = str(value).strip().lower() if isinstance(value, str) else value
        get_method(key)
        return key

    @classmethod
    def hyperparam_value(cls, hp: HyperParam, value: Any) -> Any:
        if value is None and hp.default is None:  # a tied one: None means "same as"
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"adapter {hp.name} must be an integer, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "AdapterConfig":
        for name, hp in HYPERPARAMS.items():
            value = getattr(self, name)
            if value is not None and value < hp.minimum:
                raise ValueError(f"{hp.label} must be >= {hp.minimum}, got {value}")
            bound = getattr(self, hp.at_most) if hp.at_most else None
            if bound is not None and value is not None and value > bound:
                raise ValueError(f"{hp.label} must be in [{hp.minimum}, {hp.at_most}]: "
                                 f"{name}={value} must be <= {hp.at_most}={bound}")
        get_method(self.method).validate(self)
        return self

    # ---- derived ---------------------------------------------------------------------
    @property
    def spec(self):
        """The registered ``Method`` of this config."""
        return get_method(self.method)

    def value(self, name: str) -> int:
        """A hyperparameter's value, a tied one left unset resolved to its partner's (m_b = m)."""
        value = getattr(self, name)
        tied = HYPERPARAMS[name].tied_to if name in HYPERPARAMS else None
        return self.value(tied) if value is None and tied else value

    @property
    def equivalent_rank(self) -> int:
        return self.spec.equivalent_rank(self)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    def method_params(self) -> dict[str, Any]:
        """The method-specific hyperparameters that matter (for names, logs, tables)."""
        return self.spec.values(self)

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with changes, validated."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = cls.schema_keys()
        for key in data:
            if key not in known and key != META_KEY:
                raise UsageError(f"unknown adapter config key {key!r}{did_you_mean(str(key), known)}")
        return cls(**{k: v for k, v in data.items() if k != META_KEY})

    def save(self, directory: str | Path, **extra: Any) -> Path:
        path = Path(directory) / CONFIG_NAME
        payload = self.to_dict()
        if extra:
            payload[META_KEY] = extra
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "AdapterConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise UsageError(f"no {CONFIG_NAME} in {directory}: point to a folder written by save_adapter")
        return cls.from_dict(json.loads(path.read_text()))
