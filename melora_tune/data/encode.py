"""Turning a task's text into model inputs: sequence classification and instruction-style causal LM.

Both pad to ``max_length`` by default so every batch has one shape (what a
plain DataLoader and DeepSpeed expect); pass ``pad_to_max_length=False`` and a
padding collator to pad per batch instead.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

import numpy as np

from melora_tune.errors import UsageError

from .registry import GENERIC_PROMPTS
from .spec import TaskData

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100  # what torch's cross-entropy skips


def check_max_length(max_length: int) -> None:
    """Refuse a ``max_length`` that is not an integer >= 4 (room for BOS, a token of prompt and answer, EOS)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise UsageError(f"max_length must be an integer >= 4, got {max_length!r}")


def encode_classification(
    task: TaskData, tokenizer: Any, max_length: int, *, pad_to_max_length: bool = True, batch_size: int = 1000
) -> datasets.DatasetDict:
    """``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``; torch format.

    Pairs go through the tokenizer as a pair (``[CLS] a [SEP] b [SEP]`` for BERT),
    truncated longest-first. Labels are int64 class ids, or float32 for regression
    (what ``*ForSequenceClassification`` expects for MSE loss).
    """
    check_max_length(max_length)
    if pad_to_max_length and getattr(tokenizer, "pad_token_id", None) is None:
        # Not patched here: a sequence classifier must also know the pad id to find the last token.
        raise UsageError(
            "the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token "
            "(and model.config.pad_token_id to match) before encoding"
        )
    columns = task.text_columns
    label_dtype = np.float32 if task.is_regression else np.int64

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        encoded = tokenizer(
            *(batch[c] for c in columns),
            truncation=True,
            max_length=max_length,
            padding="max_length" if pad_to_max_length else False,
        )
        out = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
        out["labels"] = np.asarray(batch["label"], dtype=label_dtype)
        return out

    encoded = task.splits.map(
        encode, batched=True, batch_size=batch_size, remove_columns=task.splits["train"].column_names,
        desc=f"tokenizing {task.name}",
    )
    encoded.set_format("torch")
    return encoded


def _render(template: str, texts: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Fill ``{0}``/``{1}`` and return where each text landed (character spans)."""
    parts, spans, position = [], [None] * len(texts), 0
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        position += len(literal)
        if field is None:
            continue
        index = int(field) if field else 0
        if index >= len(texts):
            raise UsageError(
                f"prompt template {template!r} uses {{{index}}} but the task has {len(texts)} text column(s)"
            )
        parts.append(texts[index])
        spans[index] = (position, position + len(texts[index]))
        position += len(texts[index])
    return "".join(parts), [s or (0, 0) for s in spans]


def answer_text(task: TaskData, label: float | int) -> str:
    """What the LM is taught to say: the verbalised class, or the score for regression."""
    if task.is_regression:
        return f"{round(float(label), 2):g}"
    names = task.answer_names or task.label_names
    return names[int(label)].replace("_", " ")


def encode_causal_lm(
    task: TaskData, tokenizer: Any, max_length: int, *, pad_to_max_length: bool = True, batch_size: int = 256
) -> datasets.DatasetDict:
    """Prompt + answer as one sequence; the loss is on the answer (and EOS) only.

    ``input_ids`` = [BOS] prompt " " answer EOS [pad...]; ``labels`` is a copy with
    -100 on BOS, the prompt and padding, so the loss and perplexity are those of
    the answer given the prompt. Texts that do not fit are cut (the longest text
    first) so the prompt's closing cue ("Answer:") and the answer always stay.
    Needs a fast tokenizer: the prompt/answer boundary comes from character offsets,
    which avoids the mismatch of tokenizing the two halves separately.
    """
    check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            "encode_causal_lm needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True"
        )
    template = task.prompt_template or GENERIC_PROMPTS[len(task.text_columns)]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    eos = [end] if end is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end if end is not None else 0)
    room = max_length - len(bos) - len(eos)

    def one(texts: list[str], answer: str) -> tuple[list[int], int]:
        """Token ids of prompt+answer within ``room``, and where the answer starts."""
        for _ in range(16):
            prompt, spans = _render(template, texts)
            encoded = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            overflow = len(ids) - room
            if overflow <= 0:
                start = next((i for i, (s, _) in enumerate(offsets) if s >= len(prompt)), len(ids))
                return ids, start
            # Cut the longest text by as many tokens as overflow, at a token boundary.
            inside = [[i for i, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b] for a, b in spans]
            longest = max(range(len(texts)), key=lambda t: len(inside[t]))
            if not inside[longest]:
                break
            keep = max(len(inside[longest]) - overflow, 0)
            a = spans[longest][0]
            cut = offsets[inside[longest][keep]][0] - a if keep < len(inside[longest]) else len(texts[longest])
            texts = list(texts)
            texts[longest] = texts[longest][:cut].rstrip()
        raise UsageError(
            f"max_length={max_length} is too short for the {task.name!r} prompt and answer "
            f"(they alone take {len(ids) + len(bos) + len(eos)} tokens)"
        )

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in range(len(batch["label"])):
            texts = [batch[c][row] for c in task.text_columns]
            ids, start = one(texts, " " + answer_text(task, batch["label"][row]))
            input_ids = bos + ids + eos
            labels = [IGNORE_INDEX] * (len(bos) + start) + ids[start:] + eos
            padding = max_length - len(input_ids) if pad_to_max_length else 0
            out["input_ids"].append(input_ids + [pad] * padding)
            out["attention_mask"].append([1] * len(input_ids) + [0] * padding)
            out["labels"].append(labels + [IGNORE_INDEX] * padding)
        return {k: np.asarray(v, dtype=np.int64) if pad_to_max_length else v for k, v in out.items()}

    encoded = task.splits.map(
        encode, batched=True, batch_size=batch_size, remove_columns=task.splits["train"].column_names,
        desc=f"prompting {task.name}",
    )
    encoded.set_format("torch")
    return encoded
