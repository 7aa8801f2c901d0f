"""``run_search``: a budget-constrained search on Ray Tune (Optuna TPE + ASHA), tracked in MLflow.

Layout of one search under the storage path::

    <storage_path>/optuna.db                   the Optuna studies (one per search, named after it)
    <storage_path>/<name>/                      the Ray Tune experiment (state, trials, checkpoints)
    <storage_path>/<name>/melora_search.json    study name, Optuna storage, MLflow ids: what --resume reuses

``name`` is ``<space name>-<timestamp>`` unless given; ``resume=True`` without a
name continues the newest search of the same space under the storage path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from melora_tune.errors import UsageError, first_line
from melora_tune.search.schema import DEFAULT_STORAGE_PATH, DEFAULT_TRACKING_URI, Asha, SearchSpace, load_space, parse_space
from melora_tune.search.memcheck import search_memory
from melora_tune.search.space import FeasibleSpace, build_space

log = logging.getLogger("melora_tune.search")

from melora_tune.records import META_NAME, SCORED, rank_key  # noqa: E402
from melora_tune.records.store import absolute_sqlite  # noqa: E402
METRIC, MODE = "score", "max"
# Keys of a space that may differ between a search and its --resume.
RESUME_MAY_CHANGE = {"storage_path", "optuna_storage", "tracking_uri"}


@dataclass
class SearchResult:
    """What a search found: every trial, the best per method, and where everything is."""

    name: str
    status: str  # finished | interrupted | failed
    trials: list  # TrialRow
    best: dict[str, Any]  # method -> TrialRow (full-fidelity trials first)
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
        from melora_tune.search.progress import summary_table

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


# ---- inputs -------------------------------------------------------------------------------------

def resolve_space(space: SearchSpace | dict | str | os.PathLike) -> tuple[SearchSpace, str, str]:
    """(validated space, its YAML text, a file name for the artifact)."""
    if isinstance(space, SearchSpace):
        return space, yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False), f"{space.name}.yaml"
    if isinstance(space, dict):
        parsed = parse_space(space)
        return parsed, yaml.safe_dump(space, sort_keys=False), f"{parsed.name}.yaml"
    parsed, text = load_space(space)
    return parsed, text, Path(space).name


def with_num_samples(space: SearchSpace, num_samples: int | None) -> SearchSpace:
    """The space with ``--num-samples`` applied (None keeps the space's own)."""
    if num_samples is None:
        return space
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}")
    return space.model_copy(update={"num_samples": num_samples})


def with_grid_size(space: SearchSpace, feasible: FeasibleSpace) -> SearchSpace:
    """A grid's num_samples: the grid's size unless given (fewer runs part of it; more cannot be distinct)."""
    if space.sampler != "grid":
        return space
    size = feasible.grid_size()
    if "num_samples" not in space.model_fields_set:
        return space.model_copy(update={"num_samples": size})
    if space.num_samples > size:
        raise UsageError(
            f"num_samples={space.num_samples} exceeds the grid's {size} points (sampler grid runs each once): "
            f"leave num_samples out to run the whole grid"
        )
    return space


def _is_remote(path: str) -> bool:
    return "://" in path


def _comparable(space: SearchSpace) -> dict[str, Any]:
    data = space.model_dump(mode="json")
    for key in RESUME_MAY_CHANGE:
        data.pop(key, None)
    return data


def _find_latest(storage: Path, space_name: str) -> Path | None:
    found = [p.parent for p in storage.glob(f"{space_name}-*/{META_NAME}")]
    found += [p.parent for p in storage.glob(f"{space_name}/{META_NAME}")]
    return max(found, key=lambda p: (p / META_NAME).stat().st_mtime) if found else None


def _has_snapshot(exp_dir: Path) -> bool:
    return any(exp_dir.glob("experiment_state*.json"))


