"""A Tune callback that frees the placement groups of Train runs whose controller was killed (a trial ASHA
stopped): see ``melora_tune.trial.placement`` for why Ray leaks them."""

from __future__ import annotations

import logging

from ray.tune import Callback

from melora_tune.trial.placement import PeriodicReaper

log = logging.getLogger("melora_tune.search")


class PlacementGroupReaper(Callback):
    """Runs the reaper when a trial ends and every few seconds in between."""

    def __init__(self, period_s: float = 3.0) -> None:
        self.reaper = PeriodicReaper(period_s, log)

    def on_step(self, iteration, trials, **info):
        self.reaper.maybe_run()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.reaper.run()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.reaper.run()
