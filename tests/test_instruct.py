"""Instruction data: loading (built-in, local files, Hub), prompts, response-only loss, exact match, greedy decoding."""

import copy

import pandas as pd
import pytest
import torch

from melora_tune.data import TaskSpec, load_task
from melora_tune.data.instruct import encode_instruction, render_prompt
from melora_tune.data.metrics import exact_match, normalize_answer
from melora_tune.errors import UsageError
from melora_tune.trial.generation import greedy_generate

TREC_PROMPT = "{instruction}\nQuestion: {input}\nAnswer:"


def alpaca_frame(n: int = 60) -> pd.DataFrame:
    """Free-form instruction rows (every output distinct), a third without input."""
    questions = load_task(TaskSpec(name="trec", max_train_samples=n)).splits["train"]["text"]
    return pd.DataFrame({
        "instruction": ["Rewrite the question in capital letters." if i % 3 else "Say the question back." for i in range(n)],
        "input": ["" if i % 3 == 0 else q for i, q in enumerate(questions)],
        "output": [q if i % 3 == 0 else q.upper() for i, q in enumerate(questions)],
    })


# ---- built-in tasks ---------------------------------------------------------------


@pytest.mark.parametrize("name, base", [("trec_instruct", "trec"), ("rotten_tomatoes_instruct", "rotten_tomatoes")])
def test_builtin_instruction_tasks_keep_the_classification_splits(name, base):
    sizes = {"max_train_samples": 300, "max_eval_samples": 100, "seed": 3}
    task, classes = load_task(TaskSpec(name=name, **sizes)), load_task(TaskSpec(name=base, **sizes))
    assert task.is_instruction and task.main_metric == "exact_match"
    assert task.metrics == ("loss", "perplexity", "exact_match")
    for split in ("train", "validation", "test"):
        assert task.splits[split]["input"] == classes.splits[split]["text"], split
        assert task.splits[split]["label"] == classes.splits[split]["label"], split
        answers = [task.label_names[i] for i in task.splits[split]["label"]]
        assert task.splits[split]["output"] == answers
    assert set(task.splits["train"]["instruction"]) == {task.splits["train"]["instruction"][0]}


# ---- the encoding: loss on the response only --------------------------------------------


@pytest.mark.parametrize("which", ["minilm", "bpe"])
def test_prompt_tokens_are_masked_and_response_tokens_supervised_token_by_token(which, minilm_tokenizer, bpe_tokenizer):
    tok = minilm_tokenizer if which == "minilm" else bpe_tokenizer
    task = load_task(TaskSpec(name="trec_instruct", max_train_samples=40, max_eval_samples=10,
                              prompt_template=TREC_PROMPT))
    encoded = encode_instruction(task, tok, max_length=192)  # room for every row: nothing is cut
    assert sorted(encoded["train"].column_names) == ["attention_mask", "input_ids", "labels"]
    assert sorted(encoded["validation"].column_names) == ["attention_mask", "input_ids", "labels", "prompt_length", "row"]
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for i, row in enumerate(encoded["validation"]):
        source = task.splits["validation"][int(row["row"])]
        assert int(row["row"]) == i
        ids, labels, start = row["input_ids"].tolist(), row["labels"].tolist(), int(row["prompt_length"])
        prompt = render_prompt(task, tok, source["instruction"], source["input"])
        expected_prompt = bos + tok(prompt, add_special_tokens=False)["input_ids"]
        expected_response = tok(source["output"], add_special_tokens=False)["input_ids"] + [end]
        assert ids == expected_prompt + expected_response
        assert start == len(expected_prompt)
        for position, (token, label) in enumerate(zip(ids, labels)):
            assert label == (-100 if position < start else token), (i, position)
        assert tok.decode([t for t in labels if t != -100], skip_special_tokens=True).strip() == source["output"]


