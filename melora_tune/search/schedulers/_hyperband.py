"""Hyperband: asynchronous successive halving in several brackets, from aggressive to none (Li et al.)."""

from __future__ import annotations

from melora_tune.search.schedulers.brackets import hyperband_brackets
from melora_tune.search.schedulers.registry import Scheduler, register_scheduler


class Hyperband(Scheduler):
    name = "hyperband"
    summary = ("asynchronous Hyperband: ASHA in several brackets (bracket k's first rung at grace_period x "
               "reduction_factor^k, the last never stops early), trials dealt in Hyperband's shares; "
               "asha.brackets: 1 means every bracket that fits")

    def make(self, settings, max_t):
        from melora_tune.search.schedulers.finite_asha import HyperbandASHA  # heavy: subclasses Ray Tune's ASHA

        return HyperbandASHA(
            time_attr=settings.time_attr,
            max_t=max_t,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
            brackets=settings.brackets,
            stop_last_trials=False,  # as asha: a trial at max_t ends by itself
        )

    def phrase(self, settings, max_t) -> str:
        count = hyperband_brackets(max_t, settings.grace_period, settings.reduction_factor, settings.brackets)
        return (f"Hyperband on {settings.time_attr} ({count} bracket{'s' if count > 1 else ''}, grace "
                f"{settings.grace_period}, reduction {settings.reduction_factor:g}, max {max_t})")


register_scheduler(Hyperband)
