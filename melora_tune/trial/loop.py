"""The training loop of one trial: optimizer steps under DeepSpeed; an evaluation and a checkpointed report every
``eval_every_steps`` steps (else every epoch) and at the last step; a non-finite loss ends the trial as "diverged".

A step boundary never straddles two epochs (``ds_config.StepPlan``), so a resumed trial re-creates the epoch's
loader from its step and goes on exactly where the checkpoint left it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from melora_tune import drill
from melora_tune.trial.batches import epoch_loader, to_device
from melora_tune.trial.checkpoint import COMPLETED, DIVERGED, RUNNING
from melora_tune.trial.config import TrainingSection
from melora_tune.trial.ds_config import StepPlan
from melora_tune.trial.evaluate import Evaluator
from melora_tune.trial.persist import TrialCheckpoints
from melora_tune.trial.ranks import Ranks

DIVERGED_SCORE = float("-inf")


class Timings(dict):
    """Seconds per phase of a trial (``import_s``, ``eval_s``, ...), summed over its occurrences."""

    def mark(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self[name] = round(self.get(name, 0.0) + now - since, 3)
        return now


def fresh_state(plan: StepPlan, world: int) -> dict[str, Any]:
    return {
        "status": RUNNING,
        "reason": None,
        "step": 0,
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "world_size": world,
        "metrics": None,
        "best": None,
        "history": [],
        "train_time_s": 0.0,
        "restarts": 0,
    }


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclass
class Window:
    """The training since the last evaluation: summed loss, micro-batches, samples, and its time on the clock."""

    loss_sum: float = 0.0
    micro_count: float = 0.0
    samples: float = 0.0
    train_time: float = 0.0
    started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def restart(self) -> None:
        """An empty window, on the clock from now."""
        self.loss_sum = self.micro_count = self.samples = self.train_time = 0.0
        self.start()

    def stop(self) -> None:
        if self.started is not None:
            self.train_time += time.perf_counter() - self.started
            self.started = None


class TrainLoop:
    """``describe(state)``: the trial's facts every report starts with (status, step, parameter counts, ...)."""

    def __init__(self, *, name: str, training: TrainingSection, plan: StepPlan, engine, scheduler, ranks: Ranks,
                 train_ds, val_ds, test_ds, collate, evaluator: Evaluator, checkpoints: TrialCheckpoints, timings: Timings,
                 describe: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.name = name
        self.tr = training
        self.plan = plan
        self.engine = engine
        self.scheduler = scheduler
        self.ranks = ranks
        self.train_ds = train_ds
        self.val_ds = val_ds
        self.test_ds = test_ds
        self.collate = collate
        self.evaluator = evaluator
        self.checkpoints = checkpoints
        self.timings = timings
        self.describe = describe

    def train(self, state: dict[str, Any]) -> dict[str, Any]:
        """Train from ``state["step"]`` to the last step (or divergence); ``state`` is updated and returned."""
        plan = self.plan
        step = state["step"]
        window = Window()
        self.engine.train()
        while step < plan.total_steps:
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            loader = epoch_loader(self.train_ds, self.tr, plan, self.collate, rank=self.ranks.rank,
                                  world=self.ranks.world, epoch=epoch, skip_steps=in_epoch)
            window.start()
            for step_loss in self.optimizer_steps(loader, step, window):
                step += 1
                if self.ranks.all_sum([0.0 if finite(step_loss) else 1.0])[0]:
                    window.stop()
                    return self.diverge(state, step, f"non-finite training loss at step {step} (lr={self.tr.lr:g})",
                                        window.train_time)
                if self.evaluates_at(step):
                    window.stop()
                    if not self.evaluate_and_report(state, step, window):
                        return state
                    window.restart()  # in place: optimizer_steps adds to this window
                if step == plan.total_steps:
                    break
            window.stop()
        return state

    def optimizer_steps(self, loader, step: int, window: Window) -> Iterator[float]:
        """Forward, backward and DeepSpeed's step over ``loader``'s micro-batches; yields each optimizer step's
        summed micro-batch loss (DeepSpeed steps the optimizer every ``grad_accum`` micro-batches)."""
        inject = self.tr.debug_inject_nan_at_step
        step_loss = 0.0
        for i, batch in enumerate(loader):
            batch = to_device(batch, self.ranks.device)
            loss = self.engine(**batch).loss
            if inject is not None and step + 1 == inject:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            value = float(loss.detach())
            step_loss += value
            window.loss_sum += value
            window.micro_count += 1
            window.samples += len(batch["input_ids"])
            if (i + 1) % self.tr.grad_accum:
                continue
            step += 1
            yield step_loss
            step_loss = 0.0

    def evaluates_at(self, step: int) -> bool:
        every = self.tr.eval_every_steps
        end_of_epoch = step % self.plan.steps_per_epoch == 0
        return step == self.plan.total_steps or (every and step % every == 0) or (not every and end_of_epoch)

    def evaluate_and_report(self, state: dict[str, Any], step: int, window: Window) -> bool:
        """Evaluate, record the report in ``state``, report it with a checkpoint; False when the trial diverged."""
        tr, plan = self.tr, self.plan
        totals = self.ranks.all_sum([window.loss_sum, window.micro_count, window.samples])
        train_loss = totals[0] / max(totals[1], 1.0)
        samples_per_s = totals[2] / window.train_time if window.train_time > 0 else 0.0
        state["train_time_s"] = round(state.get("train_time_s", 0.0) + window.train_time, 3)
        t_eval = time.perf_counter()
        metrics = self.evaluator.evaluate(self.val_ds)
        self.timings.mark("eval_s", t_eval)
        # validation time (not the test split's): with train_time_s, what an evaluation costs a search
        state["eval_time_s"] = round(state.get("eval_time_s", 0.0) + time.perf_counter() - t_eval, 3)
        if not finite(metrics["eval_loss"]):
            self.diverge(state, step, f"non-finite eval loss at step {step} (lr={tr.lr:g})", 0.0)
            return False
        state["step"] = step
        state["status"] = COMPLETED if step == plan.total_steps else RUNNING
        test = self.test_metrics(metrics) if step == plan.total_steps or tr.test_every_eval else {}
        metrics = {
            **self.describe(state),
            "train_loss": train_loss,
            **metrics,
            "score": self.evaluator.score(metrics),
            "samples_per_s": round(samples_per_s, 3),
            "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else tr.lr,
            "train_time_s": state["train_time_s"],
            "eval_time_s": state["eval_time_s"],
            "reason": None,
            **test,
        }
        state["metrics"] = metrics
        state["history"].append(metrics)
        if state["best"] is None or metrics["score"] > state["best"]["score"]:
            state["best"] = metrics
        if self.ranks.rank == 0:
            print(
                f"[{self.name}] step {step}/{plan.total_steps} epoch {metrics['epoch']:.2f} "
                f"train_loss {train_loss:.4f} eval_loss {metrics['eval_loss']:.4f} score {metrics['score']:.4f} "
                f"{samples_per_s:.1f} samples/s",
                flush=True,
            )
        self.report(metrics, state, full_checkpoint=True)
        drill.point("worker.reported")
        return True

    def test_metrics(self, val_metrics: dict[str, float]) -> dict[str, float]:
        """The test split's metrics (``training.score_test``; nothing without it: a search trial never holds test)."""
        if self.test_ds is None:
            return {}
        t = time.perf_counter()
        out = self.evaluator.test_metrics(self.test_ds, val_metrics)
        self.timings.mark("test_s", t)
        return out

    def diverge(self, state: dict[str, Any], step: int, reason: str, train_time: float) -> dict[str, Any]:
        state.update(status=DIVERGED, reason=reason, step=step)
        state["train_time_s"] = round(state.get("train_time_s", 0.0) + train_time, 3)
        metrics = {**self.describe(state), "score": DIVERGED_SCORE, "reason": reason, "train_time_s": state["train_time_s"]}
        state["metrics"] = metrics
        state["history"].append(metrics)
        if self.ranks.rank == 0:
            print(f"[{self.name}] diverged: {reason}", flush=True)
        self.report(metrics, state, full_checkpoint=False)
        return state

    def report(self, metrics: dict[str, Any], state: dict[str, Any], *, full_checkpoint: bool) -> None:
        t = time.perf_counter()
        self.checkpoints.report(metrics, state, full_checkpoint=full_checkpoint)
        self.timings.mark("checkpoint_report_s", t)
