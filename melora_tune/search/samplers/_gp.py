"""GP: Optuna's Gaussian-process Bayesian optimisation (``GPSampler``), with TPE for the conditional parameters.

Optuna's ``GPSampler`` models only the parameters every completed trial has (its intersection search space):
over our define-by-run tree that is ``method``, ``lr`` (and ``alpha``/``dropout`` when they are choices). A
method's own hyperparameters (``melora.n``, ``melora.r|n=4``, ...) exist only in that method's trials, so
``GPSampler`` hands them to its ``independent_sampler``: Optuna's default there is random, which would leave
the shape unmodelled. Here it is univariate TPE, whose per-name densities fit a conditional tree (a name
carries its parents), so the GP picks method and learning rate jointly and TPE the shape within the method.
The GP learns from COMPLETE trials only: under ASHA (fidelity tell policy) trials stopped early are PRUNED and
inform only TPE's part.
"""

from __future__ import annotations

from melora_tune.search.samplers.registry import Sampler, register_sampler


class GP(Sampler):
    name = "gp"
    summary = ("Optuna's GPSampler (Gaussian-process BO) on method + lr (+ alpha, dropout); univariate TPE for "
               "each method's own conditional hyperparameters")

    def make(self, space, *, seed, n_startup_trials):
        import optuna  # heavy: the sampler is described and validated without Optuna (GPSampler also loads torch)

        independent = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials,
                                         independent_sampler=independent, warn_independent_sampling=False)

    def phrase(self, space) -> str:
        return "Optuna GP (TPE for conditional parameters)"


register_sampler(GP)
