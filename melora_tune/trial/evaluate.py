"""A trial's evaluation: the metrics of a whole split computed from every rank's shard, identical on every rank.

Each rank evaluates its shard of the split (padded, see ``batches.eval_loader``); the per-sample outputs are
gathered and the padding dropped, so the metrics are those of the full split. Instruction tasks scored by exact
match also generate greedy answers (``trial.generation``) for their prompts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from melora_tune.data import compute_metrics
from melora_tune.data.instruct import end_token
from melora_tune.data.metrics import exact_match
from melora_tune.trial.batches import eval_loader, to_device
from melora_tune.trial.generation import greedy_generate
from melora_tune.trial.ranks import Ranks


class Evaluator:
    def __init__(self, engine, ranks: Ranks, *, task, tokenizer, collate, pad_id: int, metric_names: tuple[str, ...],
                 main_metric: str, causal: bool, batch_size: int) -> None:
        self.engine = engine
        self.ranks = ranks
        self.task = task
        self.tokenizer = tokenizer
        self.collate = collate
        self.pad_id = pad_id
        self.metric_names = metric_names
        self.main_metric = main_metric
        self.causal = causal
        self.batch_size = batch_size

    @torch.no_grad()
    def evaluate(self, dataset, split: str = "validation") -> dict[str, float]:
        """``eval_*`` metrics of ``dataset`` (the task's ``split``)."""
        indices, loader = eval_loader(dataset, self.batch_size, self.collate, rank=self.ranks.rank, world=self.ranks.world)
        self.engine.eval()
        outputs = []
        prompts: list[tuple[int, list[int]]] = []  # (row, prompt ids) of this rank's rows, for exact match
        for batch in loader:
            rows, lengths = batch.pop("row", None), batch.pop("prompt_length", None)
            if rows is not None and "exact_match" in self.metric_names:
                prompts += [(int(r), ids[:n].tolist()) for r, ids, n in zip(rows, batch["input_ids"], lengths)]
            batch = to_device(batch, self.ranks.device)
            labels = batch.pop("labels")
            logits = self.engine(**batch).logits.float()
            if self.causal:
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
                mask = shift_labels != -100
                outputs.append(torch.stack([(nll * mask).sum(1), mask.sum(1).float()], 1).double().cpu())
            else:
                outputs.append(torch.cat([logits, labels.float().reshape(len(labels), -1)], 1).cpu())
        self.engine.train()
        rows = self.gathered(indices, torch.cat(outputs).numpy())
        if self.causal:
            loss = float(rows[:, 0].sum() / max(rows[:, 1].sum(), 1.0))
            metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
            if "exact_match" in self.metric_names:
                metrics["eval_exact_match"] = self.exact_match(split, prompts)
            return metrics
        return self.classification_metrics(rows)

    def gathered(self, indices: list[int], local: np.ndarray) -> np.ndarray:
        """Every rank's rows of the split, in split order, one copy each."""
        seen: dict[int, Any] = {}
        for idx, rows in self.ranks.all_gather((indices, local)):
            for i, row in zip(idx, rows):
                seen.setdefault(i, row)  # the padding repeats early samples: keep one copy
        return np.stack([seen[i] for i in sorted(seen)])

    def classification_metrics(self, rows: np.ndarray) -> dict[str, float]:
        predictions, labels = rows[:, :-1], rows[:, -1]
        if self.task.is_regression:
            predictions = predictions[:, 0]
            loss = float(np.mean((predictions - labels) ** 2))
        else:
            logits = torch.from_numpy(predictions)
            loss = float(F.cross_entropy(logits, torch.from_numpy(labels).long()))
            labels = labels.astype(np.int64)
        metrics = {"eval_loss": loss}
        metrics.update({f"eval_{k}": float(v) for k, v in compute_metrics(self.metric_names, predictions, labels).items()})
        return metrics

    def exact_match(self, split: str, prompts: list[tuple[int, list[int]]]) -> float:
        """Greedy answers to this rank's prompts, gathered, against the split's reference outputs."""
        references = self.task.splits[split]["output"]
        new_tokens = self.task.max_new_tokens
        if self.task.answer_names:  # short labels: the longest one, plus its end token
            longest = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in self.task.answer_names)
            new_tokens = min(new_tokens, longest + 1)

        def everyone_done(done: bool) -> bool:
            return self.ranks.all_sum([0.0 if done else 1.0])[0] == 0.0

        answers = greedy_generate(
            self.engine, [ids for _, ids in prompts], max_new_tokens=new_tokens, end_id=end_token(self.tokenizer),
            pad_id=self.pad_id, device=self.ranks.device, batch_size=self.batch_size, everyone_done=everyone_done,
        )
        local = [(row, self.tokenizer.decode(ids, skip_special_tokens=True)) for (row, _), ids in zip(prompts, answers)]
        texts: dict[int, str] = {}
        for part in self.ranks.all_gather(local):
            for row, text in part:
                texts.setdefault(row, text)  # the sampler's padding repeats rows: one copy each
        return exact_match([texts[r] for r in sorted(texts)], [references[r] for r in sorted(texts)])

    def score(self, metrics: dict[str, float]) -> float:
        """Higher is better: the task's main metric, or minus the eval loss (a causal LM on classification data,
        or instruction data scored by loss)."""
        if self.main_metric == "loss":
            return -metrics["eval_loss"]
        return metrics[f"eval_{self.main_metric}"]

    def test_metrics(self, test_ds, val_metrics: dict[str, float]) -> dict[str, float]:
        """The final model on the test split: ``test_*``, ``test_score``, and ``val_score`` (the same model's
        validation score, next to it)."""
        test = self.evaluate(test_ds, "test")
        out = {"test_" + k.removeprefix("eval_"): v for k, v in test.items()}
        out["test_score"] = self.score(test)
        out["val_score"] = self.score(val_metrics)
        return out
