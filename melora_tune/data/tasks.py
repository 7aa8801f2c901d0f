"""Tasks: what to load (``TaskSpec``), what comes back (``TaskData``), and the seeded splits.

Split policy (the same for every source, so results are comparable):

* Data without a validation split (the built-in corpora, a single local file) is
  cut into train/validation/test by ``validation_fraction``/``test_fraction`` of
  all rows, stratified by label for classification.
* Data with its own validation split (GLUE, a local train/validation file pair)
  keeps it as ``validation`` -- so numbers compare with papers that report GLUE
  dev -- and ``test_fraction`` of the training rows becomes ``test``: a held-out
  set the search never looks at, to score its winner without the optimism of
  picking the best of many trials on the same validation rows. Set
  ``test_fraction=0`` to train on all of GLUE's training rows (no ``test`` split).
* ``max_train_samples``/``max_eval_samples`` then draw a seeded, stratified
  subsample (not the head of the file, which is often sorted by label or source).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing import Literal

from pydantic import field_validator, model_validator

from melora_tune.errors import StandaloneSchema, UsageError, did_you_mean

from .registry import (
    BUILTIN_TASKS,
    GENERIC_PROMPTS,
    GLUE_TASKS,
    INSTRUCT_TASKS,
    INSTRUCTION_METRICS,
    TaskInfo,
    check_glue_task,
    glue_name,
    unknown_task,
)
from .sources import COMPRESSIONS, LOCAL_SUFFIXES, load_glue_from_hub, read_builtin, read_local

if TYPE_CHECKING:
    import datasets
    import numpy as np
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


class TaskSpec(StandaloneSchema):
    """Which data to train and evaluate on (the one schema of a trial config's ``task`` section)."""

    name: str = "rotten_tomatoes"  # built-in name, "glue/<task>", or a label for a local file
    path: str | None = None  # local csv/tsv/json/jsonl/parquet (the training file when a pair)
    validation_path: str | None = None
    glue_task: str | None = None  # treat the local file as this GLUE task (columns, labels, metrics)
    text_columns: list[str] | None = None  # None: the task's own, or guessed from a local file's columns
    label_column: str = "label"
    seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # The score a search maximises (accuracy, f1, f1_macro, matthews_correlation, pearson, spearmanr);
    # None: the task's own (accuracy for most classification tasks). On an imbalanced task prefer f1 or
    # matthews_correlation: accuracy there mostly measures the majority class.
    # Instruction tasks (exact_match or loss, see below) take the same key.
    metric: str | None = None

    # ---- instruction data (causal LM): rows of instruction, optional input, output
    # auto: an instruction task when the name is a built-in one (trec_instruct, rotten_tomatoes_instruct), hub_dataset
    # is set, or a local file has the instruction and output columns; classification otherwise.
    kind: Literal["auto", "classification", "instruction"] = "auto"
    instruction_column: str = "instruction"  # Alpaca's names by default
    input_column: str = "input"  # optional in the data: a missing column or an empty cell means no input
    output_column: str = "output"
    hub_dataset: str | None = None  # a Hugging Face Hub dataset id (e.g. tatsu-lab/alpaca), loaded with datasets
    hub_config: str | None = None  # its configuration name, if it has several
    hub_split: str = "train"  # the split read; validation/test are cut from it like a local file's
    # auto: the tokenizer's chat template when it has one, else prompt_template; template | chat force one.
    prompt_format: Literal["auto", "template", "chat"] = "auto"
    # {instruction} and {input} are filled in; None: Alpaca's prompt (and its no-input variant).
    prompt_template: str | None = None
    prompt_template_no_input: str | None = None  # for rows without input; None: prompt_template (or Alpaca's)
    max_new_tokens: int = 16  # greedy generation length for exact_match (the longest answer is used if shorter)

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, value: Any) -> Any:
        from .metrics import METRICS

        known = (*METRICS, *INSTRUCTION_METRICS)
        if value is not None and value not in known:
            raise ValueError(f"unknown metric {value!r}: choose one of {', '.join(known)}{did_you_mean(str(value), known)}")
        return value

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _new_tokens(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
            raise ValueError(f"max_new_tokens must be an integer in 1..4096, got {value!r}")
        return value

    @field_validator("prompt_template", "prompt_template_no_input", mode="before")
    @classmethod
    def _template(cls, value: Any, info) -> Any:
        if value is None:
            return value
        if not isinstance(value, str) or "{instruction}" not in value:
            raise ValueError(f"{info.field_name} must be a string with an {{instruction}} placeholder, got {value!r}")
        from .instruct import check_template

        check_template(value, info.field_name)
        return value

    @field_validator("text_columns", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [c.strip() for c in value.split(",") if c.strip()]
        if value is not None and not 1 <= len(value) <= 2:
            raise ValueError(f"text_columns takes one column or a pair, got {value!r}")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"data seed must be a non-negative integer, got {value!r}")
        return value

    @field_validator("validation_fraction", "test_fraction", mode="before")
    @classmethod
    def _fraction(cls, value: Any, info) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{info.field_name} must be in [0, 1), got {value!r}")
        return value

    @field_validator("max_train_samples", "max_eval_samples", mode="before")
    @classmethod
    def _count(cls, value: Any, info) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{info.field_name} must be a positive integer or None, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"validation_fraction + test_fraction must leave training rows, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        if self.validation_path is not None and self.path is None:
            raise ValueError("validation_path needs path (the training file) as well")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> "TaskSpec":
        """A copy with changes, validated."""
        return type(self)(**{**self.model_dump(), **changes})


@dataclass
class TaskData:
    """A loaded task: splits with the text columns and ``label`` (ClassLabel ids or float)."""

    name: str
    splits: datasets.DatasetDict  # "train", "validation", and "test" unless test_fraction=0 with given validation
    text_columns: tuple[str, ...]
    num_labels: int  # 1 means regression
    label_names: list[str] | None  # None for regression
    metrics: tuple[str, ...]
    main_metric: str  # the metric a search maximises
    prompt_template: str = ""  # causal-LM prompt: "{0}"/"{1}" are the text columns ({instruction}/{input} for instruction data)
    answer_names: list[str] | None = None  # what a causal LM answers per label id
    source: str = ""  # where the rows came from (file or hub id), for run records
    # "instruction": splits hold instruction/input/output (+ label, the answer's class id, when answers are
    # labels); prompt_* say how a row becomes a prompt (melora_tune.data.instruct).
    kind: str = "classification"
    prompt_format: str = "auto"
    prompt_template_no_input: str = ""
    max_new_tokens: int = 16

    @property
    def is_instruction(self) -> bool:
        return self.kind == "instruction"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def sizes(self) -> dict[str, int]:
        return {split: len(rows) for split, rows in self.splits.items()}


def load_task(spec: TaskSpec | str) -> TaskData:
    """Load a task by name, GLUE name or local file, split and subsample it as the spec says."""
    if isinstance(spec, str):
        spec = TaskSpec(name=spec)
    if spec.path is None and _looks_like_file(spec.name):
        spec = spec.replace(path=spec.name, name=_file_label(spec.name))
    from .instruct import is_instruction, load_instruction_task

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


def _file_label(path: str) -> str:
    return Path(path).name.split(".")[0] or "local"


def _load_local(spec: TaskSpec) -> TaskData:
    import pandas as pd

    frames = [read_local(spec.path)]
    if spec.validation_path is not None:
        frames.append(read_local(spec.validation_path))
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
    label = spec.name if spec.name and spec.name.lower() not in BUILTIN_TASKS else _file_label(spec.path)
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
    import numpy as np
    import pandas as pd

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


# ---------------------------------------------------------------- datasets and splits


def _features(columns: tuple[str, ...], label_names: list[str] | None) -> datasets.Features:
    import datasets

    label = datasets.Value("float32") if label_names is None else datasets.ClassLabel(names=list(label_names))
    return datasets.Features({**{c: datasets.Value("string") for c in columns}, "label": label})


def _to_dataset(frame: pd.DataFrame, columns: tuple[str, ...], features: datasets.Features) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_pandas(frame[[*columns, "label"]], features=features, preserve_index=False)


def _finish(
    spec: TaskSpec,
    name: str,
    info: TaskInfo,
    full: datasets.Dataset,
    validation: datasets.Dataset | None,
    source: str,
) -> TaskData:
    import datasets

    columns = tuple(spec.text_columns) if spec.text_columns else info.text_columns
    missing = [c for c in columns if c not in full.column_names]
    if missing:
        raise UsageError(f"task {name!r}: {_missing_columns(missing, full.column_names)}")
    if len(full) == 0:
        raise UsageError(f"task {name!r} has no training rows")
    splits = _split(full, validation, spec, stratify=info.label_names is not None, name=name)
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
    from .metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS

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


def _split(
    full: datasets.Dataset, validation: datasets.Dataset | None, spec: TaskSpec, *, stratify: bool, name: str
) -> dict[str, datasets.Dataset | None]:
    import numpy as np

    # One generator per step, so a step's draw never depends on whether an earlier
    # optional step ran: validation/test rows stay the same whatever
    # max_train_samples is (trials at different data budgets are scored alike).
    def rng(step: int) -> np.random.Generator:
        return np.random.default_rng([spec.seed, step])

    n = len(full)
    n_test = round(n * spec.test_fraction)
    n_val = 0 if validation is not None else round(n * spec.validation_fraction)
    if validation is None and spec.validation_fraction == 0:
        raise UsageError(f"task {name!r} has no validation split: set validation_fraction > 0 or give validation_path")
    if (spec.test_fraction > 0 and n_test < 1) or (validation is None and n_val < 1) or n - n_test - n_val < 1:
        raise UsageError(
            f"task {name!r} has {n} rows: too few to split off validation_fraction={spec.validation_fraction} "
            f"and test_fraction={spec.test_fraction}"
        )
    if validation is not None and len(validation) == 0:
        raise UsageError(f"task {name!r}: the validation data has no rows")
    train, test = _take(full, n_test, rng(0), stratify)
    if validation is None:
        train, validation = _take(train, n_val, rng(1), stratify)
    if spec.max_train_samples is not None and spec.max_train_samples < len(train):
        train = _take(train, spec.max_train_samples, rng(2), stratify)[1]
    if spec.max_eval_samples is not None:
        if spec.max_eval_samples < len(validation):
            validation = _take(validation, spec.max_eval_samples, rng(3), stratify)[1]
        if test is not None and spec.max_eval_samples < len(test):
            test = _take(test, spec.max_eval_samples, rng(4), stratify)[1]
    return {"train": train, "validation": validation, "test": test}


def _take(
    rows: datasets.Dataset, k: int, rng: np.random.Generator, stratify: bool
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Seeded draw of ``k`` rows: (the rest, the k rows), both in their original order.

    Stratified by hand (largest-remainder quota per class, then a random pick inside
    each class) because ``datasets``' own stratified split reads the label column
    row by row (~2 s for 12k rows) and scikit-learn's costs ~1 s to import.
    """
    import numpy as np

    if k <= 0:
        return rows, None
    n = len(rows)
    if stratify:
        labels = rows.select_columns(["label"]).with_format("numpy")[:]["label"]
        classes, counts = np.unique(labels, return_counts=True)
        exact = k * counts / n
        quota = np.floor(exact).astype(int)
        # Hand the rows left over to the classes with the largest remainders (ties: lower class id).
        extra = np.argsort(-(exact - quota), kind="stable")[: k - int(quota.sum())]
        quota[extra] += 1
        picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
        taken = np.sort(np.concatenate(picked))
    else:
        taken = np.sort(rng.permutation(n)[:k])
    mask = np.ones(n, dtype=bool)
    mask[taken] = False
    return rows.select(np.flatnonzero(mask)), rows.select(taken)
