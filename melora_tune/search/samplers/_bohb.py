"""BOHB-style: TPE fitted on the largest fidelity with enough results; pair it with the hyperband scheduler."""

from __future__ import annotations

from melora_tune.search.samplers.registry import Sampler, register_sampler


class BOHB(Sampler):
    name = "bohb"
    summary = ("BOHB-style model (Falkner et al. 2018) built from Optuna: multivariate TPE fitted on the largest "
               "epoch with at least n_startup_trials scores; use with scheduler: hyperband")

    def make(self, space, *, seed, n_startup_trials):
        from melora_tune.search.samplers.bohb import BOHBSampler  # heavy: subclasses Optuna's sampler

        return BOHBSampler(seed=seed, n_startup_trials=n_startup_trials)

    def phrase(self, space) -> str:
        return "BOHB-style TPE (fitted on the largest epoch with enough results)"


register_sampler(BOHB)
