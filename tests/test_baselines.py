"""Baselines on a search's own splits: the majority class and a linear probe on frozen pooled features.

Real code throughout: a tiny random BERT (with the bundled MiniLM tokenizer) saved to disk, local CSV
tasks whose class counts are known, and one check on the bundled MiniLM and Rotten Tomatoes.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import save_tiny_classifier
from melora_tune.data import encode_classification, load_task
from melora_tune.errors import UsageError
from melora_tune.trial.baselines import compute_baselines, frozen_model, pooled_features
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.batches import pad_collate

FRUIT = "apple banana cherry grape lemon mango peach plum melon kiwi".split()
VEHICLES = "car truck bus train boat plane bike tram ship taxi".split()


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))


def _write(path, labels: list, seed: int = 0) -> str:
    """One row per label; "neg"/0 rows talk about fruit, every other label about vehicles."""
    rng = random.Random(seed)
    texts = [_sentence(rng, FRUIT if label in ("neg", 0) else VEHICLES) for label in labels]
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_classifier(tmp_path_factory.mktemp("baselines") / "tiny"))


def _cfg(model: str, **task) -> TrialConfig:
    return TrialConfig.from_dict({"model": model, "task": {"name": "toy", **task}, "training": {"max_length": 32}})


def test_majority_is_the_train_splits_class_scored_on_validation(tiny_model, tmp_path):
    # train: 6 pos / 4 neg; validation: 7 neg / 3 pos. Names sort to neg=0, pos=1.
    train = _write(tmp_path / "train.csv", ["pos"] * 6 + ["neg"] * 4)
    val = _write(tmp_path / "val.csv", ["neg"] * 7 + ["pos"] * 3, seed=1)
    b = compute_baselines(_cfg(tiny_model, path=train, validation_path=val, test_fraction=0.0))
    assert b.metric == "accuracy"
    assert b.scores["majority"] == {"val": pytest.approx(0.3), "test": None}  # predicts train's "pos", not val's "neg"
    assert b.majority_share == pytest.approx(0.7)
    assert b.scores["probe"]["test"] is None
    metrics = b.to_metrics()
    assert set(metrics) == {"baseline.majority.val", "baseline.probe.val", "majority_share"}
    assert metrics["baseline.majority.val"] == pytest.approx(0.3) and metrics["majority_share"] == pytest.approx(0.7)
    assert "majority val 0.3000" in b.describe() and "test" not in b.describe()


def test_majority_tie_predicts_the_lowest_class_id(tiny_model, tmp_path):
    train = _write(tmp_path / "train.csv", ["pos"] * 5 + ["neg"] * 5)
    val = _write(tmp_path / "val.csv", ["neg"] * 3 + ["pos"] * 7, seed=1)
    b = compute_baselines(_cfg(tiny_model, path=train, validation_path=val, test_fraction=0.0))
    assert b.scores["majority"]["val"] == pytest.approx(0.3)  # neg (id 0) for every row
    assert b.majority_share == pytest.approx(0.7)


def test_probe_reads_the_label_off_the_features_majority_does_not(tiny_model, tmp_path):
    # 200 rows, 120 vehicles (1) / 80 fruit (0); stratified splits: 40 validation and 40 test rows, 60% class 1.
    data = _write(tmp_path / "toy.csv", [1] * 120 + [0] * 80)
    cfg = _cfg(tiny_model, path=data, validation_fraction=0.2, test_fraction=0.2)
    task = load_task(cfg.task_spec())
    b = compute_baselines(cfg, task=task)
    assert b.pooling == "model"  # no sentence-transformers pooling config next to the tiny model: its own pooler
    assert b.scores["majority"] == {"val": pytest.approx(0.6), "test": pytest.approx(0.6)}
    assert b.scores["probe"]["val"] >= 0.9 and b.scores["probe"]["test"] >= 0.9
    assert b.probe_C in (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)
    assert set(b.to_metrics()) == {f"baseline.{n}.{s}" for n in ("majority", "probe") for s in ("val", "test")} | {"majority_share"}


def test_features_are_the_pooled_encoder_states_padding_excluded(tiny_model, tmp_path):
    data = _write(tmp_path / "toy.csv", [1] * 12 + [0] * 8)
    cfg = _cfg(tiny_model, path=data, validation_fraction=0.2, test_fraction=0.2)
    task = load_task(cfg.task_spec())
    features = {}
    for pooling in ("mean", "cls"):
        model, tok, resolved = frozen_model(cfg, task.num_labels, pooling)
        assert resolved == pooling and not model.training
        rows = encode_classification(task, tok, 32, pad_to_max_length=False)["train"]
        assert len({len(ids) for ids in rows["input_ids"]}) > 1  # batches are padded
        features[pooling] = pooled_features(model, rows, tok.pad_token_id, batch_size=5)
        with torch.no_grad():  # one row at a time: no padding at all
            states = [model.base_model(input_ids=r["input_ids"][None]).last_hidden_state[0] for r in rows]
        expected = torch.stack([s.mean(0) if pooling == "mean" else s[0] for s in states]).numpy()
        np.testing.assert_allclose(features[pooling], expected, atol=1e-5)
        # what the head reads: the whole model's logits on a padded batch are its classifier on these features
        batch = pad_collate(tok.pad_token_id)([rows[i] for i in range(len(rows))])
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            np.testing.assert_allclose(logits.numpy(), model.classifier(torch.from_numpy(features[pooling])).numpy(), atol=1e-5)
    assert not np.allclose(features["mean"], features["cls"], atol=1e-3)


def test_regression_predicts_the_train_mean_and_fits_a_ridge_probe(tiny_model, tmp_path):
    import transformers

    # The encoder alone: the 2-label head of tiny_model cannot load as a 1-output regression head.
    encoder = tmp_path / "encoder"
    transformers.BertModel.from_pretrained(tiny_model).save_pretrained(encoder)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(encoder)
    rng = random.Random(0)
    shares = [rng.random() for _ in range(150)]
    texts = [" ".join(rng.choice(VEHICLES if rng.random() < s else FRUIT) for _ in range(8)) for s in shares]
    path = tmp_path / "reg.csv"
    pd.DataFrame({"text": texts, "label": [round(s, 3) + 0.0005 for s in shares]}).to_csv(path, index=False)
    b = compute_baselines(_cfg(str(encoder), path=str(path), validation_fraction=0.2, test_fraction=0.2))
    assert b.metric == "pearson" and b.majority_share is None
    assert b.scores["majority"] == {"val": 0.0, "test": 0.0}  # a constant has no correlation
    assert b.scores["probe"]["val"] > 0.5 and b.scores["probe"]["test"] > 0.5


def test_causal_lm_baselines_need_instruction_data_with_short_answers():
    with pytest.raises(UsageError, match="need instruction data with short answers scored by exact_match "
                                         r"\(task 'rotten_tomatoes' is scored by loss\)"):
        compute_baselines(TrialConfig.from_dict({"task_type": "causal_lm"}))
    with pytest.raises(UsageError, match=r"\(task 'trec_instruct' is scored by loss\)"):
        compute_baselines(TrialConfig.from_dict({"task_type": "causal_lm", "task": {"name": "trec_instruct", "metric": "loss"}}))


def test_bundled_minilm_probe_beats_majority_on_rotten_tomatoes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~10 s on one core
    try:
        cfg = TrialConfig.from_dict({"task": {"name": "rotten_tomatoes", "max_train_samples": 200, "max_eval_samples": 100},
                                     "training": {"max_length": 64}})
        b = compute_baselines(cfg)
    finally:
        torch.set_num_threads(threads)
    assert b.pooling == "mean"  # MiniLM's 1_Pooling/config.json says mean
    assert b.scores["majority"]["val"] == pytest.approx(b.majority_share)  # train and validation are stratified alike
    assert b.scores["probe"]["val"] > b.scores["majority"]["val"] + 0.05
