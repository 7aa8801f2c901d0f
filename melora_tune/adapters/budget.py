"""Which adapter configurations fit a trainable-parameter budget.

A configuration is feasible when every targeted layer accepts it (MELoRA's n
divides d_in and d_out, per-mini rank r <= min(d_in, d_out) / n, equivalent
rank <= min(d_in, d_out), PRoLoRA's u <= r and sharing rates <= d) and its
adapter parameters lie in [min_fraction * budget, budget]. The enumeration is
exact over the declared choices: parameters grow with r, so r stops at the
first value over budget, and nothing feasible below it is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import reduce
from typing import Iterable, Sequence

from melora_tune.adapters import AdapterConfig
from melora_tune.adapters.accounting import LinearShape, adapter_params
from melora_tune.errors import UsageError

DEFAULT_SHARING_RATES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Candidate:
    """One feasible configuration and what it costs."""

    method: str
    n: int
    r: int
    u: int
    m: int
    m_b: int
    adapter_params: int
    equivalent_rank: int

    def apply(self, base: AdapterConfig) -> AdapterConfig:
        return replace(base, method=self.method, n=self.n, r=self.r, u=self.u, m=self.m, m_b=self.m_b)

    def to_dict(self) -> dict:
        """The fields that mean something for this method (MELoRA has no u, LoRA no n...)."""
        return {"method": self.method, **self.apply(AdapterConfig()).method_params(),
                "adapter_params": self.adapter_params, "equivalent_rank": self.equivalent_rank}


def common_divisors(shapes: Sequence[LinearShape]) -> list[int]:
    g = reduce(math.gcd, [d for s in shapes for d in (s.d_in, s.d_out)])
    return [k for k in range(1, g + 1) if g % k == 0]


def max_rank(shapes: Sequence[LinearShape], method: str, n: int = 1) -> int:
    """Largest r the layers allow (per mini for MELoRA)."""
    return min(min(s.d_in, s.d_out) for s in shapes) // (n if method == "melora" else 1)


def _choices(declared: Iterable[int] | None, default: Iterable[int]) -> list[int]:
    return sorted(set(default if declared is None else declared))


def min_params(min_fraction: float, budget: int) -> int:
    """ceil(min_fraction * budget) of the fraction as written: 0.56 x 1600 is 896, not float's 896.0000000000001 -> 897."""
    return math.ceil(Fraction(repr(float(min_fraction))) * budget)


def enumerate_feasible(
    shapes: Sequence[LinearShape],
    method: str,
    budget: int | None,
    *,
    min_fraction: float = 0.0,
    n: Iterable[int] | None = None,
    r: Iterable[int] | None = None,
    u: Iterable[int] | None = None,
    m: Iterable[int] | None = None,
    m_b: Iterable[int] | None = None,
    base: AdapterConfig | None = None,
) -> list[Candidate]:
    """Every feasible configuration of ``method`` within the declared choices.

    ``None`` choices mean: n over all common divisors of the layers' dims, r over
    1..max, u over 0..r, m over DEFAULT_SHARING_RATES, m_b tied to m.
    ``budget=None`` drops the upper bound (used to find the smallest config).
    """
    if not shapes:
        raise UsageError("no target layers to budget for")
    if not 0.0 <= min_fraction <= 1.0:
        raise UsageError(f"min_fraction must be in [0, 1], got {min_fraction}")
    if budget is not None and budget < 1:
        raise UsageError(f"budget must be a positive number of parameters, got {budget}")
    base = replace(base or AdapterConfig(), method=method)
    floor = min_params(min_fraction, budget) if budget is not None else 0
    n_list = _choices(n, common_divisors(shapes)) if method == "melora" else [1]
    m_list = _choices(m, DEFAULT_SHARING_RATES) if method == "prolora" else [1]
    tied_b = method == "prolora" and m_b is None
    mb_list = _choices(m_b, DEFAULT_SHARING_RATES) if method == "prolora" and not tied_b else [None]

    out: list[Candidate] = []
    for n_ in n_list:
        if n_ < 1:
            continue
        ceiling = max_rank(shapes, method, n_)
        r_list = _choices(r, range(1, ceiling + 1))
        for r_ in r_list:
            if r_ < 1 or r_ > ceiling:
                continue
            u_list = _choices(u, range(0, r_ + 1)) if method == "prolora" else [0]
            any_valid = any_within = False
            for u_ in (x for x in u_list if 0 <= x <= r_):
                for m_ in m_list:
                    for mb_ in mb_list:
                        cfg = replace(base, n=n_, r=r_, u=u_, m=m_, m_b=(m_ if tied_b else mb_) if method == "prolora" else None)
                        try:
                            params = adapter_params(shapes, cfg)
                        except UsageError:
                            continue
                        any_valid = True
                        if budget is not None and params > budget:
                            continue
                        any_within = True
                        if params >= floor:
                            out.append(Candidate(method, n_, r_, u_, m_, cfg.sharing_b, params, cfg.equivalent_rank))
            # For fixed (n, u, m, m_b) every count grows with r, and the cheapest declared u
            # that is <= r stays the cheapest as r grows; so once the valid configs of one
            # rank are all over budget, those of every larger rank are too.
            if budget is not None and any_valid and not any_within:
                break
    return out


def smallest_config(shapes: Sequence[LinearShape], method: str, **choices) -> Candidate | None:
    """The cheapest feasible configuration within the declared choices (None if none is)."""
    found = enumerate_feasible(shapes, method, None, **choices)
    return min(found, key=lambda c: c.adapter_params) if found else None
