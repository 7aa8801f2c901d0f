"""What one trial of a search holds on the Ray cluster, whether the cluster can ever give it, and whether Tune
reuses trial processes."""

from __future__ import annotations

from melora_tune.errors import UsageError
from melora_tune.search.schema import SearchSpace


def check_resources(space: SearchSpace) -> None:
    """Fail fast (instead of pending forever) when one trial can never fit the cluster."""
    import ray  # heavy: Ray (~1-2 s), loaded where a cluster is used

    total = ray.cluster_resources()
    res = space.resources
    need_cpu = trial_resources(space).get("CPU", 0) + (0 if res.num_workers == 1 else res.num_workers * res.cpus_per_worker)
    need_gpu = res.num_workers * res.gpus_per_worker
    if total.get("CPU", 0) + 1e-9 < need_cpu:
        how = (f"1 worker, trained in the trial: {res.cpus_per_worker:g}" if res.num_workers == 1 else
               f"driver {res.driver_cpus:g} + {res.num_workers} worker(s) x {res.cpus_per_worker:g}")
        raise UsageError(
            f"one trial needs {need_cpu:g} CPUs ({how}) but the Ray cluster has {total.get('CPU', 0):g}: "
            "lower resources.cpus_per_worker or num_workers"
        )
    if need_gpu and total.get("GPU", 0) + 1e-9 < need_gpu:
        raise UsageError(
            f"one trial needs {need_gpu:g} GPUs but the Ray cluster has {total.get('GPU', 0):g}: "
            "set resources.gpus_per_worker: 0 to train on CPU, or join a GPU cluster with --address"
        )


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """What the Tune trial itself holds: the one worker's CPUs (+ GPU) when it trains in the trial
    (``trial.inprocess``), else a driver's share while its TorchTrainer's workers hold their own."""
    res = space.resources
    if res.num_workers == 1:
        return {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker > 0 else {})}
    return {"CPU": res.driver_cpus}


def reuse_actors(space: SearchSpace) -> bool:
    """Whether Tune runs consecutive trials in the same trial process (``TuneConfig(reuse_actors=...)``).

    One worker: the trial trains in its Tune process (``trial.inprocess``), so a reused process keeps
    the imports, the tokenizer, the tokenized splits and the base weights (``trial.warm``) and the next
    trial skips loading them; each trial still builds its own model, adapter, optimizer and process
    group, from its own seed (tests/test_warm_trials.py checks it matches a fresh process). More
    workers: the work happens in Ray Train's own worker processes, which a reused Tune process would
    not keep, so there is nothing to gain and Tune's actor reuse stays off.
    """
    return space.resources.num_workers == 1