def test_a_long_prompt_keeps_its_instruction_and_response_cue_and_the_whole_answer(bpe_tokenizer):
    frame = alpaca_frame(12)
    frame["input"] = [" ".join([q] * 8) for q in load_task(TaskSpec(name="trec", max_train_samples=12)).splits["train"]["text"]]
    frame["output"] = "short answer"
    task = _local(frame, "jsonl", prompt_template="### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n")
    encoded = encode_instruction(task, bpe_tokenizer, max_length=48)
    for row in encoded["validation"]:
        ids = row["input_ids"].tolist()
        assert len(ids) == 48 and ids[0] == bpe_tokenizer.bos_token_id and ids[-1] == bpe_tokenizer.eos_token_id
        prompt = bpe_tokenizer.decode(ids[1 : int(row["prompt_length"])])
        assert prompt.startswith("### Instruction:\n") and prompt.endswith("### Response:\n")
        assert bpe_tokenizer.decode(ids[int(row["prompt_length"]) : -1]) == "short answer"


def test_the_tokenizers_chat_template_is_used_when_it_has_one(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = "{% for m in messages %}<s>[INST] {{ m['content'] }} [/INST]{% endfor %}"
    task = load_task(TaskSpec(name="trec_instruct", max_train_samples=20, max_eval_samples=6))
    row = encode_instruction(task, tok, max_length=96)["validation"][0]
    source = task.splits["validation"][0]
    ids = row["input_ids"].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, not a second one
    assert tok.decode(ids[: int(row["prompt_length"])]) == f"<s>[INST] {source['instruction']}\n\n{source['input']} [/INST]"
    templated = load_task(TaskSpec(name="trec_instruct", max_train_samples=20, max_eval_samples=6, prompt_format="template"))
    assert tok.decode(encode_instruction(templated, tok, 128)["validation"][0]["input_ids"]).startswith("<s>Below is an instruction")
    with pytest.raises(UsageError, match="has no chat template: set prompt_format: template"):
        encode_instruction(load_task(TaskSpec(name="trec_instruct", max_train_samples=20, prompt_format="chat")),
                           bpe_tokenizer, 96)


# ---- local files and the Hub ---------------------------------------------------------------


def _local(frame: pd.DataFrame, suffix: str, tmp_path=None, **spec):
    import tempfile
    from pathlib import Path

    folder = Path(tmp_path or tempfile.mkdtemp(prefix="melora-instruct-"))
    path = folder / f"rows.{suffix}"
    if suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == "json":
        frame.to_json(path, orient="records")  # a JSON array, as alpaca_data.json is
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return load_task(TaskSpec(path=str(path), **spec))


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_local_instruction_files_in_every_format(kind, tmp_path):
    frame = alpaca_frame()
    task = _local(frame, kind, tmp_path)
    assert task.is_instruction and task.main_metric == "loss" and task.label_names is None  # free-form answers
    assert task.metrics == ("loss", "perplexity")
    rows = pd.concat([task.splits[s].to_pandas() for s in ("train", "validation", "test")])
    assert sorted(rows["output"]) == sorted(frame["output"]) and sorted(rows.columns) == ["input", "instruction", "output"]
    assert (rows["input"] == "").sum() == (frame["input"] == "").sum()  # an empty cell (NaN in a csv) is no input


def test_renamed_columns_missing_input_and_short_answers(tmp_path):
    frame = pd.DataFrame({"prompt": [f"What is {i} plus {i}?" for i in range(40)],
                          "answer": ["even" if i % 2 == 0 else "even number" for i in range(40)]})
    task = _local(frame, "jsonl", tmp_path, instruction_column="prompt", output_column="answer")
    assert task.label_names == ["even", "even number"] and task.main_metric == "exact_match"
    assert set(task.splits["train"]["input"]) == {""}
    tok_task = _local(frame, "jsonl", tmp_path, instruction_column="prompt", output_column="answer", metric="loss")
    assert tok_task.main_metric == "loss"


def test_bad_instruction_data_gets_one_line(tmp_path):
    frame = alpaca_frame(20)
    with pytest.raises(UsageError, match=r"no column 'answer' for instruction data; its columns are instruction, input, output"):
        _local(frame, "jsonl", tmp_path, kind="instruction", output_column="answer")
    empty = frame.assign(output=[""] + list(frame["output"][1:]))
    with pytest.raises(UsageError, match=r"1 of 20 rows have an empty 'output'; drop or fill them"):
        _local(empty, "jsonl", tmp_path)
    with pytest.raises(UsageError, match="is instruction data: metric 'accuracy' does not apply; choose one of exact_match, loss"):
        load_task(TaskSpec(name="trec_instruct", metric="accuracy"))
    with pytest.raises(UsageError, match="metric 'exact_match' does not apply"):
        load_task(TaskSpec(name="trec", metric="exact_match"))
    with pytest.raises(UsageError, match="is instruction data: set task.kind to auto or instruction"):
        load_task(TaskSpec(name="trec_instruct", kind="classification"))
    with pytest.raises(Exception, match=r"only \{instruction\} and \{input\} are filled in"):
        TaskSpec(name="trec_instruct", prompt_template="{instruction} {question}")


def test_hub_datasets_load_through_datasets_load_dataset(tmp_path):
    """The Hub path is datasets.load_dataset; offline it is given a dataset folder (what a Hub repository of
    jsonl files is once cached), so the same code runs without network."""
    folder = tmp_path / "my-instructions"
    folder.mkdir()
    frame = alpaca_frame()
    frame.to_json(folder / "train.jsonl", orient="records", lines=True)
    task = load_task(TaskSpec(hub_dataset=str(folder), hub_split="train"))
    assert task.is_instruction and task.name == "my-instructions" and task.source == str(folder)
    rows = pd.concat([task.splits[s].to_pandas() for s in ("train", "validation", "test")])
    assert sorted(rows["output"]) == sorted(frame["output"])
    with pytest.raises(UsageError, match=r"\(split 'validation'\)"):
        load_task(TaskSpec(hub_dataset=str(folder), hub_split="validation"))


def test_a_hub_dataset_that_cannot_be_loaded_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"cannot load Hub dataset 'melora-tune-tests/no-such-set' \(split 'train'\): .*"
                                         r"save it to a local jsonl file and set task.path"):
        load_task(TaskSpec(name="alpaca", hub_dataset="melora-tune-tests/no-such-set"))


