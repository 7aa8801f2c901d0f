"""The grid's Optuna sampler (kept apart from ``_grid``: this module imports Optuna)."""

from __future__ import annotations

import optuna


class GridSampler(optuna.samplers.BruteForceSampler):
    """Optuna's exhaustive sampler over the conditional space, each leaf once (running trials count as taken).

    Its ``after_trial`` calls ``study.stop()`` once the tree is covered, which only works inside
    ``study.optimize``; under Ray the search ends at ``num_samples`` = the grid's size instead.
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None
