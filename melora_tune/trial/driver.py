"""Run one trial: ``run_trial`` (standalone) and ``tune_trial`` (a Ray Tune trainable).

A trial with one worker trains in the calling process (``melora_tune.trial.inprocess``):
in the Tune trial's own process, or in the process of ``run_trial``. A trial with
more workers is a ``TorchTrainer`` whose RunConfig name and storage path identify
it. Either way ``storage_path/name`` holds the checkpoints, and running the same
name under the same storage path again resumes from the latest one (Ray Train V2
restores its checkpoint manager from the run folder and the workers pick the
checkpoint up with ``ray.train.get_checkpoint``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from melora_tune.errors import innermost_error_line
from melora_tune.trial import checkpoint as ckpt_io
from melora_tune.trial import ray_env, warm
from melora_tune.trial.config import TRIAL_KEY, TrialConfig, apply_overrides
from melora_tune.trial.inprocess import in_process, run_local, tune_in_process
from melora_tune.trial.placement import PeriodicReaper
from melora_tune.trial.prepare import PreparedTrial, prepare_trial
from melora_tune.trial.system_metrics import SystemSampler

log = logging.getLogger("melora_tune.trial")

# In a Tune trial folder: Train gave up on the trial after its own restarts (one line: the error).
# `melora-tune search --resume` removes it, so an explicit resume retries failed trials.
GAVE_UP_NAME = "train_gave_up.txt"


class TrialGaveUpError(RuntimeError):
    """A restarted Tune trial whose training already failed after every Train restart."""



@dataclass
class TrialResult:
    """What a finished (or diverged, or failed) trial left behind."""

    name: str
    status: str  # completed | diverged | failed | running (stopped early)
    reason: str | None
    metrics: dict[str, Any] | None  # the last report
    best_metrics: dict[str, Any] | None  # the report with the highest score
    checkpoint_path: str | None  # the latest checkpoint folder (trial_state.json, adapter/, ds/, rng/)
    adapter_path: str | None  # <checkpoint>/adapter: load with melora_tune.adapters.inject.load_adapter
    run_path: str | None  # the Ray Train run folder (name under storage_path)
    step: int = 0
    total_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    restarts: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- building the trainer -------------------------------------------------------


def build_trainer(
    prepared: PreparedTrial,
    storage_path: str | Path,
    name: str,
    *,
    callbacks: list | None = None,
    resume_from: str | None = None,
):
    """The TorchTrainer of a prepared trial (its workers get it as it is); gloo on CPU, nccl on GPU."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # heavy: Ray
    from ray.train.torch import TorchConfig, TorchTrainer  # heavy: Ray

    cfg = prepared.cfg
    res = cfg.resources
    storage = str(Path(storage_path).expanduser().resolve()) if "://" not in str(storage_path) else str(storage_path)
    return TorchTrainer(
        train_loop_per_worker=_train_loop,
        train_loop_config={TRIAL_KEY: prepared, "name": name, "resume_from": resume_from},
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints),
            failure_config=FailureConfig(max_failures=res.max_failures),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": ray_env.worker_env()},
        ),
    )


def _train_loop(config: dict[str, Any]) -> dict[str, Any]:
    from melora_tune.trial.worker import train_loop_per_worker  # torch, transformers, datasets: in the workers only

    return train_loop_per_worker(config)



# ---- results -------------------------------------------------------------------


