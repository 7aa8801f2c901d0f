"""ASHA (asynchronous successive halving): the default; stops a trial that falls behind its rung's peers."""

from __future__ import annotations

from melora_tune.search.schedulers.registry import Scheduler, register_scheduler


class ASHA(Scheduler):
    name = "asha"
    summary = ("asynchronous successive halving: at each rung (grace_period x reduction_factor^k) keep the top "
               "1/reduction_factor (asha.* settings)")

    def make(self, settings, max_t):
        from melora_tune.search.schedulers.finite_asha import FiniteASHA  # heavy: subclasses Ray Tune's ASHA

        return FiniteASHA(
            time_attr=settings.time_attr,
            max_t=max_t,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
            brackets=settings.brackets,
            # a trial at max_t ends by itself: stopping it would kill its Train run before it shuts down cleanly
            stop_last_trials=False,
        )

    def phrase(self, settings, max_t) -> str:
        return (f"ASHA on {settings.time_attr} (grace {settings.grace_period}, reduction "
                f"{settings.reduction_factor:g}, max {max_t})")


register_scheduler(ASHA)
