"""Confirmation: the search's best configurations trained again with new seeds, scored once on the test split.

A search picks its winner from one seed on the validation split, so the
winner's score carries both the seed's luck and the selection's optimism. The
confirmation stage answers "does it hold up?":

1. the top ``confirm.top_k`` configurations of each cell (a method at a budget
   level: the unit of equal tuning effort; a search over one level has one cell
   per method), by the search's own ranking (full-fidelity trials first, then the
   final validation score);
2. each trained again at full fidelity (no early stopping) with ``confirm.seeds``
   new seeds, ``training.seed + 1 .. + seeds`` (initialisation, dropout and data
   order); every configuration of every cell gets the same seeds, so cells can be
   compared seed by seed (a paired comparison), within a level and across levels;
3. each scored on validation after every epoch (as in the search) and, once,
   the final model on the test split, which no search trial ever loads
   (``training.score_test``);
4. the baselines (majority class, linear probe on frozen features) computed on
   the same splits and logged on the search's parent run.

Records: one MLflow child run of the search's parent per (configuration, seed),
tagged ``melora.kind=confirmation``, linked to the trial it confirms
(``melora.confirms``) and carrying its cell (param ``budget``, tag ``melora.cell``);
see ``melora_tune.records.schema``. The Ray Tune
experiment is ``<search experiment>/confirm`` (then ``confirm-2``, ... when a
later call adds configurations or seeds). Running it again resumes: an
interrupted experiment is restored (its trials continue from their
checkpoints), and a confirmation already completed in MLflow is never trained
twice.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune import Callback

from melora_tune import drill
from melora_tune.adapters import describe, get_method
from melora_tune.data import load_task
from melora_tune.errors import UsageError
from melora_tune.records import read
from melora_tune.records.inputs import task_inputs
from melora_tune.records import DEFAULT_STORAGE_PATH
from melora_tune.records import (
    CELL_TAG, CONFIG_TAG, CONFIRM_DIR, CONFIRM_KIND, CONFIRM_SPLITS, CONFIRMS_TAG, CONFIRMS_TRIAL_TAG, KIND_TAG,
    PARENT_TAG, SEARCH_TAG, SEED_TAG, SCORE_METRIC_PARAM, STATUS_TAG, TEST_SCORE, TRIAL_TAG, VAL_SCORE, baseline_metric,
    cell_label,
)
from melora_tune.search.experiment import find_latest, plan_paths, read_meta, resolve_space
from melora_tune.search.model_registry import register_safely
from melora_tune.search.resources import reuse_actors, trial_resources
from melora_tune.search.searcher import ENDED_STATUSES
from melora_tune.search.space import build_space
from melora_tune.search.tracking import MlflowTrialCallback, log_params_once, trial_params
from melora_tune.trial import ray_env, tune_trial
from melora_tune.trial.baselines import compute_baselines
from melora_tune.trial.config import TRIAL_KEY, TrialConfig

log = logging.getLogger("melora_tune.search")

CONFIRM_KEY = "confirm"  # the param_space key holding one planned confirmation (a grid over the plan)
DONE = ("completed", "diverged")  # a confirmation with this outcome is a result: never trained again


@dataclass(frozen=True)
class Planned:
    """One confirmation trial: a search trial's configuration with one new seed."""

    confirms: str  # MLflow run id of the search trial
    confirms_trial: str  # its Ray trial id
    config_key: str  # describe(sampled): the same for every seed of the configuration
    method: str
    seed: int
    sampled: dict[str, Any]  # method, its hyperparameters, lr, alpha, dropout: what TrialConfig.from_sampled merges
    adapter_params: int = 0
    search_score: float = math.nan
    budget: int | None = None  # the cell's level (None: the search's one budget, as records before cells)

    @property
    def cell(self) -> str:
        return cell_label(self.method, self.budget) if self.budget is not None else self.method

    @property
    def key(self) -> tuple[str, int]:
        return (self.confirms, self.seed)

    def tune_config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConfirmResult:
    search: str
    experiments: list[str]
    planned: list[Planned]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per confirmation run (MLflow)
    baselines: dict[str, Any] = field(default_factory=dict)
    status: str = "finished"  # finished | interrupted
    wall_s: float = 0.0
    registered: list[dict[str, Any]] = field(default_factory=list)  # model versions (search.model_registry)


