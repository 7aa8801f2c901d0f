"""The BOHB-style sampler (kept apart from ``_bohb``: this module imports Optuna)."""

from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


class _FidelityView:
    """A study as BOHB's model sees it: trials' scores at one fidelity, told as COMPLETE; everything else of the
    real study (storage, directions, id) passes through."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study = study
        self._trials = trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return list(self._trials)


def fidelity_view(trials: list[FrozenTrial], min_points: int) -> tuple[float | None, list[FrozenTrial]]:
    """(b, the trials as BOHB's model sees them) for Falkner et al.'s (2018) rule: the model is fitted on the
    largest fidelity b (a reported step) at which at least ``min_points`` trials have a score.

    At b, a trial with a score there becomes COMPLETE with that score; a diverged trial (constraint
    ``diverged`` > 0) becomes COMPLETE with the lowest score at b and keeps its violated constraint (TPE puts
    it below every feasible trial); RUNNING trials stay (TPE's constant liar); every other trial (stopped
    before b, failed) is left out, as BOHB leaves out what it has not observed at b. With no such b
    (b = None) the trials are returned as they are (TPE's start-up, or too few results yet).
    """
    counts: dict[float, int] = {}
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            for step in t.intermediate_values:
                counts[step] = counts.get(step, 0) + 1
    eligible = [step for step, n in counts.items() if n >= min_points]
    if not eligible:
        return None, trials
    b = max(eligible)
    floor = min(t.intermediate_values[b] for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and b in t.intermediate_values)
    out = []
    for t in trials:
        if t.state == TrialState.RUNNING:
            out.append(t)
            continue
        diverged = t.state == TrialState.PRUNED and t.constraints.get("diverged", 0) > 0
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or (b not in t.intermediate_values
                                                                       and not diverged):
            continue
        seen = copy.copy(t)
        seen.state = TrialState.COMPLETE
        seen.value = float(t.intermediate_values.get(b, floor))
        out.append(seen)
    return b, out


class BOHBSampler(optuna.samplers.BaseSampler):
    """Optuna's multivariate TPE fitted, at every proposal, on the largest fidelity with enough scores
    (``fidelity_view``): the model half of BOHB (Falkner et al. 2018, who use a KDE close to TPE); the
    Hyperband half is the scheduler (``hyperband``). Every call of the inner TPE sees the fidelity view."""

    def __init__(self, *, seed: int, n_startup_trials: int, min_points: int | None = None) -> None:
        self._tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True,
                                               group=True, constant_liar=True)
        self.min_points = max(2, min_points if min_points is not None else n_startup_trials)

    def _view(self, study: optuna.Study) -> _FidelityView:
        _, trials = fidelity_view(study._get_trials(deepcopy=False, use_cache=False), self.min_points)
        return _FidelityView(study, trials)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._tpe.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