# ---- metrics and decoding ------------------------------------------------------------------


def test_exact_match_known_values():
    assert normalize_answer("  New   York. ") == "new york"
    assert normalize_answer("\u201cPerson\u201d") == "person"
    predictions = ["Person", " location.", "NUMBER!", "entity type", "descriptions"]
    references = ["person", "location", "number", "entity", "description"]
    assert exact_match(predictions, references) == pytest.approx(3 / 5)
    assert exact_match(["a"], ["a"]) == 1.0
    with pytest.raises(UsageError, match="2 generated answers for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_greedy_generation_equals_transformers_generate_row_by_row():
    """Batched, right-padded, cache-free greedy decoding gives what generate(do_sample=False) gives one prompt at a time."""
    import transformers

    from helpers import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    prompts = [[5, 17, 33, 2], [7, 8], [90, 91, 92, 93, 94, 95], [11]]
    generated = greedy_generate(model, prompts, max_new_tokens=6, end_id=None, pad_id=0, batch_size=3)
    for prompt, ours in zip(prompts, generated):
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()
    # an end token stops a row (and is not part of its answer); the others go on
    end = generated[1][2]
    stopped = greedy_generate(model, prompts, max_new_tokens=6, end_id=end, pad_id=0, batch_size=4)
    for ours, full in zip(stopped, generated):
        assert ours == (full[: full.index(end)] if end in full else full)
