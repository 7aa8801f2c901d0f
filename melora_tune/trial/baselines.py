"""Reference points on the splits a search uses: the search's winner must beat not fine-tuning at all.

Both baselines read exactly the train / validation / test rows a trial reads
(``load_task(cfg.task_spec())``) and are scored in the task's score metric.

* ``majority``: predict the most frequent class of the *train* split (ties: the
  lowest class id) for every row; regression predicts the train mean, whose
  pearson is 0.0 by our metrics' convention. Anything that scores near it has
  learnt the label prior only.
* ``probe``: a linear model on the frozen base model's features, i.e. what the
  classification head sees before any training: the encoder's
  ``pooler_output`` after ``apply_pooling`` (mean / cls / the model's own
  pooler), or the first token's last hidden state for models without a pooler
  (RoBERTa's head reads that one). Features are standardised with the train
  split's mean and std; classification fits a logistic regression
  ``min_w C * sum_i CE(w x_i, y_i) + ||w||^2 / 2`` and regression a ridge
  ``min_w sum_i (w x_i - y_i)^2 + alpha ||w||^2`` with ``alpha = 1 / (2 C)``, the
  same objective scaled by 1/(2C), so ``probe_C`` means the same for both. C
  comes from a log grid by the validation score, as a search picks its winner
  by validation; test is scored once with that C. A fine-tuned adapter that
  cannot beat the probe has added nothing a linear head on the base model lacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from melora_tune.adapters.models import auto_class, causal_lm_overrides, load_config, resolve_model
from melora_tune.adapters.pooling import TokenPooler, apply_pooling, resolve_pooling
from melora_tune.data import compute_metrics, encode_classification, load_task
from melora_tune.data.instruct import encode_instruction
from melora_tune.errors import UsageError
from melora_tune.records import baseline_metric
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.prepare import task_metrics
from melora_tune.trial.worker import pad_collate

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)


@dataclass
class Baselines:
    metric: str  # the task's score metric, what every score below is
    scores: dict[str, dict[str, float | None]]  # {"majority": {"val": x, "test": y}, "probe": {...}}; test None without a test split
    majority_share: float | None  # share of the validation split's most common class; None for regression
    probe_C: float
    pooling: str  # resolved: model | mean | cls
    seconds: float

    def to_metrics(self) -> dict[str, float]:
        out = {baseline_metric(name, split): value for name, by_split in self.scores.items()
               for split, value in by_split.items() if value is not None}
        if self.majority_share is not None:
            out["majority_share"] = self.majority_share
        return out

    def describe(self) -> str:
        def fmt(name: str) -> str:
            s = self.scores[name]
            return f"{name} val {s['val']:.4f}" + ("" if s["test"] is None else f" test {s['test']:.4f}")

        share = "" if self.majority_share is None else f" (val share {self.majority_share:.3f})"
        return (f"baselines ({self.metric}): {fmt('majority')}{share}; {fmt('probe')} "
                f"(C={self.probe_C:g}, pooling {self.pooling}); {self.seconds:.1f}s")


def frozen_model(cfg: TrialConfig, num_labels: int, pooling: str | None = None):
    """(model, tokenizer, resolved pooling) loaded as ``TrialWorker.build`` loads them, in eval mode."""
    import transformers  # heavy: transformers

    path = resolve_model(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    torch.manual_seed(cfg.training.seed)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # "newly initialized classifier": the probe never uses it
    try:
        model = auto_class(cfg.task_type).from_pretrained(path, dtype=torch.float32, num_labels=num_labels)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # TrialConfig gains ``pooling`` (default auto) with the worker's pooling change; until then auto.
    resolved = resolve_pooling(pooling or getattr(cfg, "pooling", "auto"), path, model, task_type=cfg.task_type)
    apply_pooling(model, resolved)
    return model.eval(), tokenizer, resolved


@torch.no_grad()
def pooled_features(model, rows, pad_token_id: int, batch_size: int = 64) -> np.ndarray:
    """(N, hidden) float32: the head's input for each encoded row (``encode_classification`` output)."""
    from torch.utils.data import DataLoader, Subset  # heavy: torch

    encoder = model.base_model
    poolers = [m for m in model.modules() if isinstance(m, TokenPooler)]
    # Batches of similar length: per-batch padding then costs little (about half the time on Rotten Tomatoes).
    order = np.argsort([len(ids) for ids in rows["input_ids"]], kind="stable")
    out = []
    for batch in DataLoader(Subset(rows, order.tolist()), batch_size=batch_size, collate_fn=pad_collate(pad_token_id)):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        for pooler in poolers:  # apply_pooling's mask hook sits on the whole model, which this call bypasses
            pooler.mask = inputs["attention_mask"]
        result = encoder(**inputs)
        pooled = getattr(result, "pooler_output", None)
        out.append((pooled if pooled is not None else result.last_hidden_state[:, 0]).float())
    for pooler in poolers:
        pooler.mask = None
    features = np.empty((len(order), out[0].shape[1]), dtype=np.float32)
    features[order] = torch.cat(out).numpy()
    return features


