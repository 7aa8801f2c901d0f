"""Random search: every feasible configuration equally likely at each draw. The default sampler (``DEFAULT`` in
``registry.py``: no model-based sampler got within half a point sooner on the benchmark tables)."""

from __future__ import annotations

from melora_tune.search.samplers.registry import Sampler, register_sampler


class Random(Sampler):
    name = "random"
    summary = "random search over the feasible-only conditional space (as good as any on the benchmark tables)"

    def make(self, space, *, seed, n_startup_trials):
        import optuna  # heavy: the sampler is described and validated without Optuna

        return optuna.samplers.RandomSampler(seed=seed)

    def phrase(self, space) -> str:
        return "random search"


register_sampler(Random)