def result_from_run(run_path: str | Path, name: str, summary: dict[str, Any] | None = None, error: str | None = None) -> TrialResult:
    run_path = Path(run_path)
    latest = ckpt_io.latest_checkpoint_dir(run_path)
    state = ckpt_io.read_state(latest) if latest else None
    summary = summary or {}
    if state is None:
        return TrialResult(
            name=name,
            status="failed" if error else summary.get("status", "failed"),
            reason=error or summary.get("reason") or "no checkpoint was written",
            metrics=summary.get("metrics"),
            best_metrics=summary.get("best"),
            checkpoint_path=None,
            adapter_path=None,
            run_path=str(run_path),
            timings=summary.get("timings", {}),
        )
    status = state["status"]
    reason = state.get("reason")
    if error and status == "running":
        status, reason = "failed", error
    adapter = latest / ckpt_io.ADAPTER_DIR
    return TrialResult(
        name=name,
        status=status,
        reason=reason,
        metrics=state.get("metrics"),
        best_metrics=state.get("best"),
        checkpoint_path=str(latest),
        adapter_path=str(adapter) if adapter.is_dir() else None,
        run_path=str(run_path),
        step=state.get("step", 0),
        total_steps=state.get("total_steps", 0),
        history=state.get("history", []),
        timings=summary.get("timings", {}),
        restarts=state.get("restarts", 0),
    )




# ---- standalone ------------------------------------------------------------------

def run_trial(
    cfg: TrialConfig,
    storage_path: str | Path,
    name: str,
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    prepared: PreparedTrial | None = None,
    shutdown_ray: bool | None = None,
) -> TrialResult:
    """Train, evaluate and checkpoint one trial; resume it if ``storage_path/name`` holds checkpoints.

    Checks the config first (UsageError before Ray starts). Divergence is a
    result (status "diverged", reason set), not an exception; a worker crash
    gives status "failed" with the error's last line as reason, after
    ``resources.max_failures`` restarts from the last checkpoint.

    One worker: trained in this process without starting Ray, or, with
    ``ray_address``, in one Ray task on that cluster (its resources: the
    worker's CPUs and GPU). More workers: a TorchTrainer.
    """
    prepared = prepared or prepare_trial(cfg)
    run_path = Path(storage_path).expanduser().resolve() / name
    if in_process(prepared.cfg):
        return _run_in_process(prepared, run_path, name, ray_address)

    from ray.train import TrainingFailedError  # heavy: Ray

    started = ray_env.start_ray(ray_address, num_cpus=num_cpus)
    try:
        trainer = build_trainer(prepared, storage_path, name)
        t_fit = time.time()
        try:
            result = trainer.fit()
        except TrainingFailedError as err:
            return result_from_run(run_path, name, error=innermost_error_line(err))
        t_done = time.time()
        summary = result.return_value if isinstance(result.return_value, dict) else None
        out = result_from_run(result.path or run_path, name, summary)
        if summary and "wall_start" in summary:
            # Ray Train's own cost around the worker loop: controller, placement group, worker
            # actors and process group before it; teardown after it.
            out.timings["ray_train_start_s"] = round(summary["wall_start"] - t_fit, 3)
            out.timings["ray_train_stop_s"] = round(t_done - summary["wall_end"], 3)
        out.timings["fit_s"] = round(t_done - t_fit, 3)
        return out
    finally:
        if shutdown_ray or (shutdown_ray is None and started):
            import ray  # heavy: Ray

            ray.shutdown()


def _run_in_process(prepared: PreparedTrial, run_path: Path, name: str, ray_address: str | None) -> TrialResult:
    t0 = time.time()
    if ray_address:
        import ray  # heavy: Ray

        started = ray_env.start_ray(ray_address)
        res = prepared.cfg.resources
        try:
            task = ray.remote(run_local).options(
                num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if res.use_gpu else 0, max_retries=0,
                runtime_env={"env_vars": ray_env.worker_env()},
            )
            outcome = ray.get(task.remote(prepared, run_path, name))
        finally:
            if started:
                ray.shutdown()
    else:
        outcome = run_local(prepared, run_path, name)
    if "error" in outcome:
        return result_from_run(run_path, name, error=outcome["error"])
    out = result_from_run(run_path, name, outcome["summary"])
    out.timings["fit_s"] = round(time.time() - t0, 3)
    return out


# ---- Ray Tune ---------------------------------------------------------------------

