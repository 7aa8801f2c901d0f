"""A Tune callback that frees the placement groups of Train runs whose controller was killed (a trial ASHA
stopped): see ``melora_tune.trial.placement`` for why Ray leaks them."""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

from melora_tune.trial.placement import reap_orphan_placement_groups

log = logging.getLogger("melora_tune.search")


class PlacementGroupReaper(Callback):
    """Runs the reaper when a trial ends and every few seconds in between."""

    def __init__(self, period_s: float = 3.0) -> None:
        self.period_s = period_s
        self._last = 0.0
        self._broken = False

    def _reap(self) -> None:
        if self._broken:
            return
        self._last = time.monotonic()
        try:
            reap_orphan_placement_groups()
        except Exception as exc:  # noqa: BLE001  (internal Ray API: never take the search down)
            self._broken = True
            log.warning("placement group reaper disabled: %s", exc)

    def on_step(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.period_s:
            self._reap()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap()
