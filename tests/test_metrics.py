"""GLUE metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from melora_tune.data import compute_metrics
from melora_tune.errors import UsageError

# Confusion matrix TP=3, FN=1, FP=1, TN=5:
#   accuracy 8/10; precision = recall = 3/4 so F1 = 3/4;
#   MCC = (3*5 - 1*1) / sqrt(4*4*6*6) = 14/24.
GOLD = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PRED = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]


def logits_for(ids, num_classes=2):
    logits = np.full((len(ids), num_classes), -1.0, dtype=np.float32)
    logits[np.arange(len(ids)), ids] = 2.0
    return logits


def test_binary_metrics_from_logits_match_hand_computed_values():
    result = compute_metrics(["accuracy", "f1", "matthews_correlation"], logits_for(PRED), GOLD)
    assert result == pytest.approx({"accuracy": 0.8, "f1": 0.75, "matthews_correlation": 14 / 24})
    assert list(result) == ["accuracy", "f1", "matthews_correlation"]


def test_class_ids_and_torch_tensors_give_the_same_numbers():
    from_ids = compute_metrics(("accuracy", "f1"), np.array(PRED), np.array(GOLD))
    from_torch = compute_metrics(("accuracy", "f1"), torch.tensor(logits_for(PRED)), torch.tensor(GOLD))
    assert from_ids == pytest.approx({"accuracy": 0.8, "f1": 0.75})
    assert from_torch == pytest.approx(from_ids)


def test_macro_f1_for_three_classes():
    # Per class F1: 0 -> 1/2, 1 -> 4/5, 2 -> 2/3.
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    result = compute_metrics(["accuracy", "f1_macro"], logits_for(pred, 3), gold)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_pearson_and_spearman_match_hand_computed_values():
    # x deviations (-2,-1,0,1,2), y deviations (-2,0,1,0,1): r = 6/sqrt(10*6).
    # Ranks of y with ties (1, 2.5, 4.5, 2.5, 4.5): rho = 7/sqrt(10*9).
    gold = [1.0, 2.0, 3.0, 4.0, 5.0]
    pred = np.array([2.0, 4.0, 5.0, 4.0, 5.0], dtype=np.float32)
    expected = {"pearson": 6 / math.sqrt(60), "spearmanr": 7 / math.sqrt(90)}
    assert compute_metrics(["pearson", "spearmanr"], pred, gold) == pytest.approx(expected)
    assert compute_metrics(["pearson", "spearmanr"], pred.reshape(-1, 1), gold) == pytest.approx(expected)


def test_undefined_correlation_is_zero_not_nan():
    # A collapsed regressor (constant output) or a diverged one (NaN) must stay a valid, bad score.
    gold = [0.5, 1.0, 3.0, 4.5]
    assert compute_metrics(["pearson", "spearmanr"], [2.0, 2.0, 2.0, 2.0], gold) == {"pearson": 0.0, "spearmanr": 0.0}
    assert compute_metrics(["pearson"], [1.0, float("nan"), 2.0, 3.0], gold) == {"pearson": 0.0}
    # MCC and F1 of a classifier that always says 0.
    assert compute_metrics(["matthews_correlation", "f1"], [0, 0, 0, 0], [0, 1, 0, 1]) == {
        "matthews_correlation": 0.0,
        "f1": 0.0,
    }


def test_bad_inputs_are_usage_errors():
    with pytest.raises(UsageError, match="did you mean 'matthews_correlation'"):
        compute_metrics(["mathews_correlation"], [0, 1], [0, 1])
    with pytest.raises(UsageError, match="3 predictions for 2 labels"):
        compute_metrics(["accuracy"], [0, 1, 1], [0, 1])
    with pytest.raises(UsageError, match="logits of shape"):
        compute_metrics(["accuracy"], np.array([0.2, 0.9]), [0, 1])
    with pytest.raises(UsageError, match=r"\(N,\) or \(N, 1\)"):
        compute_metrics(["pearson"], np.zeros((2, 3)), [0.0, 1.0])
    with pytest.raises(UsageError, match="f1_macro"):
        compute_metrics(["f1"], [0, 1, 2], [0, 1, 2])
