"""Instruction data for causal LMs: rows of (instruction, input, output), their prompts, and an encoding whose
loss covers the response only.

Where rows come from:

* built-in tasks made from the bundled corpora (``INSTRUCT_TASKS``: ``trec_instruct``,
  ``rotten_tomatoes_instruct``), with the same seeded train/validation/test rows as the classification
  task they are made from;
* local csv/tsv/json/jsonl/parquet files with instruction, optional input and output columns (Alpaca's
  names by default, ``TaskSpec.instruction_column`` and friends to rename);
* Hugging Face Hub datasets by id (``TaskSpec.hub_dataset``, loaded with ``datasets.load_dataset``).

A task whose outputs are a few short labels (at most ``MAX_CHOICES`` distinct ones, each at most
``MAX_CHOICE_WORDS`` words) keeps them as ``label_names`` and a ``label`` column of class ids: its splits are
stratified by answer and its default metric is exact match of greedy generation. Free-form outputs
(Alpaca) default to the eval loss on response tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from melora_tune.errors import UsageError, first_line

from .encode import IGNORE_INDEX, check_max_length
from .registry import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, BUILTIN_TASKS, INSTRUCT_TASKS, INSTRUCTION_METRICS, suggest
from .sources import file_label, read_builtin, read_local
from .spec import TaskData, TaskSpec
from .splits import split_rows

if TYPE_CHECKING:
    import datasets
    import pandas as pd

COLUMNS = ("instruction", "input", "output")  # what every instruction split holds (+ label for short answers)
MAX_CHOICES = 32
MAX_CHOICE_WORDS = 4
PROMPT_TAIL_TOKENS = 16  # a prompt cut to fit keeps its last tokens: the response cue ("### Response:")


def is_instruction(spec: TaskSpec) -> bool:
    """Whether ``spec`` names instruction data (see ``TaskSpec.kind``)."""
    if spec.kind != "auto":
        if spec.kind == "classification" and (spec.hub_dataset or spec.name.strip().lower() in INSTRUCT_TASKS):
            raise UsageError(f"task {spec.name!r} is instruction data: set task.kind to auto or instruction")
        return spec.kind == "instruction"
    if spec.hub_dataset is not None:
        return True
    if spec.path is None:
        return spec.name.strip().lower() in INSTRUCT_TASKS
    columns = set(map(str, read_local(spec.path, spec.encoding).columns))
    return {spec.instruction_column, spec.output_column} <= columns


# ---------------------------------------------------------------- loading


def load_instruction_task(spec: TaskSpec) -> TaskData:
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    key = spec.name.strip().lower()
    validation = None
    if spec.hub_dataset is not None:
        if spec.path is not None:
            raise UsageError("task sets both path and hub_dataset: keep one source of rows")
        frame, source = _rows(_read_hub(spec), spec, spec.hub_dataset), spec.hub_dataset
        # the MLflow experiment: the space's name for the rows, else the dataset's ("tatsu-lab/alpaca" -> "alpaca")
        named = spec.name and spec.name != type(spec).model_fields["name"].default
        name = spec.name if named else spec.hub_dataset.rstrip("/").rsplit("/", 1)[-1]
    elif spec.path is not None:
        frame = _rows(read_local(spec.path, spec.encoding), spec, spec.path)
        if spec.validation_path is not None:
            validation = _rows(read_local(spec.validation_path, spec.encoding), spec, spec.validation_path)
        source = spec.path + (f" + {spec.validation_path}" if spec.validation_path else "")
        name = spec.name if spec.name and key not in BUILTIN_TASKS and key not in INSTRUCT_TASKS else file_label(spec.path)
    elif key in INSTRUCT_TASKS:
        info = INSTRUCT_TASKS[key]
        base, source = read_builtin(info.base)
        answers = [a.replace("_", " ") for a in (BUILTIN_TASKS[info.base].answers or BUILTIN_TASKS[info.base].label_names)]
        frame = pd.DataFrame({
            "instruction": info.instruction,
            "input": base["text"].to_numpy(),
            "output": [answers[i] for i in base["label"]],
        })
        name = key
    else:
        known = [*INSTRUCT_TASKS]
        raise UsageError(f"unknown instruction task {spec.name!r}{suggest(spec.name, known)} "
                         "(or set task.path to a local file, or task.hub_dataset to a Hub dataset id)")
    return _finish(spec, name, frame, validation, source)


def _read_hub(spec: TaskSpec) -> pd.DataFrame:
    import datasets  # heavy: keeps `import melora_tune.data` light

    try:
        rows = datasets.load_dataset(spec.hub_dataset, spec.hub_config, split=spec.hub_split)
    except Exception as err:  # offline, no cache, unknown id, bad split: all end the same for the user
        raise UsageError(
            f"cannot load Hub dataset {spec.hub_dataset!r} (split {spec.hub_split!r}): {first_line(err)}; "
            "run once with network to cache it, or save it to a local jsonl file and set task.path"
        ) from err
    return rows.to_pandas()


def _rows(frame: pd.DataFrame, spec: TaskSpec, where: str) -> pd.DataFrame:
    """instruction/input/output as strings; a missing input column or empty cell is no input."""
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    missing = [c for c in (spec.instruction_column, spec.output_column) if c not in frame.columns]
    if missing:
        raise UsageError(
            f"{where}: no column {', '.join(map(repr, missing))} for instruction data; its columns are "
            f"{', '.join(map(str, frame.columns))} (set task.instruction_column / task.output_column)"
        )
    text = lambda column: frame[column].fillna("").astype(str).str.strip()  # noqa: E731
    out = pd.DataFrame({
        "instruction": text(spec.instruction_column),
        "input": text(spec.input_column) if spec.input_column in frame.columns else "",
        "output": text(spec.output_column),
    })
    for column in ("instruction", "output"):
        empty = int((out[column] == "").sum())
        if empty:
            raise UsageError(f"{where}: {empty} of {len(out)} rows have an empty {column!r}; drop or fill them")
    return out.reset_index(drop=True)


def _choices(frames: list[pd.DataFrame]) -> list[str] | None:
    """The distinct outputs when they are a few short labels (kept in first-seen order of sorted text)."""
    outputs = sorted(set().union(*(set(f["output"]) for f in frames)))
    if len(outputs) > MAX_CHOICES or any(len(o.split()) > MAX_CHOICE_WORDS for o in outputs):
        return None
    return outputs if len(outputs) >= 2 else None


def _finish(spec: TaskSpec, name: str, frame: pd.DataFrame, validation: pd.DataFrame | None, source: str) -> TaskData:
    import datasets  # heavy: keeps `import melora_tune.data` light

    key = spec.name.strip().lower()
    if key in INSTRUCT_TASKS and spec.path is None and spec.hub_dataset is None:
        base = BUILTIN_TASKS[INSTRUCT_TASKS[key].base]
        choices = [a.replace("_", " ") for a in (base.answers or base.label_names)]  # the base task's label order
    else:
        choices = _choices([frame] + ([validation] if validation is not None else []))
    frames = [frame] + ([validation] if validation is not None else [])
    if choices:
        names = datasets.ClassLabel(names=choices)
        features = datasets.Features({**{c: datasets.Value("string") for c in COLUMNS}, "label": names})
        frames = [f.assign(label=f["output"].map({c: i for i, c in enumerate(choices)})) for f in frames]
    else:
        features = datasets.Features({c: datasets.Value("string") for c in COLUMNS})
    full, *rest = [datasets.Dataset.from_pandas(f, features=features, preserve_index=False) for f in frames]
    splits = split_rows(full, rest[0] if rest else None, spec, stratify=choices is not None, name=name)
    splits = datasets.DatasetDict({k: v for k, v in splits.items() if v is not None})

    main = spec.metric or ("exact_match" if choices else "loss")
    if main not in INSTRUCTION_METRICS:
        raise UsageError(f"task {name!r} is instruction data: metric {main!r} does not apply; choose one of "
                         f"{', '.join(INSTRUCTION_METRICS)}")
    template = spec.prompt_template or ALPACA_PROMPT
    no_input = spec.prompt_template_no_input or (spec.prompt_template or ALPACA_PROMPT_NO_INPUT)
    return TaskData(
        name=name,
        splits=splits,
        text_columns=("instruction", "input"),
        num_labels=len(choices) if choices else 0,
        label_names=choices,
        metrics=("loss", "perplexity") + (("exact_match",) if main == "exact_match" else ()),
        main_metric=main,
        prompt_template=template,
        answer_names=choices,
        source=source,
        kind="instruction",
        prompt_format=spec.prompt_format,
        prompt_template_no_input=no_input,
        max_new_tokens=spec.max_new_tokens,
    )


# ---------------------------------------------------------------- prompts and encoding


def prompt_format(task: TaskData, tokenizer: Any) -> str:
    """"chat" or "template": what ``task.prompt_format`` means for this tokenizer."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if task.prompt_format == "chat" and not has_chat:
        raise UsageError("task.prompt_format is chat but the tokenizer has no chat template: set prompt_format: template "
                         "(or auto) to use task.prompt_template")
    if task.prompt_format == "auto":
        return "chat" if has_chat else "template"
    return task.prompt_format


