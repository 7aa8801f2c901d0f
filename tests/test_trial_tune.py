"""``tune_trial`` under a real ``ray.tune.Tuner``: every report reaches Tune (and ASHA) with its checkpoint.

One-worker trials train inside the Tune trial process (``trial.inprocess``); the
give-up test uses two workers, i.e. a TorchTrainer inside the trial. The tests
share one local Ray cluster (3 CPUs: a 2-worker trial holds 1 + 2).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from melora_tune.trial import TrialConfig, apply_overrides, tune_trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random BERT with the MiniLM tokenizer: what these tests check is what Tune sees of a trial (reports,
    checkpoints, restarts), not what MiniLM learns."""
    from helpers import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert", max_positions=64)


def small(**overrides) -> TrialConfig:
    base = {"max_train_samples": 128, "max_eval_samples": 32, "epochs": 1, "micro_batch_size": 16, "max_length": 32,
            "method": "lora", "r": 2, "zero_stage": 1, "eval_every_steps": 4}
    return apply_overrides(TrialConfig(), {**base, **overrides})


def test_tuner_runs_two_trials_and_sees_every_report(ray_cluster, tiny_model, tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = small(model=str(tiny_model))
    tuner = tune.Tuner(
        tune_trial,
        param_space={"trial": base.to_dict(), "lr": tune.grid_search([1e-3, 3e-3])},
        tune_config=tune.TuneConfig(
            metric="score", mode="max", max_concurrent_trials=1,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=2, grace_period=1),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path)),
    )
    results = tuner.fit()
    assert len(results) == 2 and not results.errors
    lrs = set()
    for result in results:
        # 128 samples / 16 = 8 steps, an evaluation every 4: two reports, both reach Tune
        assert result.metrics["training_iteration"] == 2
        assert result.metrics["step"] == 8 and result.metrics["status"] == "completed"
        assert 0.0 <= result.metrics["score"] <= 1.0 and result.metrics["score"] == result.metrics["eval_accuracy"]
        assert list(result.metrics_dataframe["step"]) == [4, 8]
        assert result.metrics["trial_name"] == f"train_{result.metrics['trial_id']}" and result.metrics["world_size"] == 1
        assert result.checkpoint is not None
        assert (Path(result.checkpoint.path) / "adapter" / "adapter_model.safetensors").is_file()
        # a checkpoint per evaluation, written by the trial process itself: no Ray Train run in the trial folder
        steps = sorted(json.loads(p.read_text())["step"] for p in Path(result.path).glob("checkpoint_*/trial_state.json"))
        assert steps == [4, 8]
        assert not list(Path(result.path).glob("train_*"))
        lrs.add(result.config["lr"])
    assert lrs == {1e-3, 3e-3}


def _trial_processes() -> list:
    """Tune trial processes of this test's own Ray cluster (started by this process, so no one else's)."""
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if proc.name().startswith("ray::ImplicitFunc") or proc.cmdline()[:1] == ["ray::ImplicitFunc.train"]:
                found.append(proc)
        except (psutil.NoSuchProcess, IndexError):
            pass
    return found


