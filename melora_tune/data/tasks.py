"""Loading a task: ``load_task`` dispatches on the spec to the built-in corpora, GLUE on the Hub, local
files (read, columns checked, labels converted here) or instruction data (``instruct``), then splits the rows
(``splits``) and picks the metrics.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from melora_tune.errors import UsageError

from .instruct import is_instruction, load_instruction_task
from .metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from .registry import (
    BUILTIN_TASKS,
    GENERIC_PROMPTS,
    GLUE_TASKS,
    TaskInfo,
    check_glue_task,
    glue_name,
    unknown_task,
)
from .sources import COMPRESSIONS, LOCAL_SUFFIXES, file_label, load_glue_from_hub, read_builtin, read_local
from .spec import TaskData, TaskSpec
from .splits import split_rows

if TYPE_CHECKING:
    import datasets
    import pandas as pd

# Column names tried, in order, when a local file comes without text_columns.
AUTO_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("text_a", "text_b"),
    ("text",),
    ("sentence",),
)



def load_task(spec: TaskSpec | str) -> TaskData:
    """Load a task by name, GLUE name or local file, split and subsample it as the spec says."""
    if isinstance(spec, str):
        spec = TaskSpec(name=spec)
    if spec.path is None and _looks_like_file(spec.name):
        spec = spec.replace(path=spec.name, name=file_label(spec.name))
    if is_instruction(spec):
        return load_instruction_task(spec)
    if spec.path is not None:
        return _load_local(spec)
    if spec.glue_task is not None and glue_name(spec.name) != check_glue_task(spec.glue_task):
        raise UsageError(
            f"glue_task applies to a local file (set path); to load GLUE's {spec.glue_task!r} "
            f"from the Hub use name='glue/{check_glue_task(spec.glue_task)}'"
        )
    key = spec.name.strip().lower()
    if key in BUILTIN_TASKS:
        frame, source = read_builtin(key)
        info = BUILTIN_TASKS[key]
        full = _to_dataset(frame, info.text_columns, _features(info.text_columns, list(info.label_names)))
        return _finish(spec, key, info, full, None, source)
    glue = glue_name(spec.name)
    if glue is not None:
        train, validation, source = load_glue_from_hub(glue)
        info = GLUE_TASKS[glue]
        return _finish(spec, f"glue/{glue}", info, train, validation, source)
    raise unknown_task(spec.name)


# ---------------------------------------------------------------- local files


def is_local(spec: TaskSpec) -> bool:
    """Whether ``load_task(spec)`` reads a local file (a path, or a name that is one) rather than a named task."""
    return spec.path is not None or _looks_like_file(spec.name)


def _looks_like_file(name: str) -> bool:
    """A data-file suffix, or an existing path: "glue/mrpc" is a task name, not a folder."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    if suffixes and (suffixes[-1] in LOCAL_SUFFIXES or suffixes[-1] in COMPRESSIONS):
        return True
    return os.sep in name and Path(name).expanduser().is_file()


def _load_local(spec: TaskSpec) -> TaskData:
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    frames = [read_local(spec.path, spec.encoding)]
    if spec.validation_path is not None:
        frames.append(read_local(spec.validation_path, spec.encoding))
    files = [spec.path] + ([spec.validation_path] if spec.validation_path else [])

    glue = check_glue_task(spec.glue_task) if spec.glue_task else glue_name(spec.name)
    info = GLUE_TASKS[glue] if glue else None
    columns = tuple(spec.text_columns) if spec.text_columns else (info.text_columns if info else None)
    if columns is None:
        columns = _guess_text_columns(frames[0], spec.path)
    for frame, file in zip(frames, files):
        missing = [c for c in (*columns, spec.label_column) if c not in frame.columns]
        if missing:
            raise UsageError(f"{file}: {_missing_columns(missing, frame.columns)}")
        _check_text(frame, columns, file)

    labels, label_names = _convert_labels([f[spec.label_column] for f in frames], files, info)
    if info is None:
        info = _generic_info(columns, label_names)
    features = _features(columns, label_names)
    datasets_ = []
    for frame, label in zip(frames, labels):
        # Empty cells (NaN in pandas) become "": QQP, for one, has a few empty questions.
        table = {c: frame[c].fillna("").astype(str).to_numpy() for c in columns}
        datasets_.append(_to_dataset(pd.DataFrame({**table, "label": label}), columns, features))
    label = spec.name if spec.name and spec.name.lower() not in BUILTIN_TASKS else file_label(spec.path)
    info = dataclasses.replace(info, text_columns=columns)
    validation = datasets_[1] if len(datasets_) > 1 else None
    return _finish(spec, label, info, datasets_[0], validation, " + ".join(str(Path(f)) for f in files))


