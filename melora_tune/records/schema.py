"""What a search writes and the report and export read back: one place for the names and the ranking rule.

MLflow, per dataset (experiment = the task name):

- a parent run per search: tags ``melora.kind=search``, ``melora.search`` (the search name),
  ``melora.status`` (running | finished | failed | interrupted); the space file as artifact
  ``space/<file>.yaml``; the report under ``report/``.
- a child run per trial: tag ``mlflow.parentRunId``, ``melora.trial_id`` (Ray's id, stable across
  ``--resume``), ``melora.optuna_trial``, ``melora.status`` (one of ``TRIAL_STATUSES``),
  ``melora.reason``, ``melora.best_checkpoint``; params method and its hyperparameters, lr, alpha,
  dropout, equivalent_rank, adapter_params, budget, ``training.*``; metric ``score`` per evaluation
  and ``best_score`` of the best checkpoint; artifact ``adapter/``.

- a child run per confirmation (``melora confirm``, or the search's ``confirm:`` stage): tags
  ``mlflow.parentRunId`` (the search's parent run), ``melora.kind=confirmation``,
  ``melora.confirms`` (the MLflow run id of the search trial it retrains), ``melora.confirms_trial``
  (that trial's Ray id), ``melora.config`` (the configuration's key: the same for every seed of one
  configuration), ``melora.seed``, ``melora.status``; the trial's params (``training.seed`` = its
  seed); metrics ``score`` per evaluation (validation), ``val_score`` (the final validation score),
  ``test_score`` and ``test_<metric>`` (the test split, scored once at the end: only confirmations
  ever see test); artifact ``adapter/``.
- on every trial and confirmation run: the task's splits as MLflow dataset inputs (``log_inputs``), named
  ``<task>/<split>`` with the input tag ``mlflow.data.context`` = the split (``train``, ``validation``; ``test``
  on confirmations only: a search trial never sees it), the source file or Hub id, a digest and the row count;
  and the machine's load as metrics ``system/<name>`` (``SYSTEM_PREFIX``: CPU, memory, GPU when there is one),
  sampled in the trial's process at every report, at the report's step.
- the Model Registry: one registered model per dataset (``registered_model_name``), one version per search and
  cell (a method at a budget) holding the confirmed winner's ``adapter/`` (native) and ``peft/`` (PEFT LoRA),
  created from the winning confirmation run's artifact ``registered/``; the alias ``cell_alias(method, budget)``
  points at the newest search's version; version tags ``REGISTRY_TAGS`` (search, cell, scores).
- on the parent run, the baselines on the same splits (``BASELINES``), as metrics
  ``baseline.<name>.<split>`` (split ``val`` | ``test``), in the task's score metric, and
  ``majority_share`` (the share of the validation split's most common class); params
  ``score_metric`` (what the search maximises) and ``confirm_*`` (the confirmation plan).

Next to the Ray experiment: ``melora_search.json`` (``META_NAME``: the parent run id, URIs, study);
the confirmations' Ray experiment is ``<experiment>/confirm``.
"""

from __future__ import annotations

import math
import re
from typing import Any


DEFAULT_STORAGE_PATH = "./melora_runs"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
META_NAME = "melora_search.json"

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "melora.kind"
SEARCH_KIND = "search"
STATUS_TAG = "melora.status"
SEARCH_TAG = "melora.search"
TRIAL_TAG = "melora.trial_id"
OPTUNA_TAG = "melora.optuna_trial"
CELL_TAG = "melora.cell"  # a trial's cell: <method>@<budget level> (its Optuna study; optuna_trial counts per cell)
REASON_TAG = "melora.reason"
CHECKPOINT_TAG = "melora.best_checkpoint"
CONFIRM_KIND = "confirmation"
CONFIRMS_TAG = "melora.confirms"
CONFIRMS_TRIAL_TAG = "melora.confirms_trial"
CONFIG_TAG = "melora.config"
SEED_TAG = "melora.seed"
VAL_SCORE = "val_score"  # a confirmation's final validation score
TEST_SCORE = "test_score"  # a confirmation's test score (only confirmations ever see test)
SEED_PARAM = "training.seed"  # a confirmation's seed, when the melora.seed tag is missing
MAJORITY_SHARE = "majority_share"  # on the parent run: the validation split's most common class's share
SCORE_METRIC_PARAM = "score_metric"  # on the parent run: what the search maximises
CONFIRM_DIR = "confirm"  # the confirmations' Ray experiment, inside the search's experiment folder
SYSTEM_PREFIX = "system/"  # metrics of the machine a trial ran on (MLflow's system-metrics names)
DATA_CONTEXT_TAG = "mlflow.data.context"  # a dataset input's tag: which split it is (MLflow's own key)
SEARCH_SPLITS = ("train", "validation")  # the splits a search trial logs as inputs (it never sees test)
CONFIRM_SPLITS = ("train", "validation", "test")  # a confirmation's
REGISTERED_ARTIFACT = "registered"  # the winning confirmation run's artifact folder a model version is made from
# model version tags: where the version comes from and what it scored
VERSION_SEARCH_TAG = SEARCH_TAG  # the search's name
VERSION_PARENT_TAG = "melora.search_run"  # the search's parent run id
VERSION_CELL_TAG = "melora.cell"  # the cell's alias: <method>-b<budget>
# A cell is (method, budget level), the unit of equal tuning effort: trial and confirmation runs carry it as the tag
# CELL_TAG = cell_label(method, level) ("melora@9216") and the param ``budget`` (the level). The parent run of a
# search over several levels holds these params (a single-level search may lack them: its one level is ``budget``).
BUDGET_PARAM = "budget"  # on trials and confirmations: the cell's level; on the parent run: the search's (largest) level
LEVELS_PARAM = "budget_levels"  # comma list of ints, ascending
TRIALS_PER_CELL_PARAM = "trials_per_cell"
CELLS_PARAM = "cells"  # comma list of cell labels
INFEASIBLE_PARAM = "infeasible_cells"  # "dora@9216: <reason>; lora@64: <reason>" (absent: none)
VERSION_METHOD_TAG = "melora.method"
VERSION_BUDGET_TAG = "melora.budget"
REGISTRY_TAGS = (VERSION_SEARCH_TAG, VERSION_PARENT_TAG, VERSION_CELL_TAG, VERSION_METHOD_TAG, VERSION_BUDGET_TAG,
                 CONFIG_TAG, SEED_TAG, CONFIRMS_TAG, "seeds", "val_mean", "val_std", "test_mean", "test_std",
                 VAL_SCORE, TEST_SCORE)