def plan_paths(space: SearchSpace, *, storage_path: str | None, name: str | None, resume: bool) -> tuple[str, str, Path | None]:
    """(storage path, experiment name, experiment dir when local)."""
    storage = storage_path or space.storage_path or DEFAULT_STORAGE_PATH
    if name is not None:
        from melora_tune.search.preflight import check_run_name

        check_run_name(name)
    if _is_remote(storage):
        if resume and not name:
            raise UsageError("--resume on remote storage needs --name (the search's experiment name)")
        name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return storage, name, None
    root = Path(storage).expanduser().resolve()
    if resume:
        if name:
            exp_dir = root / name
            if not exp_dir.is_dir():
                raise UsageError(f"nothing to resume: {exp_dir} does not exist")
        else:
            found = _find_latest(root, space.name)
            if found is None:
                raise UsageError(f"nothing to resume: no search of {space.name!r} under {root} (start one without --resume)")
            exp_dir = found
        if not _has_snapshot(exp_dir):
            raise UsageError(
                f"cannot resume {exp_dir}: the search was interrupted before Ray wrote its first snapshot "
                f"(no experiment_state file); start it again with --name {exp_dir.name} and without --resume "
                "(its Optuna trials and MLflow runs are reused)"
            )
        return str(root), exp_dir.name, exp_dir
    name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir = root / name
    if exp_dir.is_dir() and _has_snapshot(exp_dir):
        raise UsageError(f"search {exp_dir} already exists: continue it with --resume, or give another --name")
    return str(root), name, exp_dir


def _read_meta(exp_dir: Path | None) -> dict[str, Any]:
    if exp_dir is None or not (exp_dir / META_NAME).is_file():
        return {}
    try:
        meta = json.loads((exp_dir / META_NAME).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {exp_dir / META_NAME} ({err}): restore it, or start a new search with another --name") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{exp_dir / META_NAME} is not a search record: restore it, or start a new search with another --name")
    return meta


def _write_meta(exp_dir: Path | None, meta: dict[str, Any]) -> None:
    if exp_dir is None:
        return
    created = not exp_dir.exists()
    tmp = exp_dir / (META_NAME + ".tmp")
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        tmp.replace(exp_dir / META_NAME)
    except OSError as err:
        if exp_dir.is_dir():
            tmp.unlink(missing_ok=True)
            if created and not any(exp_dir.iterdir()):
                exp_dir.rmdir()
        raise UsageError(f"cannot write the search record {exp_dir / META_NAME} ({err.strerror or err}): "
                         "give a writable --storage-path") from None


def default_optuna_storage(storage: str) -> str:
    if _is_remote(storage):
        return "sqlite:///" + str(Path("optuna.db").resolve())
    return "sqlite:///" + str(Path(storage) / "optuna.db")


@dataclass
class StartPlan:
    """Where a search goes, resolved and checked before anything is created."""

    storage: str
    exp_name: str
    exp_dir: Path | None
    meta: dict[str, Any]
    tracking: str
    optuna_storage: str
    study_name: str


def plan_start(space: SearchSpace, *, storage_path: str | None, name: str | None, resume: bool,
               tracking_uri: str | None, address: str | None = None) -> StartPlan:
    """Resolve where the search goes and run every start check that needs no Ray (``preflight.check_start``):
    ``--dry-run`` and the real start both call this, before any MLflow run, experiment folder or Ray."""
    from melora_tune.search.preflight import check_start

    storage, exp_name, exp_dir = plan_paths(space, storage_path=storage_path, name=name, resume=resume)
    meta = _read_meta(exp_dir)
    if resume and meta.get("space") is not None and meta["space"] != _comparable(space):
        changed = sorted(k for k in set(meta["space"]) | set(_comparable(space)) if meta["space"].get(k) != _comparable(space).get(k))
        raise UsageError(
            f"cannot resume {exp_name}: the space changed since it started ({', '.join(changed)}); "
            "a resumed search must keep its space (start a new search instead)"
        )
    tracking = tracking_uri or space.tracking_uri or meta.get("tracking_uri") or DEFAULT_TRACKING_URI
    optuna_storage = space.optuna_storage or meta.get("optuna_storage") or default_optuna_storage(storage)
    optuna_storage = absolute_sqlite(optuna_storage)
    tracking = check_start(space, storage=storage, tracking=tracking, optuna_storage=optuna_storage, address=address)
    return StartPlan(storage, exp_name, exp_dir, meta, tracking, optuna_storage, meta.get("study_name") or exp_name)


# ---- Ray ------------------------------------------------------------------------------------

