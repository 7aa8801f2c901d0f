"""Read a search back from MLflow: its parent run, its trials as a DataFrame, the best trial per method.

What a search records (``melora_tune.search.tracking``): one MLflow experiment per
task (the dataset), one parent run per search (tag ``melora.kind=search``, the
space file as artifact ``space/<file>.yaml``), one child run per trial (tag
``mlflow.parentRunId``; params method/n/r/u/m/lr/alpha/...; metric ``score`` per
evaluation and ``best_score`` of the best checkpoint; tag ``melora.status``;
artifact ``adapter/``).

Confirmations (``melora-tune confirm``) are child runs of the same parent tagged
``melora.kind=confirmation``: ``trials_frame`` leaves them out (they retrain a trial, they are not
one), ``confirmations_frame`` reads them; ``baselines_of`` reads the baselines the parent run holds.
``records.schema`` documents every name read here.

Ranking, the same rule the search itself uses for its summary: trials that
reached the full number of epochs (``completed``) before trials ASHA stopped
early (``stopped_early``), then the final ``score``, then ``best_score``;
ties go to the trial that started first. Failed, diverged and interrupted
trials are never "best".
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora_tune.adapters.hyperparams import HYPERPARAMS
from melora_tune.errors import UsageError

# Metric and param names of confirmations and of the parent run (records.schema).
from melora_tune.records import (  # noqa: F401  (re-exported for callers of the report API)  # noqa: E402
    BASELINES,
    BUDGET_PARAM,
    CELL_TAG,
    CHECKPOINT_TAG,
    CONFIG_TAG,
    CONFIRM_KIND,
    CONFIRMS_TAG,
    CONFIRMS_TRIAL_TAG,
    DEFAULT_TRACKING_URI,
    KIND_TAG,
    MAJORITY_SHARE,
    META_NAME,
    OPTUNA_TAG,
    PARENT_TAG,
    REASON_TAG,
    SCORE_METRIC_PARAM,
    SCORED,
    SEARCH_KIND,
    SEARCH_TAG,
    SEED_PARAM,
    SEED_TAG,
    STATUS_TAG,
    TEST_SCORE,
    TRIAL_TAG,
    VAL_SCORE,
    baseline_metric,
    INFEASIBLE_PARAM,
    LEVELS_PARAM,
    cell_label,
    finite,
    parse_infeasible,
)
from melora_tune.records.store import check_server, normalize_tracking_uri, tracking_scheme

DEFAULT_SCORE_METRIC = "score"  # a search that logged no score_metric (older searches)
SPLITS = ("val", "test")

FLOAT_COLUMNS = ("lr", "alpha", "dropout", "score", "best_score", "epoch", "val_score", "test_score")


# The columns follow the registered hyperparameters (adapters.hyperparams: n, r, u, m, m_b, then a plug-in's own),
# so they are read when asked for: HP_COLUMNS, INT_COLUMNS, COLUMNS and CONFIRM_COLUMNS are live views.
def hp_columns() -> tuple[str, ...]:
    return tuple(HYPERPARAMS)


def int_columns() -> tuple[str, ...]:
    return ("optuna_trial", *hp_columns(), "equivalent_rank", "adapter_params", "seed", "budget")


def trial_columns() -> tuple[str, ...]:
    """The columns of ``trials_frame``."""
    return (
        "run_id", "run_name", "trial_id", "optuna_trial", "method", "budget", "cell", *hp_columns(), "lr", "alpha",
        "dropout", "equivalent_rank", "adapter_params", "score", "best_score", "epoch", "status", "reason", "mlflow_status",
        "start_time", "duration_s", "best_checkpoint",
    )


def confirm_columns() -> tuple[str, ...]:
    """The columns of ``confirmations_frame``."""
    return (
        "run_id", "run_name", "confirms", "confirms_trial", "config", "method", "budget", "cell", *hp_columns(), "lr",
        "alpha", "dropout",
        "equivalent_rank", "adapter_params", "seed", "status", "mlflow_status", "val_score", "test_score", "score",
        "epoch", "start_time", "duration_s", "best_checkpoint",
    )


_LIVE = {"HP_COLUMNS": hp_columns, "INT_COLUMNS": int_columns, "COLUMNS": trial_columns, "CONFIRM_COLUMNS": confirm_columns}


def __getattr__(name: str):
    if name in _LIVE:
        return _LIVE[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tracking_uri(uri: str | None) -> str:
    """The user's URI (default ``sqlite:///mlflow.db``) made absolute; a missing SQLite file is a usage error
    (MLflow would silently create an empty store)."""
    uri = normalize_tracking_uri(uri or DEFAULT_TRACKING_URI)
    kind = tracking_scheme(uri)  # an unknown scheme would reach MlflowClient and fail there with a traceback
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise UsageError(f"no MLflow database at {db}: run a search first, or pass --tracking-uri sqlite:///path/to/mlflow.db")
    elif kind in ("http", "https"):
        check_server(uri)  # MLflow's client would retry for minutes, then raise
    return uri


def client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads here are a few small files
    from mlflow import MlflowClient  # heavy: MLflow (~2 s), loaded where records are read or written

    return MlflowClient(tracking_uri=uri)


@dataclass
class SearchInfo:
    """A search's parent run."""

    run_id: str
    name: str
    experiment_id: str
    experiment_name: str
    status: str  # melora.status: running | finished | failed | interrupted
    mlflow_status: str
    start_time: int | None
    end_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run, experiment_name: str) -> "SearchInfo":
        tags = dict(run.data.tags)
        return cls(
            run_id=run.info.run_id,
            name=tags.get(SEARCH_TAG) or run.info.run_name or run.info.run_id,
            experiment_id=run.info.experiment_id,
            experiment_name=experiment_name,
            status=tags.get(STATUS_TAG, "?"),
            mlflow_status=run.info.status,
            start_time=run.info.start_time,
            end_time=run.info.end_time,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=tags,
        )