# ---- what to confirm -------------------------------------------------------------------------------

def seeds_for(space) -> list[int]:
    """New seeds, the same for every configuration (paired comparisons): the search's seed + 1 .. + S."""
    return [space.training.seed + i for i in range(1, space.confirm.seeds + 1)]


def sampled_values(row, method) -> dict[str, Any]:
    """A search trial's sampled values from its MLflow row: what ``TrialConfig.from_sampled`` takes."""
    exact = read.exact_params(row)  # Ray's params.json: the exact float lr when the checkpoint is local
    out: dict[str, Any] = {"method": method.name}
    for key in method.hyperparams:
        value = row.get(key)
        if value is not None and not _isna(value):
            out[key] = int(value)
    for key in ("lr", "alpha", "dropout"):
        value = exact.get(key, row.get(key))
        if value is not None and not _isna(value):
            out[key] = float(value)
    return out


def _isna(value) -> bool:
    try:
        return bool(value != value)  # NaN / pandas NA
    except TypeError:
        return True


def trial_cells(methods, trials) -> list[tuple[str, int | None]]:
    """The cells the trials fall in, ``methods``' order then ascending level; a trial without a level (records
    before cells) is its method's one cell, (method, None)."""
    out = []
    for method in methods:
        levels = {None if _isna(b) else int(b) for b in trials.loc[trials["method"] == method, "budget"]} \
            if "budget" in trials else {None}
        out += [(method, level) for level in sorted(levels, key=lambda b: (b is not None, b or 0))]
    return out


def plan(space, trials, *, top_k: int | None = None, seeds: list[int] | None = None) -> list[Planned]:
    """The confirmations of a search: the top-k scored trials of each cell (the search's ranking) x the seeds, the
    same seeds for every cell."""
    top_k = top_k or space.confirm.top_k
    seeds = seeds or seeds_for(space)
    ranked = read.rank_trials(trials)
    out: list[Planned] = []
    cells = trial_cells(space.methods, ranked)
    # One configuration can fit two neighbouring levels (min_fraction): its key names the level, so the seeds of
    # two cells never pool into one configuration.
    several = len({level for _, level in cells if level is not None}) > 1
    for method_name, level in cells:
        mine = ranked[ranked["method"] == method_name]
        if "budget" in mine:
            mine = mine[mine["budget"].isna()] if level is None else mine[mine["budget"] == level]
        method = get_method(method_name)
        seen: set[str] = set()
        for _, row in mine.iterrows():
            if len(seen) >= top_k:
                break
            sampled = sampled_values(row.to_dict(), method)
            key = f"{describe(sampled)} @{level}" if several else describe(sampled)
            if key in seen:  # TPE can sample one configuration twice: confirm it once
                continue
            seen.add(key)
            for seed in seeds:
                out.append(Planned(confirms=str(row["run_id"]), confirms_trial=str(row["trial_id"]), config_key=key,
                                   method=method_name, seed=int(seed), sampled=sampled,
                                   adapter_params=int(row["adapter_params"]) if not _isna(row["adapter_params"]) else 0,
                                   search_score=float(row["score"]), budget=level))
    return out


def confirmation_runs(mlf, search) -> list:
    """The confirmation runs among the search's child runs (``records.read``'s own reading of them)."""
    return [r for r in read.child_runs(mlf, search) if read.is_confirmation(r)]


def done_keys(mlf, search) -> set[tuple[str, int]]:
    out = set()
    for run in confirmation_runs(mlf, search):
        tags = run.data.tags
        if tags.get(STATUS_TAG) in DONE and tags.get(SEED_TAG, "").lstrip("-").isdigit():
            out.add((tags.get(CONFIRMS_TAG), int(tags[SEED_TAG])))
    return out


# ---- the Tune trainable ----------------------------------------------------------------------------

def confirm_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: a search trial's configuration with a new seed, scored on test at the end."""
    item = config[CONFIRM_KEY]
    base = dict(config[TRIAL_KEY])
    base["training"] = {**base["training"], "seed": int(item["seed"]), "score_test": True}
    tune_trial(TrialConfig.from_sampled(base, item["sampled"]))


def confirm_dirname(trial) -> str:
    return f"confirm_{trial.trial_id}"