def _labels(rows) -> np.ndarray:
    return rows.select_columns(["labels"]).with_format("numpy")[:]["labels"]


def compute_baselines(cfg: TrialConfig, *, task=None, batch_size: int = 64, pooling: str | None = None) -> Baselines:
    """Majority-class and linear-probe scores on ``cfg``'s splits; ``pooling`` overrides the config's."""
    from sklearn.linear_model import LogisticRegression, Ridge  # heavy: scikit-learn
    from sklearn.preprocessing import StandardScaler  # heavy: scikit-learn

    t0 = time.perf_counter()
    if cfg.task_type == "causal_lm":
        task = task if task is not None else load_task(cfg.task_spec())
        if not (task.is_instruction and task.label_names and task.main_metric == "exact_match"):
            raise UsageError("baselines of a causal LM need instruction data with short answers scored by exact_match "
                             f"(task {task.name!r} is scored by {task.main_metric if task.is_instruction else 'loss'})")
        return instruction_baselines(cfg, task, batch_size=batch_size, t0=t0)
    if cfg.task_type != "seq_cls":
        raise UsageError(f"baselines are for sequence classification (task_type seq_cls), not {cfg.task_type}")
    task = task if task is not None else load_task(cfg.task_spec())
    metric = task_metrics(task, cfg.task_type)[1]
    splits = [s for s in ("train", "validation", "test") if s in task.splits]
    model, tokenizer, resolved = frozen_model(cfg, task.num_labels, pooling)
    encoded = encode_classification(task, tokenizer, cfg.training.max_length, pad_to_max_length=False)
    labels = {s: _labels(encoded[s]) for s in splits}
    feats = {s: pooled_features(model, encoded[s], tokenizer.pad_token_id, batch_size) for s in splits}
    scaler = StandardScaler().fit(feats["train"])
    feats = {s: scaler.transform(x) for s, x in feats.items()}

    def score(predictions: np.ndarray, split: str) -> float | None:
        return compute_metrics([metric], predictions, labels[split])[metric] if split in labels else None

    if task.is_regression:
        constant, share = float(labels["train"].mean()), None
        fit = lambda C: Ridge(alpha=1.0 / (2.0 * C), random_state=0).fit(feats["train"], labels["train"])
    else:
        constant = int(np.bincount(labels["train"], minlength=task.num_labels).argmax())  # argmax: lowest id of a tie
        share = float(np.bincount(labels["validation"]).max() / len(labels["validation"]))
        fit = lambda C: LogisticRegression(C=C, max_iter=2000, random_state=0).fit(feats["train"], labels["train"])
    majority = {split: score(np.full(len(labels[s]), constant), s) if s in labels else None
                for split, s in (("val", "validation"), ("test", "test"))}
    # Strictly better only: of equal validation scores the smallest C (the simplest probe) stays.
    best = None
    for C in C_GRID:
        probe = fit(C)
        val = score(probe.predict(feats["validation"]), "validation")
        if best is None or val > best[1]:
            best = (C, val, probe)
    C, val, probe = best
    test = score(probe.predict(feats["test"]), "test") if "test" in feats else None
    return Baselines(metric=metric, scores={"majority": majority, "probe": {"val": val, "test": test}},
                     majority_share=share, probe_C=C, pooling=resolved, seconds=round(time.perf_counter() - t0, 3))


