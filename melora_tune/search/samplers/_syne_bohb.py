"""syne-bohb: Syne Tune's BOHB searcher (KDE per epoch) proposing, the space's scheduler stopping.

A maintained multi-fidelity model through its own package (``syne-tune``, Apache-2.0; nothing downloaded at run
time): ``samplers/syne_bohb.py`` has how its searcher and the Optuna study meet. Pair it with ``scheduler: asha``
(Syne Tune's BOHB: asynchronous successive halving, one bracket) or ``hyperband`` (several brackets).
"""

from __future__ import annotations

import importlib.util

from melora_tune.errors import UsageError
from melora_tune.search.samplers.registry import Sampler, register_sampler

INSTALL = "pip install statsmodels && pip install --no-deps syne-tune==0.16.0"


class SyneBOHB(Sampler):
    name = "syne-bohb"
    summary = ("Syne Tune's BOHB searcher (a KDE pair per epoch, Falkner et al. 2018) from its own package, as an "
               "Optuna sampler; use with scheduler: asha or hyperband")

    def check(self) -> None:
        missing = [m for m in ("syne_tune", "statsmodels") if importlib.util.find_spec(m) is None]
        if missing:
            # --no-deps: syne-tune declares xgboost (with CUDA's NCCL) for searchers this one never imports
            raise UsageError(f"sampler {self.name} needs {' and '.join(missing)}, not installed: {INSTALL}")

    def make(self, space, *, seed, n_startup_trials):
        self.check()
        from melora_tune.search.samplers.syne_bohb import SyneTuneBOHBSampler  # heavy: Optuna, syne-tune, statsmodels

        return SyneTuneBOHBSampler(seed=seed, n_startup_trials=n_startup_trials)

    def phrase(self, space) -> str:
        return "Syne Tune's BOHB searcher (KDE per epoch)"


register_sampler(SyneBOHB)
