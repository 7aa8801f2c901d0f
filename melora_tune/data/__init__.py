"""Tasks, splits, encodings and metrics for training and search.

``import melora_tune.data`` stays light: ``datasets`` and ``transformers`` are
imported inside the functions that need them.
"""

from .encode import IGNORE_INDEX, answer_text, encode_causal_lm, encode_classification
from .metrics import METRICS, compute_metrics
from .registry import BUILTIN_TASKS, GLUE_TASKS, known_task_names
from .tasks import TaskData, TaskSpec, load_task

__all__ = [
    "BUILTIN_TASKS",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "METRICS",
    "TaskData",
    "TaskSpec",
    "answer_text",
    "compute_metrics",
    "encode_causal_lm",
    "encode_classification",
    "known_task_names",
    "load_task",
]
