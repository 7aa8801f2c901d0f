"""``run_search``: a budget-constrained search on Ray Tune (Optuna + ASHA), tracked in MLflow, then its
confirmation. Where a search lives on disk and what is checked before it starts: ``search.experiment``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from melora_tune import drill
from melora_tune.adapters.hyperparams import HYPERPARAMS
from melora_tune.data import TaskSpec, load_task
from melora_tune.records import META_NAME, SCORED, SEARCH_SPLITS, rank_key
from melora_tune.records.inputs import task_inputs
from melora_tune.search import tracking as trk
from melora_tune.search.cell_search import CellScheduler, CellSearcher
from melora_tune.search.cells import RUNGS_NAME, cell_label, cell_study_name
from melora_tune.search.confirm import run_confirm
from melora_tune.search.experiment import comparable, has_snapshot, is_remote, prepare_search, write_meta
from melora_tune.search.progress import ProgressCallback, TrialRow, summary_table
from melora_tune.search.reaper import PlacementGroupReaper
from melora_tune.search.resources import check_resources, reuse_actors, trial_resources
from melora_tune.search.schedulers import DEFAULT as DEFAULT_SCHEDULER
from melora_tune.search.schedulers import make_scheduler
from melora_tune.search.schema import SearchSpace
from melora_tune.search.searcher import ENDED_STATUSES, BudgetOptunaSearch, outcome
from melora_tune.search.space import FeasibleSpace
from melora_tune.search.tracking import MlflowTrialCallback, best_checkpoint
from melora_tune.search.trainable import search_trial, trial_dirname
from melora_tune.trial import ray_env
from melora_tune.trial.config import TRIAL_KEY
from melora_tune.trial.driver import GAVE_UP_NAME

log = logging.getLogger("melora_tune.search")

METRIC, MODE = "score", "max"


@dataclass
class SearchResult:
    """What a search found: every trial, the best per method, and where everything is."""

    name: str
    status: str  # finished | interrupted | failed
    trials: list  # TrialRow
    best: dict[str, Any]  # cell (method@level; the method alone with one level) -> TrialRow, full fidelity first
    parent_run_id: str
    experiment_path: str
    study_name: str
    optuna_storage: str
    tracking_uri: str
    mlflow_experiment_id: str
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_overall(self):
        rows = list(self.best.values())
        if not rows:
            return None
        return max(rows, key=lambda r: rank_key(r.status, r.score))

    def table(self) -> str:
        return summary_table(self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "trials": [t.to_dict() for t in self.trials],
            "best": {k: v.to_dict() for k, v in self.best.items()},
            "parent_run_id": self.parent_run_id,
            "experiment_path": self.experiment_path,
            "study_name": self.study_name,
            "optuna_storage": self.optuna_storage,
            "tracking_uri": self.tracking_uri,
            "mlflow_experiment_id": self.mlflow_experiment_id,
            "wall_s": self.wall_s,
        }



# ---- the search ------------------------------------------------------------------------------

def search_params(space: SearchSpace, feasible: FeasibleSpace, num_samples: int, *, storage_path: str | None = None,
                  optuna_storage: str | None = None, study_name: str | None = None) -> dict[str, Any]:
    s = space.space
    out: dict[str, Any] = {
        "model": space.model,
        "task": space.task.name,
        "methods": space.methods,
        "budget": space.budget.top,
        "min_fraction": space.budget.fraction,
        "num_samples": num_samples,
        "max_concurrent_trials": space.max_concurrent_trials,
        "seed": space.seed,
        "lr_low": s.lr.low,
        "lr_high": s.lr.high,
        "lr_log": s.lr.log,
        "epochs": space.training.epochs,
        "zero_stage": space.training.zero_stage,
        "sampler": space.sampler,
        "tell_policy": space.tell_policy,
        "record_test": space.record_test,
        "asha": space.scheduler_name == DEFAULT_SCHEDULER,
        "asha_grace_period": space.asha.grace_period,
        "asha_reduction_factor": space.asha.reduction_factor,
        "target_modules": feasible.target_modules,
        "modules_to_save": feasible.modules_to_save,
        "alpha": space.adapter.alpha,
        "dropout": space.adapter.dropout,
        "num_workers": space.resources.num_workers,
        # where the study and experiment live: report reads parameter importance from the study
        "storage_path": storage_path,
        "optuna_storage": optuna_storage,
        "study_name": study_name,
    }
    for key in (*HYPERPARAMS, "alpha", "dropout", "lr_choices", "seeds"):
        value = getattr(s, key)
        if value is not None:
            out[f"space.{key}"] = value
    if space.scheduler != DEFAULT_SCHEDULER:
        out["scheduler"] = space.scheduler  # only when the space names another: older records stay as they were
    for method in feasible.methods:
        out[f"feasible_{method}"] = feasible.size(method)
    out["budget_levels"] = ",".join(str(v) for v in space.budget.level_list)
    out["cells"] = ",".join(cell_label(m, v) for m, v in feasible.cells)
    out["trials_per_cell"] = space.trials_per_cell if space.trials_per_cell is not None else (
        num_samples // len(feasible.cells) if num_samples % len(feasible.cells) == 0 else "grid")
    if space.warm_start:
        out["warm_start"] = ",".join(space.warm_start)
    if feasible.infeasible:
        out["infeasible_cells"] = "; ".join(f"{cell_label(m, v)}: {why}" for (m, v), why in feasible.infeasible.items())
    return out


def run_search(
    space: SearchSpace | dict | str | os.PathLike,
    *,
    num_samples: int | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    resume: bool = False,
    name: str | None = None,
    verbose: bool = False,
    write: Callable[[str], None] | None = None,
    spec=None,
) -> SearchResult:
    """Run (or ``resume``) a search; returns every trial and the best per method.

    ``space``: a space YAML path, a dict, or a ``SearchSpace``. Everything a user
    can get wrong raises ``UsageError`` before Ray starts. ``spec`` (a
    ``ModelSpec``) skips loading the model config for the budget (tests).
    """
    t0 = time.time()
    prep = prepare_search(space, spec=spec, num_samples=num_samples, storage_path=storage_path,
                          tracking_uri=tracking_uri, name=name, resume=resume, address=address)
    space, text, filename, feasible, base_trial, plan = (prep.space, prep.text, prep.filename, prep.feasible,
                                                          prep.base_trial, prep.plan)
    shares, warm, priors = prep.shares, prep.warm, prep.priors
    storage, exp_name, exp_dir, meta = plan.storage, plan.exp_name, plan.exp_dir, plan.meta
    tracking, optuna_storage, study_name = plan.tracking, plan.optuna_storage, plan.study_name
    # Ray Tune: our progress lines instead of its tables; forced snapshots after checkpoints are wanted
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started_ray = False
    status = "failed"
    result = None
    mlf = experiment_id = parent = None
    fresh_parent = meta.get("parent_run_id") is None
    created_dir = exp_dir is not None and not exp_dir.exists()
    fitting = False
    try:
        # Ray first: a cluster that cannot be joined or is too small leaves no MLflow run and no experiment folder
        started_ray = ray_env.start_ray(address, verbose=verbose, timeout_s=space.ray_start_timeout_s)
        check_resources(space)

        # ---- MLflow: experiment per task, parent run per search
        mlf = trk.client(tracking)
        experiment_id = trk.get_or_create_experiment(mlf, space.task.name, tracking)
        parent = trk.start_parent(
            mlf, experiment_id, run_id=meta.get("parent_run_id"), name=exp_name,
            params=search_params(space, feasible, space.num_samples, storage_path=storage, optuna_storage=optuna_storage,
                                 study_name=study_name), space_text=text, space_filename=filename,
        )
        meta.update(
            name=exp_name, study_name=study_name, optuna_storage=optuna_storage, tracking_uri=tracking,
            mlflow_experiment_id=experiment_id, parent_run_id=parent, space=comparable(space),
            num_samples=space.num_samples, created=meta.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        write_meta(exp_dir, meta)
        # killed before Tune's first snapshot: nothing to restore, a fresh Tune run reuses the study and the parent run
        restore = resume and (exp_dir is None or has_snapshot(exp_dir))
        tuner = _build_tuner(space, feasible, shares, warm, priors, base_trial, storage, exp_name, optuna_storage, study_name,
                             tracking, experiment_id, parent, restore, write)
        fitting = True
        drill.point("search.before_fit")
        grid = tuner.fit()
        result = collect(grid, space, feasible, exp_name, storage, parent, study_name, optuna_storage, tracking, experiment_id)
        status = result.status
        drill.point("search.collected")
        if status == "finished" and space.confirm.enabled:
            (write or print)(f"confirming the best {space.confirm.top_k} configuration(s) per method with "
                             f"{space.confirm.seeds} new seed(s) each, scored on the test split")
            confirmed = run_confirm(space, storage_path=storage, name=exp_name, tracking_uri=tracking, write=write, spec=spec)
            result.extra["confirm"] = confirmed
            if confirmed.status != "finished":
                status = result.status = "interrupted"
        return result
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary = None
        if result is not None and result.best_overall is not None:
            b = result.best_overall
            summary = {"best": f"{b.label} score {b.score}", "best_score": b.score}
        if parent is not None:
            try:
                if status != "finished":
                    trk.close_unfinished(mlf, experiment_id, parent)
                trk.end_parent(mlf, parent, status, summary)
                if not fitting and fresh_parent:  # nothing ran under it: no half-started search left in MLflow
                    mlf.delete_run(parent)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not close the MLflow parent run: %s", exc)
        if not fitting and created_dir and exp_dir is not None and exp_dir.is_dir():
            (exp_dir / META_NAME).unlink(missing_ok=True)
            if not any(exp_dir.iterdir()):
                exp_dir.rmdir()
        if result is not None:
            result.wall_s = time.time() - t0
        if started_ray:
            ray.shutdown()


def _build_tuner(space, feasible, shares, warm, priors, base_trial, storage, exp_name, optuna_storage, study_name, tracking,
                 experiment_id, parent, resume, write):
    trainable = tune.with_resources(search_trial, trial_resources(space))
    # the splits a trial trains and is scored on, as MLflow dataset inputs: read once here, not once per trial
    inputs = task_inputs(lambda: load_task(TaskSpec(**space.task.model_dump())), SEARCH_SPLITS)
    callbacks = [
        MlflowTrialCallback(tracking, experiment_id, parent, budget=feasible.budget, min_fraction=feasible.min_fraction,
                            max_t=space.max_t, time_attr=space.asha.time_attr, search_name=exp_name, inputs=inputs),
        ProgressCallback(space.num_samples, space.max_concurrent_trials, space.max_t, space.asha.time_attr, write=write),
        PlacementGroupReaper(),
    ]
    exp_path = storage.rstrip("/") + "/" + exp_name
    if resume:
        _forget_given_up(exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        # callbacks come back pickled from tuner.pkl; give the restored run fresh ones (new tracking URI, writer)
        internal = getattr(tuner, "_local_tuner", None)
        if internal is not None:
            internal._run_config.callbacks = callbacks
            internal._run_config.verbose = 0
        return tuner
    searchers = {
        cell_label(method, level): BudgetOptunaSearch(
            cell,
            storage=optuna_storage,
            study_name=cell_study_name(study_name, method, level),
            seed=space.seed,
            n_startup_trials=space.startup_trials(shares[cell_label(method, level)]),
            max_t=space.max_t,
            time_attr=space.asha.time_attr,
            metric=METRIC,
            mode=MODE,
            points_to_evaluate=cell.points,
            warm=warm.get(cell_label(method, level)),
            prior=priors.get(cell_label(method, level)),
            sampler=space.sampler,
            tell_policy=space.tell_policy,
        )
        for (method, level), cell in feasible.cells.items()
    }
    searcher = CellSearcher(searchers, shares, metric=METRIC, mode=MODE)
    rungs = None if is_remote(exp_path) else Path(exp_path) / RUNGS_NAME
    scheduler = CellScheduler(lambda: make_scheduler(space), list(searchers), rungs_path=rungs)
    return tune.Tuner(
        trainable,
        param_space={TRIAL_KEY: base_trial},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=space.num_samples,
            max_concurrent_trials=space.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
            reuse_actors=reuse_actors(space),
        ),
        run_config=tune.RunConfig(
            name=exp_name,
            storage_path=storage,
            callbacks=callbacks,
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
            failure_config=tune.FailureConfig(max_failures=space.resources.max_failures),
        ),
    )


def _forget_given_up(exp_path: str) -> None:
    """An explicit --resume retries failed trials (resume_errored) with a fresh set of Train restarts."""
    if not is_remote(exp_path):
        for marker in Path(exp_path).glob(f"trial_*/{GAVE_UP_NAME}"):
            marker.unlink(missing_ok=True)


def collect(grid, space, feasible, exp_name, storage, parent, study_name, optuna_storage, tracking, experiment_id) -> SearchResult:
    statuses: dict[str, str] = {}
    try:  # Tune's own view: a trial stopped by an interrupt is neither TERMINATED nor ERROR
        statuses = {t.trial_id: str(t.status) for t in grid._experiment_analysis.trials}
    except Exception:  # noqa: BLE001
        pass
    rows: list[TrialRow] = []
    for res in grid:
        cfg = res.config or {}
        last = res.metrics or {}
        kind = "failed" if res.error is not None else outcome(last, False, space.max_t, space.asha.time_attr)
        tid = last.get("trial_id") or (Path(res.path).name.removeprefix("trial_") if res.path else None)
        if statuses.get(tid) not in (None, *ENDED_STATUSES):
            kind = "interrupted"
        score = last.get(METRIC)
        trial_id = tid or "?"
        _, adapter = best_checkpoint(res.path)
        rows.append(TrialRow(
            trial_id=str(trial_id),
            method=cfg.get("method", "?"),
            hyperparams={k: cfg.get(k) for k in HYPERPARAMS},
            lr=float(cfg.get("lr", math.nan)),
            adapter_params=int(cfg.get("adapter_params", 0)),
            equivalent_rank=int(cfg.get("equivalent_rank", 0)),
            score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
            status=kind,
            epochs=last.get("epoch"),
            optuna_trial=cfg.get("optuna_trial"),
            checkpoint=str(adapter) if adapter is not None else None,
            budget=int(cfg["budget"]) if cfg.get("budget") is not None else None,
            cell=cfg.get("cell"),
        ))
    # the best per cell; a search with one budget level keys them by method, as before levels
    single = len(space.budget.level_list) == 1
    best: dict[str, TrialRow] = {}
    for row in rows:
        if row.score is None or row.status not in SCORED:
            continue
        key = row.method if single else (row.cell or f"{row.method}@{row.budget}")
        cur = best.get(key)
        if cur is None or rank_key(row.status, row.score) > rank_key(cur.status, cur.score):
            best[key] = row
    for row in best.values():
        row.best = True
    ended = sum(1 for r in rows if r.status != "interrupted")
    status = "finished" if ended >= space.num_samples else "interrupted"
    return SearchResult(
        name=exp_name, status=status, trials=rows, best=best, parent_run_id=parent,
        experiment_path=storage.rstrip("/") + "/" + exp_name, study_name=study_name, optuna_storage=optuna_storage,
        tracking_uri=tracking, mlflow_experiment_id=experiment_id,
    )