def _missing_columns(missing: list[str], present) -> str:
    return f"no column {', '.join(map(repr, missing))}; its columns are {', '.join(map(str, present))}"


def _check_text(frame: pd.DataFrame, columns: tuple[str, ...], file: str) -> None:
    """Refuse a text column that is empty (or blank) on every row: training on it would learn the label prior only."""
    if len(frame) == 0:
        return
    for column in columns:
        text = frame[column].fillna("").astype(str).str.strip()
        if not (text != "").any():
            raise UsageError(
                f"{file}: text column {column!r} is empty on every row; fill it, or set text_columns to the column(s) "
                f"holding the text (columns: {', '.join(map(str, frame.columns))})"
            )


def _guess_text_columns(frame: pd.DataFrame, path: str) -> tuple[str, ...]:
    present = set(map(str, frame.columns))
    for candidate in AUTO_TEXT_COLUMNS:
        if present.issuperset(candidate):
            return candidate
    raise UsageError(
        f"{path}: cannot tell the text column(s); set text_columns to one or two of: "
        f"{', '.join(map(str, frame.columns))}"
    )


def _convert_labels(
    columns: list[pd.Series], files: list[str], info: TaskInfo | None
) -> tuple[list[np.ndarray], list[str] | None]:
    """Labels of every file as ids (classification) or float32 (regression), mapped consistently.

    Numbers (or number strings) with a fractional part mean regression unless a
    GLUE task says otherwise; integers are class ids as they are; other strings
    are class names, numbered in sorted order over all files so the mapping is
    the same on every run and for both files of a pair.
    """
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    for column, file in zip(columns, files):
        if column.isna().any():
            raise UsageError(f"{file}: {int(column.isna().sum())} rows have no value in label column {column.name!r}")
    numeric = [pd.to_numeric(c, errors="coerce") if c.dtype != bool else c.astype("int64") for c in columns]
    all_numeric = all(not n.isna().any() for n in numeric)
    fractional = all_numeric and any(not np.all(np.mod(n.to_numpy(dtype=float), 1) == 0) for n in numeric)
    regression = (info.label_names is None) if info else fractional
    if fractional and not regression:
        raise UsageError(
            f"{files[0]}: class labels in {columns[0].name!r} must be whole numbers or names, found fractions"
        )
    if regression:
        if not all_numeric:
            raise UsageError(f"{files[0]}: regression labels must be numbers in column {columns[0].name!r}")
        return [n.to_numpy(dtype="float32") for n in numeric], None

    known = list(info.label_names) if info else None
    if all_numeric:
        ids = [n.to_numpy(dtype="int64") for n in numeric]
        low, high = min(int(i.min()) for i in ids), max(int(i.max()) for i in ids)
        if low < 0 or (known and high >= len(known)):
            allowed = f"0..{len(known) - 1}" if known else ">= 0"
            raise UsageError(
                f"{files[0]}: class ids in {columns[0].name!r} must be {allowed}, found {low}..{high} "
                "(unlabelled rows such as GLUE test's -1 cannot be used)"
            )
        names = known or [str(i) for i in range(high + 1)]
    else:
        values = [c.astype(str).str.strip() for c in columns]
        found = sorted(set().union(*(set(v) for v in values)))
        if known:
            unknown = [v for v in found if v not in known]
            if unknown:
                raise UsageError(
                    f"{files[0]}: labels {unknown[:5]} are not class names of this GLUE task ({', '.join(known)})"
                )
            names = known
        else:
            names = found
        lookup = {name: i for i, name in enumerate(names)}
        ids = [v.map(lookup).to_numpy(dtype="int64") for v in values]
    if len(names) < 2:
        raise UsageError(f"{files[0]}: label column {columns[0].name!r} holds a single class ({names[0]!r})")
    present = np.unique(np.concatenate(ids))
    if len(present) < 2:
        # class ids name range(max + 1) classes: a file of 1s alone claims two, but trains on one
        raise UsageError(
            f"{files[0]}: every row of label column {columns[0].name!r} has the same class ({names[int(present[0])]!r}): "
            "a classifier needs rows of at least two classes"
        )
    return ids, names


