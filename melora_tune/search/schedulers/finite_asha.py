"""ASHA as the search runs it (kept apart from ``_asha``: this module imports Ray Tune)."""

from __future__ import annotations

import math

from ray.tune.schedulers import AsyncHyperBandScheduler

from melora_tune.search.schedulers.brackets import hyperband_brackets, hyperband_weights

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


class HyperbandASHA(FiniteASHA):
    """Asynchronous Hyperband: Ray's ASHA with several brackets, trials dealt to brackets in Hyperband's shares.

    Bracket k is successive halving with rungs at grace_period * eta^(k+j) (Ray's ``_Bracket``); the last bracket
    has a single rung at max_t and never stops a trial early. Ray's ``AsyncHyperBandScheduler`` draws each new
    trial's bracket at random (unseeded ``np.random``, weights e^(rungs - max rungs)); here the i-th trial goes,
    deterministically, to the bracket whose count is furthest below its share w_k = n_k / sum(n) of
    ``hyperband_weights`` (argmax_k (i+1) w_k - count_k, the smallest k on ties: a smooth weighted round robin),
    so every iteration of sum(n) trials fills each bracket with exactly n_k, as Hyperband does, interleaved
    rather than one bracket after another (Li et al. 2020, asynchronous Hyperband).
    """

    def __init__(self, *, max_t, grace_period, reduction_factor, brackets=1, **kwargs):
        count = hyperband_brackets(max_t, grace_period, reduction_factor, brackets)
        super().__init__(max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor,
                         brackets=count, **kwargs)
        weights = hyperband_weights(count, reduction_factor)
        self.shares = [w / sum(weights) for w in weights]
        self.dealt = [0] * count

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)  # checks metric/mode; its random bracket is replaced below
        total = sum(self.dealt) + 1
        k = max(range(len(self.shares)), key=lambda i: (total * self.shares[i] - self.dealt[i], -i))
        self.dealt[k] += 1
        self._trial_info[trial.trial_id] = self._brackets[k]