# Reference points computed on the same splits: predict the training split's most common class; a
# logistic regression on the frozen model's pooled features (what the head sees before any training).
BASELINES = ("majority", "probe")
BASELINE_LABELS = {"majority": "majority class", "probe": "linear probe (frozen features)"}


def baseline_metric(name: str, split: str) -> str:
    """MLflow metric name of a baseline's score on a split (val | test)."""
    return f"baseline.{name}.{split}"

def dataset_input_name(task: str, split: str) -> str:
    """A split's name as an MLflow dataset input: ``rotten_tomatoes/train``, ``glue/sst2/validation``."""
    return f"{task}/{split}"


def registered_model_name(dataset: str) -> str:
    """The Model Registry's name for a dataset's confirmed winners: ``melora-<dataset>``, with anything MLflow
    refuses in a name ('/', ':') or a path ('.', spaces, ...) replaced by '-' (``glue/sst2`` -> ``melora-glue-sst2``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", dataset).strip("-") or "dataset"
    return f"melora-{cleaned}"


def cell_label(method: str, budget: int) -> str:
    """A cell's label in the records (tag ``CELL_TAG``, the parent's ``cells`` param, study names): ``melora@9216``."""
    return f"{method}@{int(budget)}"


CELL_RE = re.compile(r"([A-Za-z0-9_.-]+)@(\d+)")


def parse_cell(label: str) -> tuple[str, int] | None:
    """``melora@9216`` -> ("melora", 9216); anything else -> None."""
    found = CELL_RE.fullmatch(str(label).strip())
    return (found.group(1), int(found.group(2))) if found else None


def parse_infeasible(text: str | None) -> dict[tuple[str, int], str]:
    """The parent's ``infeasible_cells`` param as {(method, level): reason}. A reason may itself hold '; ', so the
    text is split only where the next cell label starts."""
    out: dict[tuple[str, int], str] = {}
    for part in re.split(r";\s*(?=[A-Za-z0-9_.-]+@\d+\s*:)", text or ""):
        label, _, reason = part.partition(":")
        cell = parse_cell(label)
        if cell is not None:
            out[cell] = reason.strip()
    return out


def cell_alias(method: str, budget: int) -> str:
    """A cell's alias in the registry: ``<method>-b<budget>`` (MLflow: word characters and '-' only, not
    'latest' nor 'v<digits>', which this never is)."""
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', method)}-b{int(budget)}"


# A trial's outcome: reached the last epoch / stopped by ASHA / NaN loss / crashed / the search stopped first.
TRIAL_STATUSES = ("completed", "stopped_early", "diverged", "failed", "interrupted")
SCORED = ("completed", "stopped_early")  # only these have a score that can be ranked


def finite(x: Any) -> bool:
    """A real, finite number (not a bool, None, NaN or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_scored(status: str | None, score: Any) -> bool:
    return status in SCORED and finite(score)


def rank_key(status: str | None, score: Any, best_score: Any = None) -> tuple[bool, float, float]:
    """The best-trial rule, larger is better: trials that reached the full number of epochs before trials
    ASHA stopped early (their score is from fewer epochs), then the final score, then the best checkpoint's.
    Ties go to the trial that started first (callers keep the earliest on equal keys). Only scored trials
    (``is_scored``) are ever ranked."""
    return (status == "completed", float(score) if finite(score) else -math.inf,
            float(best_score) if finite(best_score) else -math.inf)
