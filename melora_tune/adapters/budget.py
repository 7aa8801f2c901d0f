"""Which adapter configurations fit a trainable-parameter budget.

A configuration is feasible when every targeted layer accepts it (the method's
``check``: MELoRA's n divides d_in and d_out, per-mini rank r <= min(d_in,
d_out) / n, PRoLoRA's u <= r and sharing rates <= d, ...) and its adapter
parameters lie in [min_fraction * budget, budget]. The enumeration walks each
method's hyperparameters in the order the method declares them and is exact
over the declared choices: for a hyperparameter that only adds parameters as it
grows (``HyperParam.grows_params``, e.g. r), the walk stops at the first value
whose whole subtree is over budget, and nothing feasible below it is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Sequence

from melora_tune.adapters.accounting import LinearShape, adapter_params
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.hyperparams import HYPERPARAMS
from melora_tune.adapters.registry import get_method
from melora_tune.errors import UsageError


@dataclass(frozen=True)
class Candidate:
    """One feasible configuration and what it costs.

    ``values`` holds the method's hyperparameters in its declared order (tied ones
    resolved); ``c.n``, ``c.u``... read a value, or the default of a hyperparameter
    the method does not use (LoRA's n is 1).
    """

    method: str
    values: tuple[tuple[str, int], ...]
    adapter_params: int
    equivalent_rank: int

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in HYPERPARAMS:
            raise AttributeError(name)
        values = dict(self.values)
        if name in values:
            return values[name]
        tied = HYPERPARAMS[name].tied_to
        if tied:
            return getattr(self, tied)
        return HYPERPARAMS[name].default

    @property
    def key(self) -> tuple:
        """(method, *every hyperparameter of the vocabulary): one identity across methods."""
        return (self.method, *(getattr(self, k) for k in HYPERPARAMS))

    def apply(self, base: AdapterConfig) -> AdapterConfig:
        return base.replace(method=self.method, **dict(self.values))

    def to_dict(self) -> dict:
        """The fields that mean something for this method (MELoRA has no u, LoRA no n...)."""
        return {"method": self.method, **dict(self.values), "adapter_params": self.adapter_params,
                "equivalent_rank": self.equivalent_rank}


def budget_floor(min_fraction: float, budget: int) -> int:
    """ceil(min_fraction * budget) in exact decimal arithmetic: 0.56 * 1600 is 896, not 897 as in floating point."""
    return math.ceil(Fraction(str(min_fraction)) * budget)


def enumerate_feasible(
    shapes: Sequence[LinearShape],
    method: str,
    budget: int | None,
    *,
    min_fraction: float = 0.0,
    base: AdapterConfig | None = None,
    **choices: Iterable[int] | None,
) -> list[Candidate]:
    """Every feasible configuration of ``method`` within the declared choices (``r=[1, 2]``, ``n=None``...).

    ``None`` (or no) choices mean the method's defaults (``Method.default_choices``): n over all
    common divisors of the layers' dims, r over 1..max, u over 0..r, m over PRoLoRA's sharing
    rates, m_b tied to m.
    ``budget=None`` drops the upper bound (used to find the smallest config).
    """
    if not shapes:
        raise UsageError("no target layers to budget for")
    if not 0.0 <= min_fraction <= 1.0:
        raise UsageError(f"min_fraction must be in [0, 1], got {min_fraction}")
    if budget is not None and budget < 1:
        raise UsageError(f"budget must be a positive number of parameters, got {budget}")
    spec = get_method(method)
    stray = [k for k, v in choices.items() if k not in HYPERPARAMS]
    if stray:
        raise UsageError(f"unknown hyperparameter {stray[0]!r}: known ones are {', '.join(HYPERPARAMS)}")
    base = (base or AdapterConfig()).replace(method=method)
    floor = budget_floor(min_fraction, budget) if budget is not None else 0
    tied = {k: HYPERPARAMS[k].tied_to for k in spec.hyperparams if HYPERPARAMS[k].tied_to and choices.get(k) is None}
    levels = [k for k in spec.hyperparams if k not in tied]
    out: list[Candidate] = []

    def leaf(chosen: dict[str, int]) -> tuple[bool, bool]:
        values = {k: chosen[tied[k]] if k in tied else chosen[k] for k in spec.hyperparams}
        cfg = base.model_copy(update={**values, **{k: None for k in tied}})
        try:
            params = adapter_params(shapes, cfg)
        except UsageError:
            return False, False
        if budget is not None and params > budget:
            return True, False
        if params >= floor:
            out.append(Candidate(method, tuple(values.items()), params, spec.equivalent_rank(cfg)))
        return True, True

    def walk(depth: int, chosen: dict[str, int]) -> tuple[bool, bool]:
        if depth == len(levels):
            return leaf(chosen)
        name = levels[depth]
        hp = HYPERPARAMS[name]
        declared = choices.get(name)
        options = sorted(set(spec.default_choices(name, shapes, chosen) if declared is None else declared))
        any_valid = any_within = False
        for value in options:
            if value < hp.minimum or not spec.allows(name, value, chosen):
                continue
            valid, within = walk(depth + 1, {**chosen, name: value})
            any_valid |= valid
            any_within |= within
            # Every count grows with this value (the rest fixed), and the cheapest completion of a larger
            # value costs at least that of this one: once this subtree is all over budget, larger ones are too.
            if hp.grows_params and budget is not None and valid and not within:
                break
        return any_valid, any_within

    walk(0, {})
    return out


def smallest_config(shapes: Sequence[LinearShape], method: str, **choices) -> Candidate | None:
    """The cheapest feasible configuration within the declared choices (None if none is)."""
    found = enumerate_feasible(shapes, method, None, **choices)
    return min(found, key=lambda c: c.adapter_params) if found else None
