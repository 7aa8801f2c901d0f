"""The adapter configuration: one typed record shared by every method, saved as JSON."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora_tune.errors import UsageError

METHODS = ("lora", "melora", "prolora")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterConfig:
    """What to adapt and how.

    ``r`` is always the rank of one factor pair: the rank of LoRA, the rank of
    *each* MELoRA mini (equivalent rank ``n * r``), the total rank of PRoLoRA
    (``u`` of which are unshared).
    """

    method: str = "melora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    n: int = 1  # MELoRA: number of mini-LoRAs
    u: int = 0  # PRoLoRA: unshared ranks
    m: int = 1  # PRoLoRA: sharing rate of A (copies of the shared chunk along d_in)
    m_b: int | None = None  # PRoLoRA: sharing rate of B; None means "same as m"
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown adapter method {self.method!r}: choose one of {', '.join(METHODS)}")
        if isinstance(self.target_modules, str):
            self.target_modules = [t for t in self.target_modules.split(",") if t]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [t for t in self.modules_to_save.split(",") if t]
        for name in ("r", "n", "u", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"adapter {name} must be an integer, got {value!r}")
        if self.m_b is not None and (isinstance(self.m_b, bool) or not isinstance(self.m_b, int)):
            raise UsageError(f"adapter m_b must be an integer, got {self.m_b!r}")
        if self.r < 1:
            raise UsageError(f"adapter rank r must be >= 1, got {self.r}")
        if self.n < 1:
            raise UsageError(f"MELoRA n (number of minis) must be >= 1, got {self.n}")
        if not 0 <= self.u <= self.r:
            raise UsageError(f"PRoLoRA unshared ranks u must be in [0, r={self.r}], got {self.u}")
        if self.m < 1 or (self.m_b is not None and self.m_b < 1):
            raise UsageError(f"PRoLoRA sharing rates m, m_b must be >= 1, got m={self.m}, m_b={self.m_b}")
        try:
            alpha = math.nan if isinstance(self.alpha, bool) else float(self.alpha)
        except (TypeError, ValueError):
            alpha = math.nan
        if not 0.0 < alpha < math.inf:
            raise UsageError(f"adapter alpha must be a positive finite number (the scale is alpha / r), got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UsageError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UsageError("target_modules is empty: name at least one linear module, e.g. query,value")

    @property
    def sharing_b(self) -> int:
        return self.m if self.m_b is None else self.m_b

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r if self.method == "melora" else self.r

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    def method_params(self) -> dict[str, Any]:
        """The method-specific hyperparameters that matter (for names, logs, tables)."""
        if self.method == "melora":
            return {"n": self.n, "r": self.r}
        if self.method == "prolora":
            return {"r": self.r, "u": self.u, "m": self.m, "m_b": self.sharing_b}
        return {"r": self.r}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in data.items() if k not in known and k != "melora_tune"}
        for key in extra:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown adapter config key {key!r}{hint}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | Path, **extra: Any) -> Path:
        path = Path(directory) / CONFIG_NAME
        payload = self.to_dict()
        if extra:
            payload["melora_tune"] = extra
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "AdapterConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise UsageError(f"no {CONFIG_NAME} in {directory}: point to a folder written by save_adapter")
        return cls.from_dict(json.loads(path.read_text()))