def _start_ray(address: str | None, verbose: bool) -> bool:
    import ray

    from melora_tune.trial.driver import worker_env

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": worker_env()},
    )
    if address:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise UsageError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None
    return True


def _check_resources(space: SearchSpace) -> None:
    """Fail fast (instead of pending forever) when one trial can never fit the cluster."""
    import ray

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


def make_scheduler(space: SearchSpace):
    """The search's trial scheduler: ``asha_scheduler`` of its asha section, up to its max fidelity."""
    return asha_scheduler(space.asha, space.max_t)


def asha_scheduler(asha: Asha, max_t: int):
    """FiniteASHA for an enabled asha section, else FIFO (also what the replay benchmark schedules with)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if not asha.enabled:
        return FIFOScheduler()

    class FiniteASHA(AsyncHyperBandScheduler):
        """ASHA that ignores non-finite scores (a diverged trial's -inf would turn a rung's cutoff into NaN)."""

        def on_trial_result(self, tune_controller, trial, result):
            if not math.isfinite(result.get(METRIC, math.nan)):
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            if not math.isfinite((result or {}).get(METRIC, math.nan)):
                self._trial_info.pop(trial.trial_id, None)
                return
            return super().on_trial_complete(tune_controller, trial, result)

    return FiniteASHA(
        time_attr=asha.time_attr,
        max_t=max_t,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
        brackets=asha.brackets,
        # a trial at max_t ends by itself: stopping it would kill its Train run before it shuts down cleanly
        stop_last_trials=False,
    )


# ---- the search ------------------------------------------------------------------------------

def search_params(space: SearchSpace, feasible: FeasibleSpace, num_samples: int, *, storage_path: str | None = None,
                  optuna_storage: str | None = None, study_name: str | None = None) -> dict[str, Any]:
    s = space.space
    out: dict[str, Any] = {
        "model": space.model,
        "task": space.task.name,
        "methods": space.methods,
        "budget": space.budget.max_params,
        "min_fraction": space.budget.min_fraction,
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
        "asha": space.asha.enabled,
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
    for key in ("n", "r", "u", "m", "m_b", "alpha", "dropout", "lr_choices", "seeds"):
        value = getattr(s, key)
        if value is not None:
            out[f"space.{key}"] = value
    for method in feasible.methods:
        out[f"feasible_{method}"] = feasible.size(method)
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
    space, text, filename = resolve_space(space)
    space = with_num_samples(space, num_samples)
    feasible = build_space(space, spec=spec)
    space = with_grid_size(space, feasible)
    base_trial = space.base_trial_dict(feasible.target_modules, feasible.modules_to_save)
    feasible.memory = search_memory(space, feasible, base_trial)  # a trial that cannot fit its GPU is refused here
    plan = plan_start(space, storage_path=storage_path, name=name, resume=resume, tracking_uri=tracking_uri, address=address)
    storage, exp_name, exp_dir, meta = plan.storage, plan.exp_name, plan.exp_dir, plan.meta
    tracking, optuna_storage, study_name = plan.tracking, plan.optuna_storage, plan.study_name
    from melora_tune.search import tracking as trk

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
        started_ray = _start_ray(address, verbose)
        _check_resources(space)

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
            mlflow_experiment_id=experiment_id, parent_run_id=parent, space=_comparable(space),
            num_samples=space.num_samples, created=meta.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        _write_meta(exp_dir, meta)
        tuner = _build_tuner(space, feasible, base_trial, storage, exp_name, optuna_storage, study_name, tracking,
                             experiment_id, parent, resume, write)
        fitting = True
        grid = tuner.fit()
        result = collect(grid, space, feasible, exp_name, storage, parent, study_name, optuna_storage, tracking, experiment_id)
        status = result.status
        if status == "finished" and space.confirm.enabled:
            from melora_tune.search.confirm import run_confirm

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
            import ray

            ray.shutdown()


def _build_tuner(space, feasible, base_trial, storage, exp_name, optuna_storage, study_name, tracking, experiment_id,
                 parent, resume, write):
    from ray import tune

    from melora_tune.search.progress import ProgressCallback
    from melora_tune.search.reaper import PlacementGroupReaper
    from melora_tune.search.searcher import BudgetOptunaSearch
    from melora_tune.search.tracking import MlflowTrialCallback
    from melora_tune.search.trainable import BASE_KEY, search_trial, trial_dirname

    trainable = tune.with_resources(search_trial, trial_resources(space))
    callbacks = [
        MlflowTrialCallback(tracking, experiment_id, parent, budget=feasible.budget, min_fraction=feasible.min_fraction,
                            max_t=space.max_t, time_attr=space.asha.time_attr, search_name=exp_name),
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
    searcher = BudgetOptunaSearch(
        feasible,
        storage=optuna_storage,
        study_name=study_name,
        seed=space.seed,
        n_startup_trials=space.startup_trials(),
        max_t=space.max_t,
        time_attr=space.asha.time_attr,
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=feasible.points,
        sampler=space.sampler,
        tell_policy=space.tell_policy,
    )
    return tune.Tuner(
        trainable,
        param_space={BASE_KEY: base_trial},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=make_scheduler(space),
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
    from melora_tune.trial.driver import GAVE_UP_NAME

    if not _is_remote(exp_path):
        for marker in Path(exp_path).glob(f"trial_*/{GAVE_UP_NAME}"):
            marker.unlink(missing_ok=True)


def collect(grid, space, feasible, exp_name, storage, parent, study_name, optuna_storage, tracking, experiment_id) -> SearchResult:
    from melora_tune.search.progress import TrialRow
    from melora_tune.search.searcher import outcome
    from melora_tune.search.tracking import best_checkpoint

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
        if statuses.get(tid) not in (None, "TERMINATED", "ERROR"):
            kind = "interrupted"
        score = last.get(METRIC)
        trial_id = tid or "?"
        _, adapter = best_checkpoint(res.path)
        rows.append(TrialRow(
            trial_id=str(trial_id),
            method=cfg.get("method", "?"),
            n=cfg.get("n"),
            r=cfg.get("r", 0),
            u=cfg.get("u"),
            m=cfg.get("m"),
            lr=float(cfg.get("lr", math.nan)),
            adapter_params=int(cfg.get("adapter_params", 0)),
            equivalent_rank=int(cfg.get("equivalent_rank", 0)),
            score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
            status=kind,
            epochs=last.get("epoch"),
            optuna_trial=cfg.get("optuna_trial"),
            checkpoint=str(adapter) if adapter is not None else None,
        ))
    best: dict[str, TrialRow] = {}
    for row in rows:
        if row.score is None or row.status not in SCORED:
            continue
        cur = best.get(row.method)
        if cur is None or rank_key(row.status, row.score) > rank_key(cur.status, cur.score):
            best[row.method] = row
    for row in best.values():
        row.best = True
    ended = sum(1 for r in rows if r.status != "interrupted")
    status = "finished" if ended >= space.num_samples else "interrupted"
    return SearchResult(
        name=exp_name, status=status, trials=rows, best=best, parent_run_id=parent,
        experiment_path=storage.rstrip("/") + "/" + exp_name, study_name=study_name, optuna_storage=optuna_storage,
        tracking_uri=tracking, mlflow_experiment_id=experiment_id,
    )


def dry_run(space: SearchSpace | dict | str | os.PathLike, *, spec=None, num_samples: int | None = None,
            storage_path: str | None = None, tracking_uri: str | None = None, name: str | None = None,
            resume: bool = False, address: str | None = None) -> tuple[SearchSpace, FeasibleSpace]:
    """Validate a space, enumerate its feasible configurations and run the start checks a real start runs
    (each method's largest trial fits its GPU, then ``plan_start``: storage, tracking URI, Optuna storage, Ray
    address, local data); nothing starts or is written. ``feasible.memory`` holds the memory estimates."""
    space, _, _ = resolve_space(space)
    space = with_num_samples(space, num_samples)
    feasible = build_space(space, spec=spec)
    space = with_grid_size(space, feasible)
    base_trial = space.base_trial_dict(feasible.target_modules, feasible.modules_to_save)
    feasible.memory = search_memory(space, feasible, base_trial)
    plan_start(space, storage_path=storage_path, name=name, resume=resume, tracking_uri=tracking_uri, address=address)
    return space, feasible
