"""Syne Tune's BOHB searcher as an Optuna sampler (kept apart from ``_syne_bohb``: this module imports Optuna).

The model is Syne Tune's own (``syne-tune`` 0.16, ``IndependentMultiFidelitySearcher`` with its ``kde``
searcher: the searcher half of its ``BOHB`` baseline, after Falkner et al. 2018): one multivariate KDE pair
(good / bad configurations, statsmodels' ``KDEMultivariate``) per resource level, and a proposal maximises the
good/bad density ratio of the highest level observed, a third of the proposals drawn at random. The scheduler
half (asynchronous successive halving, one bracket or several) is the space's ``scheduler:`` (``asha`` is Syne
Tune's BOHB default, ``hyperband`` its several-bracket form).

How the two meet:

* **What the model sees.** At every proposal a fresh Syne Tune searcher is built and told every score the
  Optuna study holds, trial by trial in trial order, evaluation by evaluation, the resource level being the
  reported step (``search/searcher.py`` reports each evaluation at its optimizer step, the same steps for every
  trial of a study), as Syne Tune's scheduler tells it each reported result. The study is the only state, so a
  resumed search (Optuna storage) and a replay propose exactly what an uninterrupted run would. Scores are
  negated (Syne Tune's KDE minimises). Only finite scores are ever reported, so a diverged trial counts with the
  scores it had before it diverged and is unobserved at the levels it did not reach (the ``bohb`` sampler, by
  contrast, counts it with the level's lowest score).
* **Which parameters.** Optuna's intersection search space of the study (the parameters every finished trial
  has: within a cell the method's shape names that do not depend on another value, and the learning rate),
  as Optuna's own multivariate samplers do. The space (``search/space.py``) holds categorical choices and a
  float learning rate; a log-scaled float is modelled as its log10 (Syne Tune's KDE maps a float linearly onto
  [0, 1], which would crowd a learning-rate range into its top decade). Parameters outside that space
  (conditional names such as ``melora.r|n=4``, single-valued ones) are drawn by univariate TPE, as the ``gp``
  sampler does.
* **Randomness.** Syne Tune draws its random configurations from numpy's global generator; each proposal
  seeds it from (seed, trial number) and restores it afterwards, so proposals are reproducible and nothing
  else's randomness moves.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import TrialState

# the registry entry (_syne_bohb.SyneBOHB.check) refuses a missing syne-tune or statsmodels, with the install line,
# before this module is imported
import syne_tune.config_space as sp
from syne_tune.optimizer.schedulers.searchers.multi_fidelity_searcher import IndependentMultiFidelitySearcher


class _NonFiniteCandidate(logging.Filter):
    """Drops Syne Tune's "candidate has non finite acquisition function value" (logged on the root logger): a
    candidate outside both KDEs' support has a 0/0 density ratio, and the searcher already skips it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "non finite acquisition function value" not in record.getMessage()


logging.getLogger().addFilter(_NonFiniteCandidate())


def _domain(dist: BaseDistribution):
    """(the Syne Tune domain the KDE models, to-model, from-model) for one distribution of the space: a float
    (log-scaled: modelled as its log10) or a categorical choice."""
    if isinstance(dist, FloatDistribution) and dist.log:
        return (sp.uniform(math.log10(dist.low), math.log10(dist.high)), math.log10,
                lambda v: float(min(max(10.0 ** v, dist.low), dist.high)))
    if isinstance(dist, FloatDistribution):
        return sp.uniform(dist.low, dist.high), float, float
    assert isinstance(dist, CategoricalDistribution), f"the space has no {type(dist).__name__}"
    return sp.choice(list(dist.choices)), (lambda v: v), (lambda v: v)


class SyneTuneBOHBSampler(optuna.samplers.BaseSampler):
    """Optuna sampler whose multivariate proposals come from Syne Tune's BOHB searcher (module docstring)."""

    def __init__(self, *, seed: int, n_startup_trials: int, top_n_percent: int = 15,
                 random_fraction: float = 0.33, num_candidates: int = 64) -> None:
        self.seed = int(seed)
        self.n_startup_trials = int(n_startup_trials)
        self.kde_kwargs = dict(top_n_percent=top_n_percent, random_fraction=random_fraction,
                               num_candidates=num_candidates)
        self._space = IntersectionSearchSpace(include_pruned=True)
        # outside the model's space: univariate TPE (names carry their parents, so it fits a conditional tree)
        self._independent = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)

    def reseed_rng(self) -> None:
        self._independent.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        space = self._space.calculate(study)
        return {name: d for name, d in space.items() if not d.single()}

    def sample_relative(self, study, trial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        domains = {name: _domain(d) for name, d in sorted(search_space.items())}
        config_space = {name: dom for name, (dom, _, _) in domains.items()}
        trials = study._get_trials(deepcopy=False, use_cache=True)
        observed = [t for t in trials if t.number != trial.number and t.intermediate_values
                    and all(name in t.params for name in domains)]
        state = np.random.get_state()
        np.random.seed((self.seed * 1_000_003 + trial.number) % 2**32)
        try:
            with warnings.catch_warnings():
                # statsmodels divides by zero for a categorical the good set holds one value of (a zero bandwidth)
                warnings.simplefilter("ignore", RuntimeWarning)
                searcher = IndependentMultiFidelitySearcher(
                    config_space, searcher="kde", random_seed=(self.seed * 7919 + trial.number) % 2**31,
                    searcher_kwargs={"num_min_data_points": max(len(config_space), self.n_startup_trials),
                                     **self.kde_kwargs})
                for t in observed:
                    config = {name: to(t.params[name]) for name, (_, to, _) in domains.items()}
                    for step, value in sorted(t.intermediate_values.items()):
                        searcher.on_trial_result(t.number, config, -float(value), int(step))
                proposal = searcher.suggest()
        finally:
            np.random.set_state(state)
        if proposal is None:
            return {}
        return {name: back(proposal[name]) for name, (_, _, back) in domains.items()}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._independent.before_trial(study, trial)

    def after_trial(self, study, trial, state: TrialState, values) -> None:
        self._independent.after_trial(study, trial, state, values)


__all__ = ["SyneTuneBOHBSampler"]