def _all_runs(mlf, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    out, token = [], None
    while True:
        page = mlf.search_runs(experiment_ids, filter_string, max_results=1000, order_by=order_by, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def searched_datasets(mlf) -> list[str]:
    """Names of the experiments (datasets) that hold at least one search, sorted."""
    from mlflow.entities import ViewType  # heavy: MLflow (~2 s), loaded where records are read or written

    names = []
    for exp in mlf.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if mlf.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = '{SEARCH_KIND}'", max_results=1):
            names.append(exp.name)
    return sorted(names)


def experiment(mlf, dataset: str):
    exp = mlf.get_experiment_by_name(dataset)
    if exp is None or exp.lifecycle_stage == "deleted":
        known = searched_datasets(mlf)
        hint = f"datasets with searches: {', '.join(known)}" if known else "this tracking store holds no search yet"
        raise UsageError(f"no MLflow experiment named {dataset!r} ({hint})")
    return exp


def list_searches(mlf, experiment_id: str) -> list:
    """Parent runs of the experiment's searches, newest first."""
    return _all_runs(mlf, [experiment_id], f"tags.`{KIND_TAG}` = '{SEARCH_KIND}'", order_by=["attributes.start_time DESC"])


def resolve_search(mlf, dataset: str, search: str | None = None) -> SearchInfo:
    """The search ``search`` (a parent run id, or a search name) of ``dataset``; default: the newest."""
    exp = experiment(mlf, dataset)
    if search is None:
        runs = list_searches(mlf, exp.experiment_id)
        if not runs:
            raise UsageError(f"experiment {dataset!r} has no search (no run tagged melora.kind=search)")
        return SearchInfo.from_run(runs[0], exp.name)
    run = None
    try:
        run = mlf.get_run(search)
    except Exception:  # noqa: BLE001  (not a run id: maybe a search name)
        run = None
    if run is None:
        quoted = search.replace("'", "")
        found = _all_runs(mlf, [exp.experiment_id], f"tags.`{KIND_TAG}` = '{SEARCH_KIND}' and tags.`{SEARCH_TAG}` = '{quoted}'",
                          order_by=["attributes.start_time DESC"])
        if not found:
            raise UsageError(f"--search {search!r}: no parent run with that id or search name in experiment {dataset!r}")
        run = found[0]
    if run.info.experiment_id != exp.experiment_id:
        raise UsageError(f"--search {search}: that run belongs to another experiment, not {dataset!r}")
    if run.data.tags.get(KIND_TAG) != SEARCH_KIND:
        parent = run.data.tags.get(PARENT_TAG)
        hint = f" (it is a trial of search run {parent})" if parent else ""
        raise UsageError(f"--search {search}: not the parent run of a search{hint}")
    return SearchInfo.from_run(run, exp.name)


def as_number(value: Any) -> float:
    """A record's value as a float (NaN when it is missing or not a number)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def search_budget(search: SearchInfo) -> int | None:
    """The parent run's ``budget`` param as an int (a single-level search's one level), or None."""
    value = as_number(search.params.get(BUDGET_PARAM))
    return int(round(value)) if math.isfinite(value) else None


def levels_of(search: SearchInfo) -> list[int]:
    """The search's budget levels, ascending: the parent's ``budget_levels`` param, else its one ``budget``."""
    text = search.params.get(LEVELS_PARAM)
    if text:
        values = [as_number(v) for v in str(text).split(",")]
        levels = sorted({int(round(v)) for v in values if math.isfinite(v)})
        if levels:
            return levels
    budget = search_budget(search)
    return [budget] if budget is not None else []


def infeasible_of(search: SearchInfo) -> dict[tuple[str, int], str]:
    """{(method, level): why it has no configuration} from the parent's ``infeasible_cells`` param."""
    return parse_infeasible(search.params.get(INFEASIBLE_PARAM))


def run_cell(run, search: SearchInfo) -> dict[str, Any]:
    """{budget, cell} of a trial or confirmation run: its ``budget`` param (else the search's one budget, as
    records before cells have it) and its ``melora.cell`` tag (else ``<method>@<budget>``)."""
    value = as_number(run.data.params.get(BUDGET_PARAM))
    budget = int(round(value)) if math.isfinite(value) else search_budget(search)
    method = run.data.params.get("method", "?")
    cell = run.data.tags.get(CELL_TAG) or (cell_label(method, budget) if budget is not None else method)
    return {"budget": budget, "cell": cell}


def is_confirmation(run) -> bool:
    return run.data.tags.get(KIND_TAG) == CONFIRM_KIND


def child_runs(mlf, search: SearchInfo) -> list:
    """Every child run of the search's parent: its trials and its confirmations."""
    return _all_runs(mlf, [search.experiment_id], f"tags.`{PARENT_TAG}` = '{search.run_id}'")


def trials_frame(mlf, search: SearchInfo):
    """One row per trial (child run that is not a confirmation) of the search; columns ``COLUMNS``."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    # Filtered here, not in the query: MLflow's `tags.x != 'y'` also drops runs that lack the tag, which
    # every trial does.
    runs = [run for run in child_runs(mlf, search) if not is_confirmation(run)]
    rows = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        start, end = run.info.start_time, run.info.end_time
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "trial_id": t.get(TRIAL_TAG),
            "optuna_trial": t.get(OPTUNA_TAG, p.get("optuna_trial")),
            "method": p.get("method", "?"),
            **run_cell(run, search),
            **{k: p.get(k) for k in (*hp_columns(), "lr", "alpha", "dropout", "equivalent_rank", "adapter_params")},
            "score": m.get("score"),
            "best_score": m.get("best_score"),
            "epoch": m.get("epoch"),
            "status": t.get(STATUS_TAG, "?"),
            "reason": t.get(REASON_TAG),
            "mlflow_status": run.info.status,
            "start_time": start,
            "duration_s": (end - start) / 1000.0 if start and end else None,
            "best_checkpoint": t.get(CHECKPOINT_TAG),
        })
    df = pd.DataFrame(rows, columns=list(trial_columns()))
    return normalize_frame(df)


def confirmations_frame(mlf, search: SearchInfo):
    """One row per confirmation run of the search (columns ``CONFIRM_COLUMNS``), oldest first.

    ``confirms`` is the MLflow run id of the search trial it retrains, ``config`` the key its seeds share;
    ``val_score`` / ``test_score`` are the final scores on validation and test (NaN until it finished).
    """
    import pandas as pd  # heavy: pandas, loaded where tables are built

    rows = []
    for run in (r for r in child_runs(mlf, search) if is_confirmation(r)):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        start, end = run.info.start_time, run.info.end_time
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "confirms": t.get(CONFIRMS_TAG),
            "confirms_trial": t.get(CONFIRMS_TRIAL_TAG),
            "config": t.get(CONFIG_TAG),
            "method": p.get("method", "?"),
            **run_cell(run, search),
            **{k: p.get(k) for k in (*hp_columns(), "lr", "alpha", "dropout", "equivalent_rank", "adapter_params")},
            "seed": t.get(SEED_TAG, p.get(SEED_PARAM)),
            "status": t.get(STATUS_TAG, "?"),
            "mlflow_status": run.info.status,
            "val_score": m.get(VAL_SCORE),
            "test_score": m.get(TEST_SCORE),
            "score": m.get("score"),
            "epoch": m.get("epoch"),
            "start_time": start,
            "duration_s": (end - start) / 1000.0 if start and end else None,
            "best_checkpoint": t.get(CHECKPOINT_TAG),
        })
    df = normalize_frame(pd.DataFrame(rows, columns=list(confirm_columns())))
    return df.sort_values("start_time", kind="mergesort").reset_index(drop=True)


@dataclass
class Baselines:
    """What the parent run holds besides the trials: the baselines' scores, the class balance, the metric."""

    scores: dict[str, dict[str, float]]  # {name: {"val": x, "test": y}}, names in BASELINES order, finite values only
    majority_share: float | None  # the validation split's most common class's share (None: not logged)
    score_metric: str  # what the search maximises ("score" when the search did not say)
    logged: bool = True  # whether the parent run held any of it (searches before baselines existed did not)

    def split(self, split: str) -> dict[str, float]:
        """{name: score} of the baselines that have a score on ``split``."""
        return {name: s[split] for name, s in self.scores.items() if split in s}


def baselines_of(search: SearchInfo) -> Baselines:
    """The baselines (``BASELINES``) logged on the search's parent run, ``majority_share`` and ``score_metric``."""
    scores = {}
    for name in BASELINES:
        got = {split: float(search.metrics[baseline_metric(name, split)]) for split in SPLITS
               if finite(search.metrics.get(baseline_metric(name, split)))}
        if got:
            scores[name] = got
    share = search.metrics.get(MAJORITY_SHARE)
    metric = search.params.get(SCORE_METRIC_PARAM)
    return Baselines(scores, float(share) if finite(share) else None, metric or DEFAULT_SCORE_METRIC,
                     logged=bool(scores) or finite(share) or bool(metric))


def curves_frame(mlf, trials, metric: str = "score"):
    """``metric`` (the score by default; eval_perplexity for a causal LM's curves) at every evaluation of every
    trial: columns run_id, method, status, step, epoch, score (holding ``metric``).

    Both ``metric`` and ``epoch`` are logged at the trial's global step, so the epoch of an evaluation is the
    ``epoch`` metric at the same step; an evaluation whose step has no epoch is left out (it has no x).
    Ordered by trial (as ``trials``) then step.
    """
    import pandas as pd  # heavy: pandas, loaded where tables are built

    columns = ["run_id", "method", "status", "step", "epoch", "score"]
    rows = []
    for trial in trials.itertuples(index=False):
        epochs = {m.step: m.value for m in mlf.get_metric_history(trial.run_id, "epoch")}
        for m in sorted(mlf.get_metric_history(trial.run_id, metric), key=lambda m: m.step):
            if m.step in epochs and math.isfinite(m.value):
                rows.append((trial.run_id, trial.method, trial.status, m.step, epochs[m.step], m.value))
    return pd.DataFrame(rows, columns=columns).astype({"step": "int64", "epoch": float, "score": float})


def score_histories(mlf, run_ids, metric: str = "score") -> dict[str, list[float]]:
    """{run id: its finite ``metric`` values in step order} (a confirmation's validation score per evaluation)."""
    out = {}
    for run_id in run_ids:
        history = sorted(mlf.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
        out[run_id] = [m.value for m in history if math.isfinite(m.value)]
    return out


def normalize_frame(df):
    """Numeric dtypes for the parameter and metric columns (params come back from MLflow as strings)."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    df = df.copy()
    for col in int_columns():
        if col in df:
            df[col] = pd.to_numeric(df[col].map(as_number), errors="coerce").round().astype("Int64")
    for col in FLOAT_COLUMNS:
        if col in df:
            df[col] = pd.to_numeric(df[col].map(as_number), errors="coerce").astype(float)
    return df


def rank_trials(df):
    """Scored trials (completed / stopped early, finite score) best first, with a 1-based ``rank`` column."""
    import numpy as np  # heavy: numpy, loaded where arrays are used

    scored = df[df["status"].isin(SCORED) & np.isfinite(df["score"].astype(float))].copy()
    scored["_full"] = scored["status"] == "completed"
    scored["_best"] = scored["best_score"].fillna(-np.inf)
    scored["_start"] = scored["start_time"].fillna(0) if "start_time" in scored else 0
    scored = scored.sort_values(["_full", "score", "_best", "_start"], ascending=[False, False, False, True], kind="mergesort")
    scored = scored.drop(columns=["_full", "_best", "_start"])
    scored.insert(0, "rank", range(1, len(scored) + 1))
    return scored.reset_index(drop=True)


def best_per_method(df):
    """The best trial of each method (the first row of each method in ``rank_trials`` order)."""
    ranked = rank_trials(df)
    return ranked.groupby("method", sort=False, as_index=False).head(1).reset_index(drop=True)


def best_per_cell(df):
    """The best trial of each cell (method, budget level), in ``rank_trials`` order; one level: ``best_per_method``."""
    ranked = rank_trials(df)
    return ranked.groupby(["method", "budget"], sort=False, as_index=False, dropna=False).head(1).reset_index(drop=True)


def best_run(df, method: str | None = None, budget: int | None = None):
    """The best trial overall (or of ``method``, of the level ``budget``) as a row, or None."""
    ranked = rank_trials(df)
    if method is not None:
        ranked = ranked[ranked["method"] == method]
    if budget is not None:
        ranked = ranked[ranked["budget"] == int(budget)]
    return None if ranked.empty else ranked.iloc[0]


# ---- what else a search recorded ----------------------------------------------------------------

def study_location(search: SearchInfo, trials=None) -> dict[str, str] | None:
    """{study_name, optuna_storage} of the search's Optuna study, or None when it cannot be found.

    From the parent run's params when the search logged them, else from ``melora_search.json`` in the Ray
    experiment folder (found through the trials' best-checkpoint paths; local storage only).
    """
    p = search.params
    if p.get("optuna_storage") and p.get("study_name"):
        return {"study_name": p["study_name"], "optuna_storage": p["optuna_storage"], "source": "parent run params"}
    candidates: list[Path] = []
    if p.get("storage_path") and "://" not in p["storage_path"]:
        candidates.append(Path(p["storage_path"]) / search.name / META_NAME)
    if trials is not None and "best_checkpoint" in trials:
        for ckpt in trials["best_checkpoint"].dropna():
            if "://" not in str(ckpt):
                candidates.append(Path(ckpt).parent.parent / META_NAME)
    candidates.append(Path("melora_runs") / search.name / META_NAME)
    seen = set()
    for path in candidates:
        if path in seen:
            continue
        seen.add(path)
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("parent_run_id") == search.run_id and meta.get("optuna_storage") and meta.get("study_name"):
            return {"study_name": meta["study_name"], "optuna_storage": meta["optuna_storage"], "source": str(path)}
    return None


def space_artifact(mlf, run_id: str) -> tuple[str, str] | None:
    """(file name, YAML text) of the search space logged on a parent run, or None."""
    try:
        files = [a for a in mlf.list_artifacts(run_id, "space") if not a.is_dir and a.path.endswith((".yaml", ".yml"))]
    except Exception:  # noqa: BLE001
        return None
    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlf.download_artifacts(run_id, files[0].path, tmp)
        return Path(files[0].path).name, Path(local).read_text()


def exact_params(row) -> dict[str, Any]:
    """The trial's sampled values as Ray saved them (params.json next to its checkpoints), when local.
    MLflow keeps params as 6-significant-digit strings; this keeps the learning rate exact."""
    ckpt = row.get("best_checkpoint")
    if not isinstance(ckpt, str) or "://" in ckpt:
        return {}
    try:
        return json.loads((Path(ckpt).parent / "params.json").read_text())
    except (OSError, ValueError):
        return {}