class ConfirmTrackingCallback(MlflowTrialCallback):
    """The search's trial callback, for confirmations: one child run per (trial confirmed, seed), found again
    by those tags on resume; the parent's best-score metrics stay the search's."""

    DRILL = "confirm"

    def _flat(self, trial) -> dict[str, Any]:
        item = trial.config.get(CONFIRM_KEY) or {}
        base = dict(trial.config.get(TRIAL_KEY) or {})
        base["training"] = {**(base.get("training") or {}), "seed": item.get("seed")}
        return {**item.get("sampled", {}), "adapter_params": item.get("adapter_params"), TRIAL_KEY: base}

    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        item = trial.config[CONFIRM_KEY]
        query = (f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{CONFIRMS_TAG}` = '{item['confirms']}' "
                 f"and tags.`{SEED_TAG}` = '{item['seed']}'")
        found = self.mlf.search_runs([self.experiment_id], query, max_results=5)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.mlf.update_run(run_id, status="RUNNING")
                self.mlf.set_tag(run_id, STATUS_TAG, "running")
            history = self.mlf.get_metric_history(run_id, "epoch")
            self._last_step[tid] = max((m.step for m in history), default=-1)
        else:
            tags = {PARENT_TAG: self.parent_run_id, KIND_TAG: CONFIRM_KIND, CONFIRMS_TAG: item["confirms"],
                    CONFIRMS_TRIAL_TAG: item["confirms_trial"], CONFIG_TAG: item["config_key"], SEED_TAG: str(item["seed"]),
                    STATUS_TAG: "running", SEARCH_TAG: self.search_name, TRIAL_TAG: tid,
                    CELL_TAG: cell_label(item["sampled"]["method"], self._budget(item))}
            run = self.mlf.create_run(self.experiment_id, run_name=f"confirm {describe(item['sampled'])} seed {item['seed']}",
                                      tags=tags)
            run_id = run.info.run_id
            drill.point(f"{self.DRILL}.mlflow_create")
            self._last_step[tid] = -1
        self._runs[tid] = run_id
        log_params_once(self.mlf, run_id, trial_params(self._flat(trial), self._budget(item), self.min_fraction))
        self.log_inputs(run_id)
        return run_id

    def _budget(self, item: dict[str, Any]) -> int:
        # the cell's level; a plan pickled before cells existed (a resumed confirm) has none: the search's budget
        return int(item.get("budget") or self.budget)

    def _finish(self, trials, trial, status: str, reason: str | None) -> None:
        if status == "stopped_early":  # no scheduler stops a confirmation: a report short of max_t means interrupted
            status = "interrupted"
        super()._finish(trials, trial, status, reason)

    def _update_parent(self, trials) -> None:
        done = sum(1 for t in trials if str(t.status) in ENDED_STATUSES)
        self.mlf.log_batch(self.parent_run_id, metrics=[Metric("confirmations_done", float(done), int(time.time() * 1000), done)])


class ConfirmProgress(Callback):
    """One line per event: ``[elapsed] confirm <config> seed S: epoch E/T val V``, then ``done: val V test T``."""

    def __init__(self, total: int, max_t: int, write: Callable[[str], None] | None = None) -> None:
        self.total, self.max_t, self.write = total, max_t, write
        self.t0 = time.time()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "write": None}

    def _print(self, text: str) -> None:
        line = f"[{time.time() - self.t0:6.0f}s] {text}"
        (self.write or (lambda s: print(s, flush=True)))(line)

    @staticmethod
    def _name(trial) -> str:
        item = trial.config.get(CONFIRM_KEY) or {}
        return f"confirm {item.get('config_key', '?')} seed {item.get('seed', '?')}"

    def on_trial_start(self, iteration, trials, trial, **info):
        done = sum(1 for t in trials if str(t.status) == "TERMINATED")
        self._print(f"{self._name(trial)}: start ({done}/{self.total} done)")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == "diverged":
            self._print(f"{self._name(trial)}: diverged: {result.get('reason')}")
        elif "test_score" in result:
            self._print(f"{self._name(trial)}: done: val {result.get('val_score', math.nan):.4f} test {result['test_score']:.4f}")
        else:
            self._print(f"{self._name(trial)}: epoch {result.get('epoch', 0):g}/{self.max_t} val {result.get('score', math.nan):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(f"{self._name(trial)}: failed")


# ---- running it ------------------------------------------------------------------------------------

def _confirm_dirs(exp_dir: Path) -> list[Path]:
    def index(p: Path) -> int:
        tail = p.name.removeprefix(CONFIRM_DIR).lstrip("-")
        return int(tail) if tail.isdigit() else 1

    found = [p for p in exp_dir.glob(f"{CONFIRM_DIR}*") if p.is_dir() and any(p.glob("experiment_state*.json"))]
    return sorted(found, key=index)


def _tuner(space, trainable, param_space, storage: str, name: str, callbacks, restore: bool, concurrent: int):
    if restore:
        tuner = tune.Tuner.restore(storage.rstrip("/") + "/" + name, trainable=trainable, resume_errored=True)
        internal = getattr(tuner, "_local_tuner", None)
        if internal is not None:  # callbacks come back pickled: give the restored run fresh ones
            internal._run_config.callbacks = callbacks
            internal._run_config.verbose = 0
        return tuner
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=concurrent,
                                    trial_dirname_creator=confirm_dirname, reuse_actors=reuse_actors(space)),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks, verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the final model: the one scored on test
            failure_config=tune.FailureConfig(max_failures=space.resources.max_failures),
        ),
    )


def log_baselines(mlf, parent_run_id: str, cfg: TrialConfig, write, task=None) -> dict[str, Any]:
    """Compute the baselines on the search's splits once and log them on the parent run (kept on resume);
    ``task``: the task already loaded (else loaded here)."""
    have = mlf.get_run(parent_run_id).data.metrics
    if baseline_metric("probe", "val") in have:
        return {k: v for k, v in have.items() if k.startswith("baseline.") or k == "majority_share"}
    result = compute_baselines(cfg, task=task)
    metrics = result.to_metrics()
    now = int(time.time() * 1000)
    mlf.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    if SCORE_METRIC_PARAM not in mlf.get_run(parent_run_id).data.params:
        mlf.log_batch(parent_run_id, params=[Param(SCORE_METRIC_PARAM, result.metric)])
    (write or print)(f"baselines on the same splits: {result.describe()}")
    return metrics


def run_confirm(
    space,
    *,
    storage_path: str | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    top_k: int | None = None,
    seeds: int | None = None,
    write: Callable[[str], None] | None = None,
    spec=None,
) -> ConfirmResult:
    """Confirm a finished (or interrupted) search of ``space``: the newest of this space under the storage
    path, or ``name``. Safe to run again: completed confirmations are kept, interrupted ones resume."""
    t0 = time.time()
    space, _, _ = resolve_space(space)
    if top_k is not None or seeds is not None:
        changes = {k: v for k, v in (("top_k", top_k), ("seeds", seeds)) if v is not None}
        for key, value in changes.items():
            if value < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        space = space.model_copy(update={"confirm": space.confirm.model_copy(update=changes)})
    if space.task.test_fraction == 0:
        raise UsageError(
            f"cannot confirm {space.name}: confirmations score the test split and task.test_fraction is 0 (no test split); "
            "a search needs task.test_fraction > 0 from the start to be confirmed"
        )
    ray_env.start_timeout(space.ray_start_timeout_s)  # a bad MELORA_RAY_START_TIMEOUT_S: one line before anything runs
    feasible = build_space(space, spec=spec)
    root = storage_path or space.storage_path or DEFAULT_STORAGE_PATH
    if name is None and "://" not in root and find_latest(Path(root).expanduser().resolve(), space.name) is None:
        raise UsageError(f"nothing to confirm: no search of {space.name!r} under {Path(root).expanduser().resolve()}: "
                         "run melora-tune search with this space first (or give --storage-path / --name)")
    storage, exp_name, exp_dir = plan_paths(space, storage_path=storage_path, name=name, resume=True)
    meta = read_meta(exp_dir)
    if not meta.get("parent_run_id"):
        raise UsageError(f"{exp_dir} holds no search record ({exp_dir and exp_dir.name}): run the search first")
    uri = read.tracking_uri(tracking_uri or space.tracking_uri or meta.get("tracking_uri"))
    mlf = read.client(uri)
    experiment_id, parent = meta["mlflow_experiment_id"], meta["parent_run_id"]
    search = read.SearchInfo.from_run(mlf.get_run(parent), space.task.name)
    planned = plan(space, read.trials_frame(mlf, search))  # trials only: trials_frame leaves confirmations out
    if not planned:
        raise UsageError(f"search {exp_name} has no scored trial to confirm (completed or stopped early)")
    base_cfg = space.base_trial(feasible.target_modules, feasible.modules_to_save)
    base = base_cfg.to_dict()  # Tune's param_space: plain JSON
    concurrent = space.confirm.max_concurrent_trials or space.max_concurrent_trials
    result = ConfirmResult(search=exp_name, experiments=[], planned=planned)

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    loaded: dict[str, Any] = {}

    def load_the_task():
        loaded["task"] = load_task(base_cfg.task_spec())
        return loaded["task"]

    inputs = task_inputs(load_the_task, CONFIRM_SPLITS)  # once, on the driver: the same entries on every run
    started = ray_env.start_ray(address, verbose=False, timeout_s=space.ray_start_timeout_s)
    try:
        result.baselines = log_baselines(mlf, parent, base_cfg, write, task=loaded.get("task"))
        drill.point("confirm.planned")
        trainable = tune.with_resources(confirm_trial, trial_resources(space))

        def callbacks(total):
            return [ConfirmTrackingCallback(uri, experiment_id, parent, budget=feasible.budget,
                                            min_fraction=feasible.min_fraction, max_t=space.max_t, search_name=exp_name,
                                            inputs=inputs),
                    ConfirmProgress(total, space.max_t, write)]

        exp_path = Path(storage) / exp_name
        existing = _confirm_dirs(exp_path)
        if existing:  # an earlier call's experiment: finish what it left (finished trials are not rerun)
            last = existing[-1]
            grid = _tuner(space, trainable, None, str(exp_path), last.name, callbacks(len(planned)), True, concurrent).fit()
            result.experiments.append(last.name)
            if _interrupted(grid):
                result.status = "interrupted"
                return _finish(result, mlf, search, t0)
        done = done_keys(mlf, search)
        missing = [p for p in planned if p.key not in done]
        if missing:
            name_next = CONFIRM_DIR if not existing else f"{CONFIRM_DIR}-{len(existing) + 1}"
            param_space = {TRIAL_KEY: base, CONFIRM_KEY: tune.grid_search([p.tune_config() for p in missing])}
            grid = _tuner(space, trainable, param_space, str(exp_path), name_next, callbacks(len(missing)), False,
                          concurrent).fit()
            result.experiments.append(name_next)
            if _interrupted(grid):
                result.status = "interrupted"
        if result.status == "finished":  # each method's winner in the Model Registry
            result.registered = register_safely(mlf, search, space.task.name, feasible.budget, base_cfg, write)
        return _finish(result, mlf, search, t0)
    finally:
        if started:
            ray.shutdown()


def _interrupted(grid) -> bool:
    try:
        return any(str(t.status) not in ENDED_STATUSES for t in grid._experiment_analysis.trials)
    except Exception:  # noqa: BLE001
        return False


def _finish(result: ConfirmResult, mlf, search, t0: float) -> ConfirmResult:
    for run in confirmation_runs(mlf, search):
        tags, metrics = run.data.tags, run.data.metrics
        result.rows.append({
            "run_id": run.info.run_id, "confirms": tags.get(CONFIRMS_TAG), "config": tags.get(CONFIG_TAG),
            "seed": int(tags.get(SEED_TAG, -1)), "status": tags.get(STATUS_TAG), "method": run.data.params.get("method"),
            "cell": tags.get(CELL_TAG) or run.data.params.get("method"),
            "val_score": metrics.get(VAL_SCORE), "test_score": metrics.get(TEST_SCORE),
        })
    result.rows.sort(key=lambda r: (r["method"] or "", r["cell"] or "", r["config"] or "", r["seed"]))
    result.wall_s = time.time() - t0
    return result


def summary_lines(result: ConfirmResult) -> list[str]:
    """Per configuration (grouped by cell): seeds, validation and test mean ± std (the report adds the intervals)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in result.rows:
        if row["status"] == "completed":
            groups.setdefault((row["cell"], row["config"]), []).append(row)
    lines = []
    for (_, config), rows in sorted(groups.items()):
        parts = []
        for key, label in (("val_score", "val"), ("test_score", "test")):
            values = [r[key] for r in rows if r[key] is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else math.nan
                parts.append(f"{label} {statistics.fmean(values):.4f} ± {sd:.4f}")
        lines.append(f"  {config}: {len(rows)} seed(s), " + ", ".join(parts))
    return lines
