"""MLflow tracking of a search: one parent run per search, one child run per trial, no duplicates on resume.

``MLflowLoggerCallback`` creates a new run whenever a trial (re)starts in a new
driver process, so a resumed search would log every unfinished trial twice.
``MlflowTrialCallback`` instead *finds or creates* a trial's child run by tags
under the parent run: ``melora.trial_id`` (the Ray trial id, stable across
``--resume``) or, failing that, ``melora.optuna_trial`` (the Optuna trial
number, which a re-run of an interrupted trial keeps). The parent run id is
kept in the experiment folder (``melora_search.json``), so ``--resume``
continues the same parent. Metrics already logged at a step are not logged
again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from ray.tune import Callback

from melora_tune import drill
from melora_tune.adapters import describe, get_method
from melora_tune.errors import innermost_error_line
from melora_tune.records import (
    CELL_TAG, CHECKPOINT_TAG, KIND_TAG, OPTUNA_TAG, PARENT_TAG, REASON_TAG, SCORED, SEARCH_KIND, SEARCH_TAG, STATUS_TAG, TRIAL_TAG,
    rank_key,
)
from melora_tune.records import finite as _finite
from melora_tune.records.store import artifact_location, normalize_tracking_uri, sqlite_open_lock  # noqa: F401  (re-exported)
from melora_tune.search.searcher import ENDED_STATUSES, outcome

log = logging.getLogger("melora_tune.search")

# Result keys that are Ray bookkeeping, not training metrics.
RAY_KEYS = {
    "time_this_iter_s", "time_total_s", "timestamp", "pid", "done", "training_iteration", "iterations_since_restore",
    "time_since_restore", "date", "hostname", "node_ip", "trial_id", "experiment_tag", "checkpoint_dir_name",
    "should_checkpoint", "config",
}
INFO_KEYS = {"status", "reason", "trial_name", "step", "total_steps", "world_size", "worker_pid"}


def client(tracking_uri: str):
    with sqlite_open_lock(tracking_uri):  # a new SQLite store is created once, not by two searches at a time
        mlf = MlflowClient(tracking_uri=tracking_uri)
        mlf.search_experiments(max_results=1)  # opens the store (creating and migrating its schema) under the lock
    return mlf


def get_or_create_experiment(mlf, name: str, tracking_uri: str) -> str:
    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlf.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return mlf.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except Exception:  # noqa: BLE001  (created concurrently by another search)
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_params_once(mlf, run_id: str, params: dict[str, Any]) -> None:
    """Log the params a run does not have yet (MLflow params are immutable; a resumed run keeps its own)."""
    have = mlf.get_run(run_id).data.params
    new = [Param(k, _param_str(v)) for k, v in params.items() if k not in have and v is not None]
    changed = [k for k, v in params.items() if k in have and v is not None and have[k] != _param_str(v)]
    if changed:
        log.warning("MLflow run %s keeps its earlier value of %s", run_id, ", ".join(changed))
    for i in range(0, len(new), 100):
        mlf.log_batch(run_id, params=new[i : i + 100])


def _param_str(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # full precision: export rebuilds the trial config (its lr) from these params
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)[:6000]


def trial_params(config: dict[str, Any], budget: int, min_fraction: float) -> dict[str, Any]:
    method = config.get("method")
    out: dict[str, Any] = {"method": method}
    out.update({k: config.get(k) for k in get_method(method).hyperparams})
    out.update(
        lr=config.get("lr"),
        alpha=config.get("alpha"),
        dropout=config.get("dropout"),
        equivalent_rank=config.get("equivalent_rank"),
        adapter_params=config.get("adapter_params"),
        budget=budget,
        min_fraction=min_fraction,
        optuna_trial=config.get("optuna_trial"),
    )
    base = config.get("trial") or {}
    training = base.get("training") or {}
    for key in ("epochs", "micro_batch_size", "grad_accum", "max_length", "zero_stage", "weight_decay", "warmup_ratio", "seed"):
        if key in training:
            out[f"training.{key}"] = training[key]
    if config.get("seed") is not None:  # a grid's space.seeds replaces the base seed per trial
        out["training.seed"] = int(config["seed"])
    res = base.get("resources") or {}
    out["num_workers"] = res.get("num_workers")
    adapter = base.get("adapter") or {}
    out["target_modules"] = adapter.get("target_modules")
    out["modules_to_save"] = adapter.get("modules_to_save")
    return out


def best_checkpoint(trial_path: str | None) -> tuple[float | None, Path | None]:
    """(score, adapter folder) of the best checkpoint Tune kept for a trial (local storage only)."""
    if not trial_path or "://" in str(trial_path):
        return None, None
    best: tuple[float | None, Path | None] = (None, None)
    for state_file in Path(trial_path).glob("checkpoint_*/trial_state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        score = (state.get("metrics") or {}).get("score")
        adapter = state_file.parent / "adapter"
        if _finite(score) and adapter.is_dir() and (best[0] is None or score > best[0]):
            best = (float(score), adapter)
    return best


class MlflowTrialCallback(Callback):
    """Child run per trial under ``parent_run_id``; the parent gets the best score so far."""

    DRILL = "search"  # prefix of its kill-drill points (melora_tune.drill)

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, *, budget: int, min_fraction: float,
                 max_t: float, time_attr: str = "epoch", search_name: str = "", inputs: list | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.budget = budget
        self.min_fraction = min_fraction
        self.max_t = max_t
        self.time_attr = time_attr
        self.search_name = search_name
        self.inputs = list(inputs or [])  # the task's splits as MLflow dataset inputs (records.inputs), on every run
        self._client = None
        self._runs: dict[str, str] = {}  # Ray trial id -> MLflow run id
        self._last_step: dict[str, float] = {}
        self._finished: dict[str, tuple[str, str, float | None]] = {}  # trial id -> (method, status, score)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _last_step={}, _finished={})
        return state

    @property
    def mlf(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    # ---- the child run of a trial -----------------------------------------------------------
    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        config = trial.config
        number = config.get("optuna_trial")
        base = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        found = self.mlf.search_runs([self.experiment_id], f"{base} and tags.`{TRIAL_TAG}` = '{tid}'", max_results=5)
        if not found and number is not None:
            # Optuna numbers trials per study, and a search has one study per cell
            cell = f" and tags.`{CELL_TAG}` = '{config['cell']}'" if config.get("cell") else ""
            found = self.mlf.search_runs([self.experiment_id], f"{base} and tags.`{OPTUNA_TAG}` = '{number}'{cell}",
                                         max_results=5)
        if found:
            run_id = found[0].info.run_id
            self.mlf.set_tag(run_id, TRIAL_TAG, tid)
            if found[0].info.status != "RUNNING" and str(trial.status) in ("RUNNING", "PENDING"):
                self.mlf.update_run(run_id, status="RUNNING")
                self.mlf.set_tag(run_id, STATUS_TAG, "running")
            history = self.mlf.get_metric_history(run_id, "epoch")
            self._last_step[tid] = max((m.step for m in history), default=-1)
        else:
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: tid, STATUS_TAG: "running", SEARCH_TAG: self.search_name}
            if number is not None:
                tags[OPTUNA_TAG] = str(number)
            if config.get("cell"):
                tags[CELL_TAG] = str(config["cell"])
            run = self.mlf.create_run(self.experiment_id, run_name=describe(config), tags=tags)
            run_id = run.info.run_id
            drill.point(f"{self.DRILL}.mlflow_create")
            self._last_step[tid] = -1
        self._runs[tid] = run_id
        log_params_once(self.mlf, run_id, trial_params(config, config.get("budget", self.budget), self.min_fraction))
        self.log_inputs(run_id)
        return run_id

    def log_inputs(self, run_id: str) -> None:
        """The task's splits as the run's dataset inputs (MLflow keeps one per name and digest: a resumed run's
        are not doubled)."""
        if self.inputs:
            self.mlf.log_inputs(run_id, datasets=self.inputs)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe(self.run_id, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safe(self._log_result, trial, result)
        drill.point(f"{self.DRILL}.result")

    def _log_result(self, trial, result: dict[str, Any]) -> None:
        run_id = self.run_id(trial)
        step = result.get("step", result.get("training_iteration", 0))
        if not _finite(step) or step <= self._last_step.get(trial.trial_id, -1):
            return  # logged before an interruption
        now = int(time.time() * 1000)
        metrics = []
        for key, value in result.items():
            if key in RAY_KEYS or key in INFO_KEYS or not _finite(value):
                continue
            name = "learning_rate" if key == "lr" else key
            metrics.append(Metric(name, float(value), now, int(step)))
        if metrics:
            self.mlf.log_batch(run_id, metrics=metrics)
        self._last_step[trial.trial_id] = step
        if result.get("status") == "diverged":
            self.mlf.set_tag(run_id, REASON_TAG, str(result.get("reason"))[:5000])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safe(self._finish, trials, trial, outcome(trial.last_result, False, self.max_t, self.time_attr), None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safe(self._finish, trials, trial, "failed", _error_line(trial))

    def _finish(self, trials, trial, status: str, reason: str | None) -> None:
        if status == "interrupted":
            return  # left RUNNING for --resume (close_unfinished marks it if the search ends interrupted)
        run_id = self.run_id(trial)
        result = trial.last_result or {}
        reason = reason or result.get("reason")
        tags = {STATUS_TAG: status}
        if reason:
            tags[REASON_TAG] = str(reason)[:5000]
        score, adapter = best_checkpoint(trial.path)
        if adapter is not None:
            tags[CHECKPOINT_TAG] = str(adapter.parent)
            self.mlf.log_metric(run_id, "best_score", score)
            try:
                self.mlf.log_artifacts(run_id, str(adapter), artifact_path="adapter")
            except Exception as exc:  # noqa: BLE001
                log.warning("could not upload the adapter of trial %s: %s", trial.trial_id, exc)
        for key, value in tags.items():
            self.mlf.set_tag(run_id, key, value)
        drill.point(f"{self.DRILL}.mlflow_finish")
        self.mlf.set_terminated(run_id, status="FAILED" if status in ("failed", "diverged") else "FINISHED")
        final = result.get("score") if status in SCORED else None
        self._finished[trial.trial_id] = (trial.config.get("method"), status, final if _finite(final) else None)
        self._update_parent(trials)

    def _update_parent(self, trials) -> None:
        """Best final score so far (full-fidelity trials first), overall and per method."""
        done = []
        for t in trials:
            st = str(t.status)
            if st not in ENDED_STATUSES and t.trial_id not in self._finished:
                continue
            res = t.last_result or {}
            kind = "failed" if st == "ERROR" else outcome(res, False, self.max_t, self.time_attr)
            score = res.get("score")
            if kind in SCORED and _finite(score):
                done.append((*rank_key(kind, score)[:2], t.config.get("method")))
        n_done = sum(1 for t in trials if str(t.status) in ENDED_STATUSES)
        now = int(time.time() * 1000)
        metrics = [Metric("trials_done", float(n_done), now, n_done)]
        if done:
            full = [d for d in done if d[0]] or done
            metrics.append(Metric("best_score", max(d[1] for d in full), now, n_done))
            for method in sorted({d[2] for d in done}):
                mine = [d for d in done if d[2] == method]
                mine = [d for d in mine if d[0]] or mine
                metrics.append(Metric(f"best_score_{method}", max(d[1] for d in mine), now, n_done))
        self.mlf.log_batch(self.parent_run_id, metrics=metrics)

    def _safe(self, fn, *args) -> None:
        """Tracking must never take the search down: log and carry on."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow logging failed (%s): %s", getattr(fn, "__name__", fn), exc)


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path:
        try:
            text = Path(path).read_text()
        except OSError:
            text = ""
    return innermost_error_line(text or str(getattr(trial, "error_msg", "") or ""))