class _Relay:
    """A Ray Train UserCallback (runs in the Train controller) that forwards every report to a Ray queue."""

    def __new__(cls, q):
        from ray.train.v2.api.callback import UserCallback  # heavy: Ray

        class Relay(UserCallback):
            def __init__(self, q):
                self.q = q

            def after_report(self, run_context, metrics, checkpoint):
                self.q.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))

        return Relay(q)


def tune_trial(config: TrialConfig | dict[str, Any]) -> None:
    """A Ray Tune function trainable: one trial = one TorchTrainer, every report relayed to Tune.

    ``config[TRIAL_KEY]`` is a TrialConfig dict; every other key is an override
    (``"lr": 1e-3``, ``"adapter.r": 4``, as ``--set`` takes them), which is how
    a search space varies it. The Train run is named after the Tune trial id
    and stored in the Tune trial folder, so a restored Tune trial resumes its
    own Train run; a Tune checkpoint from elsewhere (PBT) seeds a fresh run.
    Each Train report (metrics + checkpoint) reaches ``ray.tune.report`` so
    schedulers such as ASHA see every evaluation.

    With one worker (``resources.num_workers == 1``) there is no TorchTrainer:
    the trial trains in this process and reports to Tune itself
    (``inprocess.tune_in_process``); the trial must then hold the worker's
    CPUs/GPU (``tune.with_resources``), and Tune's FailureConfig is its only
    retry.

    Resources with more workers: the function itself needs a CPU slot in Tune;
    the Train workers request theirs separately (``num_workers x cpus_per_worker``).
    """
    import ray.tune  # heavy: Ray
    from ray.train import Checkpoint, TrainingFailedError  # heavy: Ray
    from ray.util.queue import Empty, Queue  # heavy: Ray

    if isinstance(config, TrialConfig):  # the search's path: validated once, in search.trainable
        cfg = config
    else:
        base = dict(config.get(TRIAL_KEY) or {})
        overrides = {k: v for k, v in config.items() if k != TRIAL_KEY}
        cfg = apply_overrides(TrialConfig.from_dict(base, source="tune config"), overrides)
    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    storage = Path(ctx.get_trial_dir())
    name = f"train_{trial_id}"
    task = warm.task(cfg.task_spec())  # the checks read the task the worker will train on: loaded once per process
    if in_process(cfg):
        tune_in_process(prepare_trial(cfg, task), name)
        return

    gave_up = storage / GAVE_UP_NAME
    if gave_up.is_file():
        # Train already spent resources.max_failures restarts on this trial: a Tune restart would only
        # repeat them (Tune's own restarts are for a lost trial process, not for a failing training).
        raise TrialGaveUpError(gave_up.read_text().strip() or "training failed")

    resume_from = None
    tune_ckpt = ray.tune.get_checkpoint()
    if tune_ckpt is not None and not (storage / name).is_dir():
        resume_from = tune_ckpt.path  # e.g. PBT cloned another trial's checkpoint

    prepared = prepare_trial(cfg, task)
    q = Queue(maxsize=0, actor_options={"num_cpus": 0})
    trainer = build_trainer(prepared, storage, name, callbacks=[_Relay(q)], resume_from=resume_from)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001  (re-raised in the Tune thread below)
            outcome["error"] = err

    system = SystemSampler()  # the machine's load, added to every report (system/...)
    thread = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    thread.start()

    def relay(item) -> None:
        metrics, path = item
        metrics = system.add_to({k: v for k, v in metrics.items() if v is not None})
        metrics["trial_name"] = name
        if path:
            ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(path))
        else:
            ray.tune.report(metrics)

    reaper = PeriodicReaper(period_s=5.0)
    while thread.is_alive():
        reaper.maybe_run()  # an earlier trial's dead controller may hold the CPUs this trainer waits for
        try:
            relay(q.get(timeout=0.5))
        except Empty:
            continue
    while True:
        try:
            relay(q.get(block=False))
        except Empty:
            break
    q.shutdown()
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, TrainingFailedError):
            try:
                gave_up.write_text(innermost_error_line(err) + "\n")
            except OSError:  # remote storage: Tune may then repeat the Train restarts
                pass
        raise err