def render_prompt(task: TaskData, tokenizer: Any, instruction: str, input_: str, fmt: str | None = None) -> str:
    """The text the model reads before its response."""
    fmt = fmt or prompt_format(task, tokenizer)
    if fmt == "chat":
        content = f"{instruction}\n\n{input_}" if input_ else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    template = task.prompt_template if input_ else task.prompt_template_no_input
    return template.format(instruction=instruction, input=input_)


def end_token(tokenizer: Any) -> int | None:
    """What ends a response: EOS, or SEP for BERT-style tokenizers used as decoders."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def encode_instruction(
    task: TaskData, tokenizer: Any, max_length: int, *, train_prompt_columns: bool = False, batch_size: int = 256
) -> datasets.DatasetDict:
    """``input_ids`` = [BOS] prompt response EOS; ``labels`` = -100 on BOS and the prompt, so the loss (and
    perplexity) is that of the response given the prompt. Prompt and response are tokenized apart, as the
    model meets them at generation time (prompt in, response out). A sequence longer than ``max_length``
    keeps up to half of it for the prompt (its start and its last ``PROMPT_TAIL_TOKENS`` tokens, the response
    cue), the rest for the response, whose end is cut (and then has no EOS). With a chat template the BOS
    is the template's. Validation and test rows also get ``prompt_length`` and ``row`` (their index in the
    split: where the reference answer is) for exact match; training rows too with ``train_prompt_columns``
    (not for training: the loop feeds every column to the model).
    """
    check_max_length(max_length)
    fmt = prompt_format(task, tokenizer)
    bos = [tokenizer.bos_token_id] if fmt == "template" and tokenizer.bos_token_id is not None else []
    end = end_token(tokenizer)
    eos = [end] if end is not None else []
    room = max_length - len(bos) - len(eos)

    def fit(prompt: list[int], response: list[int]) -> tuple[list[int], list[int], bool]:
        if len(prompt) + len(response) <= room:
            return prompt, response, True
        keep_response = min(len(response), max(room - len(prompt), room // 2))
        keep_prompt = room - keep_response
        if len(prompt) > keep_prompt:
            tail = min(PROMPT_TAIL_TOKENS, keep_prompt // 2)
            prompt = prompt[: keep_prompt - tail] + prompt[len(prompt) - tail:]
        return prompt, response[:keep_response], keep_response == len(response)

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_length": [], "row": []}
        prompts = [render_prompt(task, tokenizer, i, x, fmt) for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        for row, prompt, response in zip(indices, prompt_ids, response_ids):
            prompt, response, whole = fit(prompt, response)
            if len(response) == 0:
                raise UsageError(f"max_length={max_length} leaves no room for the response of {task.name!r} row {row}")
            tail = eos if whole else []
            out["input_ids"].append(bos + prompt + response + tail)
            out["attention_mask"].append([1] * (len(bos) + len(prompt) + len(response) + len(tail)))
            out["labels"].append([IGNORE_INDEX] * (len(bos) + len(prompt)) + response + tail)
            out["prompt_length"].append(len(bos) + len(prompt))
            out["row"].append(row)
        return out

    encoded = task.splits.map(
        encode, batched=True, batch_size=batch_size, with_indices=True,
        remove_columns=task.splits["train"].column_names, desc=f"prompting {task.name}",
    )
    if not train_prompt_columns:
        encoded["train"] = encoded["train"].remove_columns(["prompt_length", "row"])
    encoded.set_format("torch")
    return encoded
