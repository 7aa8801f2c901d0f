"""TPE: Optuna's Tree-structured Parzen Estimator, multivariate over the conditional space (the default)."""

from __future__ import annotations

from melora_tune.search.samplers.registry import Sampler, register_sampler


class TPE(Sampler):
    name = "tpe"
    summary = "Optuna's multivariate TPE over the feasible-only conditional space (random for its first trials)"

    def make(self, space, *, seed, n_startup_trials):
        import optuna  # heavy: the sampler is described and validated without Optuna

        # multivariate + group: TPE models the parameters that occur together (one method's subtree)
        # jointly, which is what a conditional space needs; constant_liar keeps concurrent trials apart.
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True, constant_liar=True
        )

    def phrase(self, space) -> str:
        return "Optuna TPE"


register_sampler(TPE)
