"""Random search: every feasible configuration equally likely at each draw (a baseline)."""

from __future__ import annotations

from melora_tune.search.samplers.registry import Sampler, register_sampler


class Random(Sampler):
    name = "random"
    summary = "random search over the feasible-only conditional space (a baseline)"

    def make(self, space, *, seed, n_startup_trials):
        import optuna  # heavy: the sampler is described and validated without Optuna

        return optuna.samplers.RandomSampler(seed=seed)

    def phrase(self, space) -> str:
        return "random search"


register_sampler(Random)
