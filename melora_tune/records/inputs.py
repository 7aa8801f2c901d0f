"""A task's splits as MLflow dataset inputs: built once per search (or confirmation) on the driver from the task
it already loaded, then logged on every trial's run (``MlflowClient.log_inputs``; MLflow keeps one entry per
name and digest, so logging again on ``--resume`` adds nothing).

Each split is an ``mlflow.data`` pandas dataset: name ``<task>/<split>``, the source file (a local file or the
built-in corpus inside its package) or the Hub id, the digest MLflow computes from the rows, and the row count
(its profile); the input tag ``mlflow.data.context`` says which split it is.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from melora_tune.records.schema import DATA_CONTEXT_TAG, dataset_input_name

log = logging.getLogger("melora_tune.records")


def _source(task, split: str) -> Any:
    """The split's source: its local file (a validation file of a pair for ``validation``; MLflow resolves a path
    to its local-file source) or the Hub id."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource  # heavy: MLflow

    parts = [p.strip() for p in str(task.source or task.name).split(" + ") if p.strip()]
    if parts and all(os.path.isfile(p) for p in parts):
        path = parts[1] if split == "validation" and len(parts) > 1 else parts[0]
        return os.path.abspath(path)
    return HuggingFaceDatasetSource(path=parts[0] if parts else str(task.name))


def dataset_inputs(task, splits: tuple[str, ...]) -> list:
    """``DatasetInput`` entities of the task's ``splits`` (those it has), ready for ``MlflowClient.log_inputs``."""
    import mlflow.data  # heavy: MLflow
    from mlflow.entities import DatasetInput, InputTag  # heavy: MLflow

    out = []
    for split in splits:
        rows = task.splits.get(split) if hasattr(task.splits, "get") else None
        if rows is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's schema hints about integer label columns: not the user's business
            data = mlflow.data.from_pandas(rows.to_pandas(), source=_source(task, split),
                                           name=dataset_input_name(task.name, split))
            entity = data._to_mlflow_entity()
        out.append(DatasetInput(entity, tags=[InputTag(DATA_CONTEXT_TAG, split)]))
    return out


def task_inputs(load, splits: tuple[str, ...]) -> list:
    """``dataset_inputs`` of the task ``load()`` returns; [] with a warning when that fails (a record must never
    stop a search: a Hub dataset may be out of reach from the driver)."""
    try:
        return dataset_inputs(load(), splits)
    except Exception as exc:  # noqa: BLE001
        log.warning("the runs will not record their dataset inputs: %s", exc)
        return []
