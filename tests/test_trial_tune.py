"""``tune_trial`` under a real ``ray.tune.Tuner``: every worker report reaches Tune (and ASHA) with its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from melora_tune.trial import TrialConfig, apply_overrides, tune_trial

pytestmark = pytest.mark.slow


def test_tuner_runs_two_trials_and_sees_every_report(tmp_path):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = apply_overrides(
        TrialConfig(),
        {"max_train_samples": 128, "max_eval_samples": 32, "epochs": 1, "micro_batch_size": 16, "max_length": 32,
         "method": "lora", "r": 2, "zero_stage": 1, "eval_every_steps": 4},
    )
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
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
    finally:
        ray.shutdown()
    assert len(results) == 2 and not results.errors
    lrs = set()
    for result in results:
        # 128 samples / 16 = 8 steps, an evaluation every 4: two reports, both relayed to Tune
        assert result.metrics["training_iteration"] == 2
        assert result.metrics["step"] == 8 and result.metrics["status"] == "completed"
        assert 0.0 <= result.metrics["score"] <= 1.0 and result.metrics["score"] == result.metrics["eval_accuracy"]
        assert list(result.metrics_dataframe["step"]) == [4, 8]
        assert result.checkpoint is not None
        assert (Path(result.checkpoint.path) / "adapter" / "adapter_model.safetensors").is_file()
        lrs.add(result.config["lr"])
        # the Train run lives in the Tune trial's folder, named after the trial (what a restore resumes)
        assert any(Path(result.path).glob("train_*/checkpoint_manager_snapshot.json"))
    assert lrs == {1e-3, 3e-3}


def test_a_failing_trial_is_restarted_by_train_then_given_up_not_repeated_by_tune(tmp_path):
    """Weights that cannot load fail every Train attempt: Train retries resources.max_failures times,
    then the trial folder records that it gave up, and Tune's own restart (meant for a lost trial
    process) ends at once with that error instead of training again."""
    import ray
    from ray import tune

    from helpers import save_tiny_classifier
    from melora_tune.trial.driver import GAVE_UP_NAME

    model = save_tiny_classifier(tmp_path / "broken-bert")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = apply_overrides(
        TrialConfig(),
        {"model": str(model), "max_train_samples": 64, "max_eval_samples": 16, "epochs": 1, "micro_batch_size": 16,
         "max_length": 32, "method": "lora", "r": 2, "zero_stage": 0, "resources.max_failures": 1},
    )
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        results = tune.Tuner(
            tune_trial,
            param_space={"trial": cfg.to_dict()},
            tune_config=tune.TuneConfig(metric="score", mode="max"),
            run_config=tune.RunConfig(name="broken", storage_path=str(tmp_path / "runs"),
                                      failure_config=tune.FailureConfig(max_failures=1)),
        ).fit()
    finally:
        ray.shutdown()
    (result,) = list(results)
    assert result.error is not None
    marker = Path(result.path) / GAVE_UP_NAME
    assert marker.is_file(), list(Path(result.path).iterdir())
    first = marker.read_text()
    assert "safetensors" in first.lower() or "header" in first.lower(), first
    assert "TrialGaveUpError" in repr(result.error) or "TrialGaveUpError" in str(result.error), str(result.error)[-2000:]
    assert first.strip() in str(result.error)