def _generic_info(columns: tuple[str, ...], label_names: list[str] | None) -> TaskInfo:
    prompt = GENERIC_PROMPTS[len(columns)]
    if label_names is None:
        return TaskInfo(columns, None, ("pearson", "spearmanr"), "pearson", prompt)
    metrics = ("accuracy", "f1") if len(label_names) == 2 else ("accuracy", "f1_macro")
    return TaskInfo(columns, tuple(label_names), metrics, "accuracy", prompt)


# ---------------------------------------------------------------- datasets, splits and metrics


def _features(columns: tuple[str, ...], label_names: list[str] | None) -> datasets.Features:
    import datasets  # heavy: keeps `import melora_tune.data` light

    label = datasets.Value("float32") if label_names is None else datasets.ClassLabel(names=list(label_names))
    return datasets.Features({**{c: datasets.Value("string") for c in columns}, "label": label})


def _to_dataset(frame: pd.DataFrame, columns: tuple[str, ...], features: datasets.Features) -> datasets.Dataset:
    import datasets  # heavy: keeps `import melora_tune.data` light

    return datasets.Dataset.from_pandas(frame[[*columns, "label"]], features=features, preserve_index=False)


def _finish(
    spec: TaskSpec,
    name: str,
    info: TaskInfo,
    full: datasets.Dataset,
    validation: datasets.Dataset | None,
    source: str,
) -> TaskData:
    import datasets  # heavy: keeps `import melora_tune.data` light

    columns = tuple(spec.text_columns) if spec.text_columns else info.text_columns
    missing = [c for c in columns if c not in full.column_names]
    if missing:
        raise UsageError(f"task {name!r}: {_missing_columns(missing, full.column_names)}")
    if len(full) == 0:
        raise UsageError(f"task {name!r} has no training rows")
    splits = split_rows(full, validation, spec, stratify=info.label_names is not None, name=name)
    splits = datasets.DatasetDict(
        {k: v.select_columns([*columns, "label"]) for k, v in splits.items() if v is not None}
    )
    label_names = list(info.label_names) if info.label_names is not None else None
    metrics, main = _score_metric(spec, info, name, label_names)
    return TaskData(
        name=name,
        splits=splits,
        text_columns=columns,
        num_labels=len(label_names) if label_names else 1,
        label_names=label_names,
        metrics=metrics,
        main_metric=main,
        # The task's own prompt names its columns' roles; a different number of columns needs the generic one.
        prompt_template=info.prompt if len(columns) == len(info.text_columns) else GENERIC_PROMPTS[len(columns)],
        answer_names=list(info.answers or info.label_names) if label_names else None,
        source=source,
    )


def _score_metric(spec: TaskSpec, info: TaskInfo, name: str, label_names: list[str] | None) -> tuple[tuple[str, ...], str]:
    """(metrics to compute, the one to maximise): the task's own, with ``spec.metric`` added and chosen when set."""
    if spec.metric is None:
        return tuple(info.metrics), info.main_metric
    allowed = CLASSIFICATION_METRICS if label_names else REGRESSION_METRICS
    if spec.metric not in allowed:
        kind = "a classification" if label_names else "a regression"
        raise UsageError(f"task {name!r} is {kind} task: metric {spec.metric!r} does not apply; choose one of {', '.join(allowed)}")
    if spec.metric == "f1" and len(label_names) != 2:
        raise UsageError(f"task {name!r} has {len(label_names)} classes: metric f1 is binary, use f1_macro")
    metrics = tuple(info.metrics) + (() if spec.metric in info.metrics else (spec.metric,))
    return metrics, spec.metric