def test_in_process_trial_killed_resumes_at_the_same_step_and_nan_is_not_retried(ray_cluster, tiny_model, tmp_path):
    """Three trials of one config, one after the other: the first trial process to have a checkpoint is
    SIGKILLed and Tune restarts it from that checkpoint (same trajectory as the untouched one); the
    third diverges (NaN) and Tune does not retry it."""
    from ray import tune
    from ray.tune import Callback

    class KillOnce(Callback):
        def __init__(self):
            self.killed: list[int] = []
            self.recovered: list[str] = []
            self.seen: dict[str, list[tuple[int, int]]] = {}  # trial id -> (restarts, step) of every report

        def on_trial_result(self, iteration, trials, trial, result, **info):
            # what Tune received, read in the driver (progress.csv may lose the rows of a killed process)
            if result.get("step") is not None:
                self.seen.setdefault(trial.trial_id, []).append((int(result.get("restarts", 0)), int(result["step"])))

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            # Tune has registered the checkpoint: a restart must go on from it
            if self.killed or trial.config.get("debug_inject_nan_at_step"):
                return
            for proc in _trial_processes():
                os.kill(proc.pid, signal.SIGKILL)
                self.killed.append(proc.pid)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.recovered.append(trial.trial_id)

    base = small(model=str(tiny_model), max_train_samples=256, eval_every_steps=3, zero_stage=2, lr=3e-3, seed=7)
    cb = KillOnce()
    results = tune.Tuner(
        tune_trial,
        param_space={"trial": base.to_dict(), "debug_inject_nan_at_step": tune.grid_search([None, None, 2])},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1),
        run_config=tune.RunConfig(name="kill", storage_path=str(tmp_path), callbacks=[cb],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    ).fit()
    assert len(cb.killed) == 1, cb.killed
    assert not results.errors, results.errors
    by_kind = {}
    for result in results:
        kind = "diverged" if result.config["debug_inject_nan_at_step"] else result.metrics["restarts"]
        by_kind[kind] = result
    resumed, reference, diverged = by_kind[1], by_kind[0], by_kind["diverged"]
    assert cb.recovered == [resumed.metrics["trial_id"]], "only the killed trial is restarted"

    # 256 / 16 = 16 steps, an evaluation every 3 and at the end. After the restart the trial goes on
    # from its checkpoint (a later step than the first evaluation, at most one evaluation past the
    # last one before the kill) and ends where the untouched trial ends, with the same numbers.
    evals = [3, 6, 9, 12, 15, 16]
    assert list(reference.metrics_dataframe["step"]) == evals
    seen = cb.seen[resumed.metrics["trial_id"]]
    before, after = [step for r, step in seen if r == 0], [step for r, step in seen if r == 1]
    assert before and after and before == evals[: len(before)], (before, after)
    assert 3 < after[0] <= before[-1] + 3 and after == evals[evals.index(after[0]):], (before, after)
    for key in ("eval_loss", "train_loss", "eval_accuracy", "lr"):
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-5, abs=1e-9), key

    # divergence is a result: reported once with its reason, never retried
    assert diverged.metrics["status"] == "diverged" and diverged.metrics["score"] == float("-inf")
    assert "non-finite" in diverged.metrics["reason"] and diverged.metrics["restarts"] == 0


def test_in_process_failing_trial_is_retried_by_tune_only_then_errors(ray_cluster, tmp_path):
    """Weights that cannot load fail every attempt. One worker: the trial process trains, so the only
    restarts are Tune's (FailureConfig.max_failures = resources.max_failures = 1): two attempts, no
    Train run, no give-up marker."""
    from ray import tune
    from ray.tune import Callback

    from helpers import save_tiny_classifier
    from melora_tune.trial.driver import GAVE_UP_NAME

    class Attempts(Callback):
        def __init__(self):
            self.recovered = self.errored = 0

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.recovered += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errored += 1

    model = save_tiny_classifier(tmp_path / "broken-bert")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = small(model=str(model), max_train_samples=64, max_eval_samples=16, zero_stage=0, **{"resources.max_failures": 1})
    attempts = Attempts()
    results = tune.Tuner(
        tune_trial,
        param_space={"trial": cfg.to_dict()},
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=tune.RunConfig(name="broken", storage_path=str(tmp_path / "runs"), callbacks=[attempts],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    ).fit()
    (result,) = list(results)
    assert result.error is not None
    assert "safetensors" in str(result.error).lower() or "header" in str(result.error).lower(), str(result.error)[-2000:]
    assert (attempts.recovered, attempts.errored) == (1, 1)
    assert not (Path(result.path) / GAVE_UP_NAME).exists()
    assert not list(Path(result.path).glob("train_*"))


def test_a_failing_trial_is_restarted_by_train_then_given_up_not_repeated_by_tune(ray_cluster, tmp_path):
    """Two workers (a TorchTrainer in the trial): weights that cannot load fail every Train attempt; Train
    retries resources.max_failures times, then the trial folder records that it gave up, and Tune's own
    restart (meant for a lost trial process) ends at once with that error instead of training again."""
    from ray import tune

    from helpers import save_tiny_classifier
    from melora_tune.trial.driver import GAVE_UP_NAME

    model = save_tiny_classifier(tmp_path / "broken-bert")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = small(model=str(model), max_train_samples=64, max_eval_samples=16, zero_stage=0, num_workers=2,
                **{"resources.max_failures": 1})
    results = tune.Tuner(
        tune_trial,
        param_space={"trial": cfg.to_dict()},
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=tune.RunConfig(name="broken", storage_path=str(tmp_path / "runs"),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    ).fit()
    (result,) = list(results)
    assert result.error is not None
    marker = Path(result.path) / GAVE_UP_NAME
    assert marker.is_file(), list(Path(result.path).iterdir())
    first = marker.read_text()
    assert "safetensors" in first.lower() or "header" in first.lower(), first
    assert "TrialGaveUpError" in repr(result.error) or "TrialGaveUpError" in str(result.error), str(result.error)[-2000:]
    assert first.strip() in str(result.error)
