"""The method registry: every adapter method declares everything about itself in one place.

A method is one module under ``melora_tune/adapters/`` that defines a ``Method``
subclass and calls ``register_method`` on it (as PEFT's ``register_peft_method``
does). Everything else derives from the registry: the budget enumerator
(``adapters.budget``), the conditional Optuna space (``search.space``), the YAML
and CLI validation and their "did you mean", the MLflow params, progress lines,
report columns, plots and the PEFT export. Nothing outside a method's module
names a method.

The hyperparameter vocabulary is the integer fields of ``AdapterConfig``
(``r``, ``n``, ``u``, ``m``, ``m_b``): a method declares which of them it uses,
in the order a conditional space asks for them (parents first), with their
default choices given the layer shapes and the values already chosen. A method
that needs a new integer hyperparameter adds one field to ``AdapterConfig`` and
one ``HyperParam`` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from melora_tune.errors import UsageError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from melora_tune.adapters.accounting import LinearShape
    from melora_tune.adapters.base import AdapterLinear
    from melora_tune.adapters.config import AdapterConfig


@dataclass(frozen=True)
class HyperParam:
    """One integer hyperparameter of the shared vocabulary (a field of ``AdapterConfig``)."""

    name: str
    help: str  # what it means, for CLI help and YAML docs
    minimum: int = 1
    # Trainable params never decrease as it grows (all else fixed): the enumerator stops at the first value
    # whose whole subtree is over budget.
    grows_params: bool = False
    # When the user declares no choices for it, it equals this other hyperparameter and is not searched.
    tied_to: str | None = None
    at_most: str | None = None  # its value never exceeds this other hyperparameter's (PRoLoRA's u <= r)


HYPERPARAMS: dict[str, HyperParam] = {
    hp.name: hp
    for hp in (
        HyperParam("n", "MELoRA: number of mini-LoRAs", 1),
        HyperParam("r", "rank (per mini for MELoRA)", 1, grows_params=True),
        HyperParam("u", "PRoLoRA: unshared ranks", 0, at_most="r"),
        HyperParam("m", "PRoLoRA: sharing rate of A", 1),
        HyperParam("m_b", "PRoLoRA: sharing rate of B (default: tied to m)", 1, tied_to="m"),
    )
}

DEFAULT_SHARING_RATES = (1, 2, 4, 8, 16, 32, 64)


def common_divisors(shapes: Sequence["LinearShape"]) -> list[int]:
    g = reduce(math.gcd, [d for s in shapes for d in (s.d_in, s.d_out)])
    return [k for k in range(1, g + 1) if g % k == 0]


def min_dim(shapes: Sequence["LinearShape"]) -> int:
    return min(min(s.d_in, s.d_out) for s in shapes)


class Method:
    """What a method is. Subclass, set the class attributes, override what differs, ``register_method``.

    The defaults describe LoRA-like methods: hyperparameter ``r`` up to min(d_in, d_out),
    equivalent rank r, an ``AdapterLinear`` layer class, and a lossless PEFT LoRA export
    through the layer's ``lora_factors``.
    """

    name: ClassVar[str]
    label: ClassVar[str]  # for tables, plots and prose: "MELoRA"
    summary: ClassVar[str] = ""  # one line for --help and the README
    hyperparams: ClassVar[tuple[str, ...]] = ("r",)  # searched in this order (parents first)
    layer: ClassVar[type["AdapterLinear"] | None] = None
    marker: ClassVar[str] = "o"  # matplotlib marker of its series
    color: ClassVar[str | None] = None

    # ---- the hyperparameter tree -------------------------------------------------------
    def default_choices(self, name: str, shapes: Sequence["LinearShape"], chosen: Mapping[str, int]) -> Iterable[int]:
        """The values of ``name`` to consider when the user declares none (``chosen``: its parents' values)."""
        if name == "r":
            return range(1, self.max_rank(shapes, chosen) + 1)
        raise NotImplementedError(f"{self.name} has no default choices for {name}")

    def max_rank(self, shapes: Sequence["LinearShape"], chosen: Mapping[str, int]) -> int:
        return min_dim(shapes)

    def allows(self, name: str, value: int, chosen: Mapping[str, int]) -> bool:
        """Whether a declared value is admissible given its parents (by default: ``HyperParam.at_most``)."""
        bound = HYPERPARAMS[name].at_most
        return bound is None or bound not in chosen or value <= chosen[bound]

    def validate(self, cfg: "AdapterConfig") -> None:
        """Cross-field checks of one config, independent of layer shapes (raise ValueError)."""

    # ---- accounting --------------------------------------------------------------------
    def check(self, d_in: int, d_out: int, cfg: "AdapterConfig") -> None:
        """Raise UsageError if cfg cannot adapt a (d_in -> d_out) linear layer."""
        self.layer.check(d_in, d_out, cfg)

    def count_params(self, d_in: int, d_out: int, cfg: "AdapterConfig") -> int:
        """Trainable parameters this method adds to one (d_in -> d_out) layer."""
        return self.layer.count_params(d_in, d_out, cfg)

    def equivalent_rank(self, cfg: "AdapterConfig") -> int:
        return cfg.r

    def values(self, cfg: "AdapterConfig") -> dict[str, int]:
        """The hyperparameters that mean something for this method, in order (names, logs, tables)."""
        out = {k: getattr(cfg, k) for k in self.hyperparams}
        for k in out:  # a tied hyperparameter left unset (None) takes its partner's value: m_b = m
            if out[k] is None and HYPERPARAMS[k].tied_to:
                out[k] = getattr(cfg, HYPERPARAMS[k].tied_to)
        return out

    def describe(self, hp: Mapping[str, Any]) -> str:
        """'melora n=4 r=2': the method and its hyperparameters (tied ones only when they differ)."""
        parts = [self.name]
        for key in self.hyperparams:
            tied = HYPERPARAMS[key].tied_to
            if tied and hp.get(key) in (None, hp.get(tied)):
                continue
            parts.append(f"{key}={hp.get(key)}")
        return " ".join(parts)

    # ---- the layer and its export ------------------------------------------------------
    def make_layer(self, base: "nn.Linear", cfg: "AdapterConfig") -> "AdapterLinear":
        return self.layer(base, cfg)

    def export_peft(self, model: "nn.Module", cfg: "AdapterConfig", out_dir, base_model_name_or_path: str | None,
                    task_type: str) -> None:
        """Write a standard PEFT adapter folder equivalent to the model's adapters."""
        from melora_tune.adapters.export import export_lora_factors

        export_lora_factors(model, cfg, out_dir, base_model_name_or_path, task_type)

    def peft_description(self, cfg: "AdapterConfig") -> str:
        """What ``export_peft`` writes, in words (the export README)."""
        return f"a standard PEFT LoRA of rank {self.equivalent_rank(cfg)}; the update B @ A is identical"


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method | type[Method]) -> Method:
    """Add a method (an instance or a class); usable as a class decorator. Re-registering a name replaces it."""
    instance = method() if isinstance(method, type) else method
    unknown = [k for k in instance.hyperparams if k not in HYPERPARAMS]
    if unknown:
        raise ValueError(f"method {instance.name}: unknown hyperparameter {unknown[0]!r}; known: {', '.join(HYPERPARAMS)}")
    _REGISTRY[instance.name] = instance
    return method


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method (UsageError with the closest name otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown adapter method {name!r}{did_you_mean(str(name), list(_REGISTRY))}: "
                         f"choose one of {', '.join(_REGISTRY)}") from None


def all_methods() -> list[Method]:
    return list(_REGISTRY.values())


def owners(hyperparam: str) -> tuple[str, ...]:
    """The methods that use a hyperparameter."""
    return tuple(m.name for m in _REGISTRY.values() if hyperparam in m.hyperparams)


def describe(hp: Mapping[str, Any]) -> str:
    """'melora n=4 r=2 lr=1.2e-3': what a trial is, in a few words (run names, tables, progress)."""
    method = _REGISTRY.get(hp.get("method"))
    text = method.describe(hp) if method else str(hp.get("method", "?"))
    if hp.get("lr") is not None:
        text += f" lr={format_lr(hp['lr'])}"
    return text


def format_lr(lr: float) -> str:
    if lr is None or not math.isfinite(lr):
        return "?"  # a trial that never started has no lr
    mantissa, exp = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"
