"""GLUE's metrics, computed with scikit-learn and scipy.

Names follow the Hugging Face ``evaluate`` GLUE metric (``matthews_correlation``,
``pearson``, ``spearmanr``) so logged values line up with other tools.

Undefined values are reported as 0.0, never NaN: a correlation of constant (or
non-finite) predictions, or F1 with no predicted positives. That is the
convention scikit-learn already uses for MCC, and it keeps a diverged trial a
bad-but-valid point for the searcher instead of a failed one.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import numpy as np

from melora_tune.errors import UsageError

from .registry import suggest

CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearmanr")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def _numpy(values: Any, what: str) -> np.ndarray:
    """Lists, numpy arrays and torch tensors alike; a (logits, ...) tuple gives its first item."""
    if isinstance(values, tuple):
        values = values[0]
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object:
        raise UsageError(f"{what} must be a numeric array, got ragged or mixed values")
    return array


def class_ids(predictions: np.ndarray) -> np.ndarray:
    """Logits or probabilities (N, C) -> argmax; integer class ids (N,) pass through."""
    if predictions.ndim == 2 and predictions.shape[1] >= 2:
        return predictions.argmax(axis=1)
    if predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
        return predictions
    raise UsageError(
        f"classification metrics need logits of shape (N, C>=2) or integer class ids (N,), got shape "
        f"{tuple(predictions.shape)} of {predictions.dtype}"
    )


def regression_values(predictions: np.ndarray) -> np.ndarray:
    if predictions.ndim == 1 or (predictions.ndim == 2 and predictions.shape[1] == 1):
        return predictions.reshape(-1).astype(np.float64)
    raise UsageError(f"regression metrics need outputs of shape (N,) or (N, 1), got {tuple(predictions.shape)}")


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold))


def _f1_binary(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import f1_score  # heavy: scikit-learn takes ~1 s to import

    classes = np.union1d(np.unique(gold), np.unique(pred))
    if not np.isin(classes, [0, 1]).all():
        raise UsageError("f1 is the binary F1 of class 1 (GLUE's MRPC/QQP); use f1_macro for more than two classes")
    return float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))


def _f1_macro(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import f1_score  # heavy: scikit-learn takes ~1 s to import

    # Averaged over the classes present in the gold labels or the predictions.
    return float(f1_score(gold, pred, average="macro", zero_division=0))


def _mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef  # heavy: scikit-learn takes ~1 s to import

    return float(matthews_corrcoef(gold, pred))


def _correlation(kind: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def compute(pred: np.ndarray, gold: np.ndarray) -> float:
        from scipy import stats  # heavy: only the regression metrics need scipy

        if len(pred) < 2 or not np.all(np.isfinite(pred)) or np.ptp(pred) == 0 or np.ptp(gold) == 0:
            return 0.0
        result = stats.pearsonr(pred, gold) if kind == "pearson" else stats.spearmanr(pred, gold)
        value = float(result.statistic)
        return value if np.isfinite(value) else 0.0

    return compute


_CLASSIFICATION = {"accuracy": _accuracy, "f1": _f1_binary, "f1_macro": _f1_macro, "matthews_correlation": _mcc}
_REGRESSION = {"pearson": _correlation("pearson"), "spearmanr": _correlation("spearmanr")}


def compute_metrics(metric_names: Any, predictions: Any, labels: Any) -> dict[str, float]:
    """Each named metric of ``predictions`` against ``labels``.

    ``predictions``: logits (N, C) or class ids (N,) for classification metrics;
    outputs (N,) or (N, 1) for regression metrics. Numpy, torch or lists.
    """
    names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
    for name in names:
        if name not in METRICS:
            raise UsageError(f"unknown metric {name!r}{suggest(name, list(METRICS))}")
    preds = _numpy(predictions, "predictions")
    gold = _numpy(labels, "labels").reshape(-1)
    if preds.shape[0] != gold.shape[0]:
        raise UsageError(f"{preds.shape[0]} predictions for {gold.shape[0]} labels")
    if gold.shape[0] == 0:
        raise UsageError("no predictions to score")
    results: dict[str, float] = {}
    if any(n in _CLASSIFICATION for n in names):
        ids = class_ids(preds)
        gold_ids = gold.astype(np.int64)
        for name in names:
            if name in _CLASSIFICATION:
                results[name] = _CLASSIFICATION[name](ids, gold_ids)
    if any(n in _REGRESSION for n in names):
        values = regression_values(preds)
        gold_values = gold.astype(np.float64)
        for name in names:
            if name in _REGRESSION:
                results[name] = _REGRESSION[name](values, gold_values)
    return {name: results[name] for name in names}


# ---- generated text ------------------------------------------------------------

_EDGE_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019"


def normalize_answer(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace do not count: " Person." == "person"."""
    return " ".join(str(text).lower().split()).strip(_EDGE_PUNCTUATION + " ")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of generated answers equal to their reference after ``normalize_answer``."""
    if len(predictions) != len(references):
        raise UsageError(f"{len(predictions)} generated answers for {len(references)} references")
    if not references:
        raise UsageError("no answers to score")
    return float(np.mean([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]))
