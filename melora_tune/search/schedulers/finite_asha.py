"""ASHA as the search runs it (kept apart from ``_asha``: this module imports Ray Tune)."""

from __future__ import annotations

import math

from ray.tune.schedulers import AsyncHyperBandScheduler

METRIC = "score"  # what every trial reports (the runner's and the replay's METRIC)


class FiniteASHA(AsyncHyperBandScheduler):
    """ASHA that ignores non-finite scores (a diverged trial's -inf would turn a rung's cutoff into NaN)."""

    def on_trial_result(self, tune_controller, trial, result):
        if not math.isfinite(result.get(METRIC, math.nan)):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if not math.isfinite((result or {}).get(METRIC, math.nan)):
            self._trial_info.pop(trial.trial_id, None)
            return
        return super().on_trial_complete(tune_controller, trial, result)
