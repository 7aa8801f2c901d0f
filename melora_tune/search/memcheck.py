"""Will a search's trials fit? The memory estimate of each method's largest feasible configuration, and the
refusal of a search whose trials cannot fit their GPUs, before anything starts (``search --dry-run`` and the
real start both run it).

Only GPU trials are refused. A CPU trial's memory is host memory that Ray's own processes, the driver and the
other trials share, on nodes that need not be this machine, so the dry run reports it next to this machine's
RAM share (its RAM over the workers that run at once) and warns when it is over, without refusing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from melora_tune.adapters import describe, get_method
from melora_tune.errors import UsageError
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.memory import MemoryEstimate, check_fits, estimate, gib, gpu_memory, trial_facts, worker_share


@dataclass(frozen=True)
class SearchMemory:
    """Each method's largest configuration with its estimate, and what a worker has to hold it."""

    estimates: dict[str, tuple[str, MemoryEstimate]]  # method -> (its largest configuration, its estimate)
    on_gpu: bool
    capacity: int | None  # bytes a worker has: its GPU share, or this machine's RAM share for CPU trials
    source: str  # where capacity comes from, or why there is none

    def lines(self) -> list[str]:
        if not self.estimates:
            return [f"memory: not estimated ({self.source})"]
        if not self.on_gpu:
            head = f"memory per CPU worker, each method's largest configuration (reported, not refused on CPU; {self.source})"
        elif self.capacity is None:
            head = f"memory per GPU, each method's largest configuration (fit not checked: {self.source})"
        else:
            head = f"memory per GPU, each method's largest configuration (fits {gib(self.capacity)} GiB a worker, from {self.source})"
        out = [head]
        for method, (label, est) in self.estimates.items():
            over = self.capacity is not None and not self.on_gpu and est.per_worker > self.capacity
            out.append(f"  {label}: {est.lines()[0]}"
                       + (f"  WARNING: over this machine's share of {gib(self.capacity)} GiB" if over else ""))
        first = next(iter(self.estimates.values()))[1]
        out.append(f"  assumes {first.assumed().split('; ', 1)[0]}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"on_gpu": self.on_gpu, "capacity_bytes": self.capacity, "source": self.source,
                "methods": {m: {"config": label, **est.to_dict()} for m, (label, est) in self.estimates.items()}}


def largest_config(feasible, method: str) -> dict[str, Any]:
    """The method's most memory-hungry feasible configuration as sampled values: the most trainable parameters
    (their weights, gradients and optimizer states grow with them; activations and frozen weights do not)."""
    cand = max(feasible.candidates[method], key=lambda c: c.adapter_params)
    return {"method": method, **{k: getattr(cand, k) for k in get_method(method).hyperparams}}


def search_memory(space, feasible, base_cfg: TrialConfig) -> SearchMemory:
    """Estimate each method's largest configuration; refuse (one-line UsageError) when a GPU trial cannot fit.
    ``base_cfg``: the space's validated base trial (``SearchSpace.base_trial``)."""
    base_trial = base_cfg.to_dict()  # what TrialConfig.from_sampled merges a sample into, as a trial's does
    on_gpu = base_cfg.resources.use_gpu
    estimates: dict[str, tuple[str, MemoryEstimate]] = {}
    configs: dict[str, TrialConfig] = {}
    for method in feasible.methods:
        sampled = largest_config(feasible, method)
        cfg = TrialConfig.from_sampled(base_trial, sampled)
        try:
            facts = trial_facts(cfg, feasible.spec)
        except UsageError:
            raise
        except ValueError as err:  # an architecture whose config the estimate cannot read: report, do not refuse
            return SearchMemory({}, on_gpu, None, str(err))
        # one-worker trials of a search keep a host copy of the base weights between trials (trial.warm)
        est = estimate(cfg, facts=facts, keeps_weights=space.resources.num_workers == 1)
        estimates[method], configs[method] = (describe(sampled), est), cfg
    if not on_gpu:
        import psutil  # optional

        at_once = space.resources.num_workers * space.max_concurrent_trials
        ram = psutil.virtual_memory().total
        return SearchMemory(estimates, False, ram // at_once, f"this machine: {gib(ram)} GiB RAM over {at_once} worker(s) at once, "
                                                                  f"{gib(ram // at_once)} each")
    gpu_bytes, source = gpu_memory(base_cfg)
    if gpu_bytes is None:
        return SearchMemory(estimates, True, None, source)
    for method, (label, est) in estimates.items():
        check_fits(configs[method], est, gpu_bytes, what=f"the largest {method} trial ({label})")
    return SearchMemory(estimates, True, worker_share(base_cfg, gpu_bytes), source)
