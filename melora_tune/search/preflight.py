"""What a search start checks before it creates anything: ``search --dry-run`` and the real start run the same
``check_start``, so a dry run that passes means the start gets past every check that needs no Ray.

The checks themselves live with what they check: storage, addresses and names in ``trial.ray_env``, tracking
and Optuna stores in ``records.store``, the task's data in ``data``; each raises a one-line ``UsageError`` and
leaves nothing behind.
"""

from __future__ import annotations

from melora_tune.data import TaskSpec, load_task
from melora_tune.data.registry import BUILTIN_TASKS, INSTRUCT_TASKS, check_glue_task, glue_name, unknown_task
from melora_tune.data.tasks import is_local
from melora_tune.records.store import check_optuna_storage, check_tracking
from melora_tune.trial.ray_env import check_ray_address, check_storage, start_timeout


def check_task_data(space) -> None:
    """A local data file is read and checked now (columns, labels, empty text, splits), as ``train`` does before
    Ray starts; built-in and GLUE tasks are checked by name only (GLUE would download)."""
    spec = TaskSpec(**space.task.model_dump())
    if is_local(spec) or spec.name.strip().lower() in INSTRUCT_TASKS:
        load_task(spec)  # also checks the instruction settings (metric, template) against the data
        return
    if spec.hub_dataset is not None:
        return  # loading it is what a worker does (it may download): checked there
    if spec.glue_task is not None:
        check_glue_task(spec.glue_task)
    if spec.name.strip().lower() not in BUILTIN_TASKS and glue_name(spec.name) is None:
        raise unknown_task(spec.name)


def check_start(space, *, storage: str, tracking: str, optuna_storage: str, address: str | None = None) -> str:
    """Every check of a search start that needs no Ray; returns the normalised tracking URI."""
    check_storage(storage)
    tracking = check_tracking(tracking)
    check_optuna_storage(optuna_storage)
    check_ray_address(address)
    start_timeout(space.ray_start_timeout_s)  # MELORA_RAY_START_TIMEOUT_S, when set, is a number
    check_task_data(space)
    return tracking
