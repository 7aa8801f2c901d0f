"""What a task is: the spec of what to load (``TaskSpec``, a trial config's ``task`` section), what comes back
(``TaskData``), and the check of an instruction prompt template the spec runs.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator, model_validator

from melora_tune.errors import StandaloneSchema, did_you_mean

from .metrics import METRICS
from .registry import INSTRUCTION_METRICS

if TYPE_CHECKING:
    import datasets


def check_template(template: str, what: str) -> None:
    """A prompt template may use {instruction} and {input}, nothing else (literal braces are doubled)."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        raise ValueError(f"{what} {template!r} is not a valid template ({err}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(fields - {"instruction", "input"})
    if unknown:
        raise ValueError(f"{what} uses {{{unknown[0]}}}: only {{instruction}} and {{input}} are filled in")


class TaskSpec(StandaloneSchema):
    """Which data to train and evaluate on (the one schema of a trial config's ``task`` section)."""

    name: str = "rotten_tomatoes"  # built-in name, "glue/<task>", or a label for a local file
    path: str | None = None  # local csv/tsv/json/jsonl/parquet (the training file when a pair)
    validation_path: str | None = None
    # The text encoding of path and validation_path when they start with no byte-order mark (a file that has one,
    # UTF-8, UTF-16 or UTF-32, is read as it says); None: UTF-8. E.g. latin-1, cp1252, utf-16-le.
    encoding: str | None = None
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

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                "".encode(value)  # LookupError: an unknown name or a bytes-to-bytes codec (base64, zlib)
            except LookupError:
                raise ValueError(f"unknown text encoding {value!r}: give a Python codec name such as utf-8, "
                                 "latin-1, cp1252 or utf-16") from None
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
