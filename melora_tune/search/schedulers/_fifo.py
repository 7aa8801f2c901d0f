"""FIFO: no early stopping, every trial trains to max_t (what asha.enabled: false means)."""

from __future__ import annotations

from melora_tune.search.schedulers.registry import Scheduler, register_scheduler


class FIFO(Scheduler):
    name = "fifo"
    summary = "no early stopping: every trial trains to training.epochs (same as asha.enabled: false)"
    stops_early = False

    def make(self, settings, max_t):
        from ray.tune.schedulers import FIFOScheduler  # heavy: Ray Tune loads only when a search starts

        return FIFOScheduler()

    def phrase(self, settings, max_t) -> str:
        return "no early stopping"


register_scheduler(FIFO)