@torch.no_grad()
def last_prompt_features(model, rows, pad_token_id: int, batch_size: int = 64) -> np.ndarray:
    """(N, hidden) float32: a causal LM's last hidden state at the last prompt token, the state its first answer
    token is predicted from (``encode_instruction`` rows, which carry ``prompt_length``)."""
    from torch.utils.data import DataLoader  # heavy: torch

    prompts = [{"input_ids": ids[: int(n)], "attention_mask": torch.ones(int(n), dtype=torch.long)}
               for ids, n in zip(rows["input_ids"], rows["prompt_length"])]
    out = []
    for batch in DataLoader(prompts, batch_size=batch_size, collate_fn=pad_collate(pad_token_id)):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        last = batch["attention_mask"].sum(1) - 1  # right padding: each row's own last token
        out.append(hidden[torch.arange(len(last)), last].float())
    return torch.cat(out).numpy()


def instruction_baselines(cfg: TrialConfig, task, *, batch_size: int = 64, t0: float) -> Baselines:
    """The same two reference points for instruction data whose answers are labels, in exact match.

    * ``majority``: answer the train split's most frequent output for every row.
    * ``probe``: a logistic regression from the frozen causal LM's state at the last prompt token (what its
      first answer token is predicted from) to the answer, C picked on validation as above; an exact match
      when it picks the reference answer.
    """
    import transformers  # heavy: transformers
    from sklearn.linear_model import LogisticRegression  # heavy: scikit-learn
    from sklearn.preprocessing import StandardScaler  # heavy: scikit-learn

    path = resolve_model(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    torch.manual_seed(cfg.training.seed)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the new LM-head weights: the probe never reads them
    try:
        model = auto_class("causal_lm").from_pretrained(path, dtype=torch.float32,
                                                        **causal_lm_overrides(load_config(path))).eval()
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    splits = [s for s in ("train", "validation", "test") if s in task.splits]
    encoded = encode_instruction(task, tokenizer, cfg.training.max_length, train_prompt_columns=True)
    labels = {s: np.asarray(task.splits[s]["label"]) for s in splits}
    feats = {s: last_prompt_features(model, encoded[s], pad, batch_size) for s in splits}
    scaler = StandardScaler().fit(feats["train"])
    feats = {s: scaler.transform(x) for s, x in feats.items()}
    accuracy = lambda pred, split: float(np.mean(pred == labels[split]))  # noqa: E731  (= exact match of the answer)
    constant = int(np.bincount(labels["train"], minlength=task.num_labels).argmax())
    majority = {"val": accuracy(np.full(len(labels["validation"]), constant), "validation"),
                "test": accuracy(np.full(len(labels["test"]), constant), "test") if "test" in labels else None}
    best = None
    for C in C_GRID:
        probe = LogisticRegression(C=C, max_iter=2000, random_state=0).fit(feats["train"], labels["train"])
        val = accuracy(probe.predict(feats["validation"]), "validation")
        if best is None or val > best[1]:
            best = (C, val, probe)
    C, val, probe = best
    test = accuracy(probe.predict(feats["test"]), "test") if "test" in feats else None
    share = float(np.bincount(labels["validation"]).max() / len(labels["validation"]))
    return Baselines(metric="exact_match", scores={"majority": majority, "probe": {"val": val, "test": test}},
                     majority_share=share, probe_C=C, pooling="last prompt token", seconds=round(time.perf_counter() - t0, 3))
