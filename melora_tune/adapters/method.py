"""What a method is: the ``Method`` base class a method module subclasses and registers (``adapters.registry``)."""

from __future__ import annotations

import math
from functools import reduce
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from torch import nn

from melora_tune.adapters.accounting import LinearShape
from melora_tune.adapters.base import AdapterLinear
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.export import export_lora_factors
from melora_tune.adapters.hyperparams import HYPERPARAMS, HyperParam


def common_divisors(shapes: Sequence[LinearShape]) -> list[int]:
    g = reduce(math.gcd, [d for s in shapes for d in (s.d_in, s.d_out)])
    return [k for k in range(1, g + 1) if g % k == 0]


def min_dim(shapes: Sequence[LinearShape]) -> int:
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
    # The hyperparameters that are this method's own (each also named in ``hyperparams``): registering the
    # method adds them to the vocabulary (config keys, space.<name>, budget flags, records and table columns).
    declares: ClassVar[tuple[HyperParam, ...]] = ()
    layer: ClassVar[type[AdapterLinear] | None] = None
    marker: ClassVar[str] = "o"  # matplotlib marker of its series
    color: ClassVar[str | None] = None

    # ---- the hyperparameter tree -------------------------------------------------------
    def default_choices(self, name: str, shapes: Sequence[LinearShape], chosen: Mapping[str, int]) -> Iterable[int]:
        """The values of ``name`` to consider when the user declares none (``chosen``: its parents' values):
        r from 1 to ``max_rank``, others what their ``HyperParam.choices`` say."""
        if name == "r":
            return range(1, self.max_rank(shapes, chosen) + 1)
        hp = HYPERPARAMS[name]
        if hp.choices is not None:
            return hp.choices(shapes, chosen)
        raise NotImplementedError(f"{self.name} has no default choices for {name}")

    def max_rank(self, shapes: Sequence[LinearShape], chosen: Mapping[str, int]) -> int:
        return min_dim(shapes)

    def allows(self, name: str, value: int, chosen: Mapping[str, int]) -> bool:
        """Whether a declared value is admissible given its parents (by default: ``HyperParam.at_most``)."""
        bound = HYPERPARAMS[name].at_most
        return bound is None or bound not in chosen or value <= chosen[bound]

    def validate(self, cfg: AdapterConfig) -> None:
        """Cross-field checks of one config, independent of layer shapes (raise ValueError)."""

    # ---- accounting --------------------------------------------------------------------
    def check(self, d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        """Raise UsageError if cfg cannot adapt a (d_in -> d_out) linear layer."""
        self.layer.check(d_in, d_out, cfg)

    def count_params(self, d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        """Trainable parameters this method adds to one (d_in -> d_out) layer."""
        return self.layer.count_params(d_in, d_out, cfg)

    def equivalent_rank(self, cfg: AdapterConfig) -> int:
        return cfg.r

    def values(self, cfg: AdapterConfig) -> dict[str, int]:
        """The hyperparameters that mean something for this method, in order (names, logs, tables);
        a tied one left unset takes its partner's value (m_b = m)."""
        return {k: cfg.value(k) for k in self.hyperparams}

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
    def make_layer(self, base: nn.Linear, cfg: AdapterConfig) -> AdapterLinear:
        return self.layer(base, cfg)

    def export_peft(self, model: nn.Module, cfg: AdapterConfig, out_dir, base_model_name_or_path: str | None,
                    task_type: str) -> None:
        """Write a standard PEFT adapter folder equivalent to the model's adapters."""
        export_lora_factors(model, cfg, out_dir, base_model_name_or_path, task_type)

    def peft_description(self, cfg: AdapterConfig) -> str:
        """What ``export_peft`` writes, in words (the export README)."""
        return f"a standard PEFT LoRA of rank {self.equivalent_rank(cfg)}; the update B @ A is identical"
