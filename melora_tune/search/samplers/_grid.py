"""The full grid: every feasible configuration x space.lr_choices [x alpha, dropout, space.seeds] exactly once."""

from __future__ import annotations

from melora_tune.search.samplers.registry import Sampler, register_sampler


class Grid(Sampler):
    name = "grid"
    summary = ("every feasible configuration x space.lr_choices (x space.seeds) exactly once "
               "(Optuna's BruteForceSampler; num_samples defaults to the grid's size)")
    enumerates = True

    def make(self, space, *, seed, n_startup_trials):
        from melora_tune.search.samplers.brute_force import GridSampler  # heavy: subclasses Optuna's sampler

        return GridSampler(seed=seed)

    def phrase(self, space) -> str:
        return f"the full grid ({space.grid_size()} points)"


register_sampler(Grid)
