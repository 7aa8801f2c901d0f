"""Hyperband's bracket arithmetic (no Ray: the dry run's line and the scheduler share it)."""

from __future__ import annotations

import math


def hyperband_brackets(max_t: float, grace_period: float, reduction_factor: float, brackets: int = 1) -> int:
    """How many Hyperband brackets fit: s_max + 1 = floor(log_eta(max_t / grace_period)) + 1 (a bracket whose
    first rung would lie past max_t has no rung at all); ``brackets`` > 1 asks for at most that many."""
    fit = int(math.floor(math.log(max_t / grace_period) / math.log(reduction_factor) + 1e-9)) + 1
    return fit if brackets <= 1 else min(brackets, fit)


def hyperband_weights(num_brackets: int, reduction_factor: float) -> list[int]:
    """Trials per bracket in one Hyperband iteration (Li et al. 2018, Algorithm 1), by Ray's bracket index k.

    With S = num_brackets, eta = reduction_factor and Hyperband's s = S - 1 - k (Ray's bracket k has its first
    rung at grace_period * eta^k, so k = 0 stops earliest): n_k = ceil(S / (s + 1) * eta^s). E.g. S = 2,
    eta = 3: n = (3, 2); S = 3, eta = 3: n = (9, 5, 3).
    """
    S = num_brackets
    return [math.ceil(S / (S - k) * reduction_factor ** (S - 1 - k) - 1e-9) for k in range(S)]