# ---- the parent run ----------------------------------------------------------------------

def start_parent(mlf, experiment_id: str, *, run_id: str | None, name: str, params: dict[str, Any], space_text: str,
                 space_filename: str) -> str:
    """Create the parent run of a search (or reopen ``run_id`` on --resume); log the space file once."""
    if run_id is not None:
        try:
            run = mlf.get_run(run_id)
        except Exception:  # noqa: BLE001  (deleted, or another tracking store)
            run = None
        if run is not None:
            mlf.update_run(run_id, status="RUNNING")
            mlf.set_tag(run_id, STATUS_TAG, "running")
            log_params_once(mlf, run_id, params)
            return run_id
    run = mlf.create_run(experiment_id, run_name=name, tags={SEARCH_TAG: name, STATUS_TAG: "running", KIND_TAG: SEARCH_KIND})
    log_params_once(mlf, run.info.run_id, params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / space_filename
        path.write_text(space_text)
        mlf.log_artifact(run.info.run_id, str(path), artifact_path="space")
    return run.info.run_id


def close_unfinished(mlf, experiment_id: str, parent_run_id: str) -> int:
    """Mark the child runs an interrupted search left RUNNING as KILLED (``--resume`` reopens them)."""
    runs = mlf.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'", max_results=10000)
    for run in runs:
        mlf.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        mlf.set_terminated(run.info.run_id, status="KILLED")
    return len(runs)


def end_parent(mlf, run_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
    """status: finished | failed | interrupted."""
    mlf.set_tag(run_id, STATUS_TAG, status)
    if summary:
        for key, value in summary.items():
            mlf.set_tag(run_id, f"melora.{key}", str(value)[:5000])
    mlf.set_terminated(run_id, status={"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))
