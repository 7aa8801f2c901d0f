"""The confirmation stage on the real stack: a small search (local Ray, Tune, Optuna, DeepSpeed ZeRO-2, SQLite
MLflow) on a tiny random BERT and real rotten_tomatoes sentences, then ``run_confirm``. One search and one
confirmation are shared by the tests of this module (fixtures); no mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import browser, free_port, save_tiny_classifier, search_on_local_ray, stop_ui, wait_http

from melora_tune.errors import UsageError

pytestmark = pytest.mark.slow


def small_space(model_dir, root: Path, **over) -> dict:
    data = {
        "name": "ctest",
        "model": str(model_dir),
        "task": {"name": "rotten_tomatoes", "max_train_samples": 256, "max_eval_samples": 96},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"max_params": 512, "min_fraction": 0.5},
        "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-3, "high": 3e-2}, "n": [2, 4], "r": [1, 2]},
        "training": {"epochs": 1, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2},
        "asha": {"enabled": False},
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "points_to_evaluate": [{"method": "lora", "r": 2, "lr": 1e-2}, {"method": "melora", "n": 2, "r": 1, "lr": 1e-2}],
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9},
        "confirm": {"enabled": True, "top_k": 1, "seeds": 2},
        "storage_path": str(root / "runs"),
        "tracking_uri": f"sqlite:///{root}/mlflow.db",
    }
    data.update(over)
    return data


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory):
    """A finished 2-trial search with its confirmation (2 seeds per method's best): (space, search result, root)."""
    root = tmp_path_factory.mktemp("confirm")
    model = save_tiny_classifier(root / "tiny-bert", max_positions=64)
    space = small_space(model, root)
    result, _ = search_on_local_ray(space)
    return space, result, root


def runs_of(result):
    from mlflow import MlflowClient

    mlf = MlflowClient(result.tracking_uri)
    runs = mlf.search_runs([result.mlflow_experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
                           max_results=1000)
    search = [r for r in runs if r.data.tags.get("melora.kind") != "confirmation"]
    confirm = [r for r in runs if r.data.tags.get("melora.kind") == "confirmation"]
    return mlf, search, confirm


def test_one_confirmation_run_per_configuration_and_seed_linked_to_its_trial(confirmed):
    space, result, _ = confirmed
    assert result.status == "finished"
    conf = result.extra["confirm"]
    assert conf.status == "finished" and len(conf.planned) == 4
    mlf, search, confirm = runs_of(result)
    assert len(search) == 2 and len(confirm) == 4
    trial_runs = {r.info.run_id: r for r in search}
    keys = set()
    for run in confirm:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["melora.status"] == "completed", tags
        confirmed_trial = trial_runs[tags["melora.confirms"]]  # linked to a trial of this search
        assert params["method"] == confirmed_trial.data.params["method"]
        assert float(params["lr"]) == pytest.approx(float(confirmed_trial.data.params["lr"]))
        assert tags["melora.seed"] == params["training.seed"]
        assert {"test_score", "val_score", "test_accuracy"} <= set(metrics)
        assert run.info.status == "FINISHED"
        keys.add((tags["melora.confirms"], int(tags["melora.seed"])))
    # new seeds (the search's is 0), the same for every configuration, so methods pair up seed by seed
    assert keys == {(t, s) for t in trial_runs for s in (1, 2)}


def test_seeds_change_the_result(confirmed):
    _, result, _ = confirmed
    _, _, confirm = runs_of(result)
    by_config: dict[str, list[float]] = {}
    for run in confirm:
        by_config.setdefault(run.data.tags["melora.confirms"], []).append(run.data.metrics["eval_loss"])
    for losses in by_config.values():
        assert len(losses) == 2 and losses[0] != losses[1]  # another init and data order: another model


def test_the_search_never_sees_the_test_split(confirmed):
    _, result, _ = confirmed
    mlf, search, confirm = runs_of(result)
    for run in search:
        assert not [k for k in run.data.metrics if k.startswith("test_") or k == "test_score"], run.data.metrics
        for key in ("score", "eval_accuracy"):
            for m in mlf.get_metric_history(run.info.run_id, key):
                assert m.value is not None
    # what the search trials reported to Tune: no test metrics either
    for trial_dir in Path(result.experiment_path).glob("trial_*"):
        for line in (trial_dir / "result.json").read_text().splitlines():
            assert not [k for k in json.loads(line) if k.startswith("test_")]


def test_baselines_are_on_the_parent_run(confirmed):
    _, result, _ = confirmed
    from mlflow import MlflowClient

    metrics = MlflowClient(result.tracking_uri).get_run(result.parent_run_id).data.metrics
    for name in ("baseline.majority.val", "baseline.majority.test", "baseline.probe.val", "baseline.probe.test"):
        assert 0.0 <= metrics[name] <= 1.0
    assert 0.5 < metrics["majority_share"] < 0.7  # rotten_tomatoes: 58 % fresh


def test_confirm_again_adds_only_the_new_seed_and_never_retrains(confirmed):
    import ray

    from melora_tune.search.confirm import run_confirm

    space, result, _ = confirmed
    mlf, _, before = runs_of(result)
    steps_before = {r.info.run_id: len(mlf.get_metric_history(r.info.run_id, "score")) for r in before}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        again = run_confirm(space, name=result.name, seeds=3, write=lambda s: None)
    finally:
        ray.shutdown()
    _, _, after = runs_of(result)
    assert again.status == "finished"
    assert len(after) == 6  # 2 configurations x 3 seeds: only seed 3 is new
    new = [r for r in after if r.info.run_id not in steps_before]
    assert sorted(int(r.data.tags["melora.seed"]) for r in new) == [3, 3]
    for run_id, steps in steps_before.items():  # the earlier confirmations were not trained or logged again
        assert len(mlf.get_metric_history(run_id, "score")) == steps
    assert again.experiments[-1] == "confirm-2"


def test_confirm_needs_a_test_split(tmp_path):
    from melora_tune.search.confirm import run_confirm
    from melora_tune.search.schema import parse_space

    data = small_space(tmp_path / "model", tmp_path)
    data["task"] = {**data["task"], "test_fraction": 0}
    with pytest.raises(UsageError, match="test_fraction is 0"):
        parse_space(data)
    data["confirm"] = {"enabled": False}
    with pytest.raises(UsageError, match="test_fraction is 0"):
        run_confirm(data)


def test_report_and_export_read_the_confirmation(confirmed, tmp_path):
    """The records a real confirmation wrote are what the report's confirmed table and the export read."""
    from melora_tune.report.build import build_report
    from melora_tune.report.export import export_best

    _, result, _ = confirmed
    report = build_report("rotten_tomatoes", search=result.parent_run_id, tracking_uri=result.tracking_uri,
                          out_dir=tmp_path / "report", log_artifacts=False, cross=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Confirmed results (held-out test)" in text and "## Which method wins on this dataset" in text
    assert "linear probe" in text and "majority class" in text
    assert (tmp_path / "report" / "learning_curves.png").stat().st_size > 0
    assert report.data is not None

    res = export_best("rotten_tomatoes", out=tmp_path / "best", search=result.parent_run_id, tracking_uri=result.tracking_uri)
    info = json.loads((tmp_path / "best" / "export.json").read_text())
    assert info["selection"] == "confirmed" and info["confirmed"]["seeds"] in (2, 3)  # 3 after the test that adds one
    assert info["confirmed"]["seed"] in (1, 2, 3)
    assert "CONFIRMED winner" in res.selection and "CONFIRMED winner" in (tmp_path / "best" / "README.md").read_text()


def test_runs_record_their_dataset_inputs_and_system_metrics(confirmed):
    """Every trial and confirmation run: the splits it used as MLflow dataset inputs (a search trial never the
    test split), and the machine's load as system/ metrics."""
    _, result, _ = confirmed
    mlf, search, confirm = runs_of(result)
    for run in search + confirm:
        inputs = {d.dataset.name: d for d in mlf.get_run(run.info.run_id).inputs.dataset_inputs}
        splits = ("train", "validation", "test") if run in confirm else ("train", "validation")
        assert set(inputs) == {f"rotten_tomatoes/{s}" for s in splits}, inputs
        for split in splits:
            entry = inputs[f"rotten_tomatoes/{split}"]
            assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == split
            assert "rotten_tomatoes_corpus_full.csv.bz2" in entry.dataset.source and entry.dataset.digest
            assert json.loads(entry.dataset.profile)["num_rows"] == (256 if split == "train" else 96)
        system = {k: v for k, v in run.data.metrics.items() if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system), system
        assert system["system/system_memory_usage_megabytes"] > 0
    # the same split is the same dataset entry on every run (one digest per split)
    digests = {(d.dataset.name, d.dataset.digest) for r in search + confirm
               for d in mlf.get_run(r.info.run_id).inputs.dataset_inputs}
    assert len(digests) == 3, digests


def test_the_confirmed_winners_are_in_the_model_registry_and_export_from_it(confirmed, tmp_path):
    """One registered model for the dataset, a version per cell with the alias <method>-b<budget>, the adapter
    (native and PEFT) and the confirmed scores; exporting the alias gives the adapter the folder export gives."""
    from safetensors.numpy import load_file

    from melora_tune.cli import main
    from melora_tune.report.export import export_best

    _, result, _ = confirmed
    mlf, _, _ = runs_of(result)
    model = mlf.get_registered_model("melora-rotten_tomatoes")
    budget = int(mlf.get_run(result.parent_run_id).data.params["budget"])
    assert set(model.aliases) == {f"lora-b{budget}", f"melora-b{budget}"}
    for method in ("lora", "melora"):
        version = mlf.get_model_version_by_alias(model.name, f"{method}-b{budget}")
        tags = version.tags
        assert tags["melora.search_run"] == result.parent_run_id and tags["melora.method"] == method
        assert tags["melora.cell"] == f"{method}-b{budget}" and int(tags["seeds"]) >= 2
        assert 0.0 <= float(tags["test_mean"]) <= 1.0 and 0.0 <= float(tags["val_mean"]) <= 1.0
        run = mlf.get_run(version.run_id)
        assert run.data.tags["melora.kind"] == "confirmation" and run.data.params["method"] == method
        files = {a.path for a in mlf.list_artifacts(version.run_id, "registered")}
        assert {"registered/adapter", "registered/peft", "registered/confirmed.json"} <= files

        by_folder = export_best("rotten_tomatoes", out=tmp_path / f"folder-{method}", method=method,
                                search=result.parent_run_id, tracking_uri=result.tracking_uri)
        code = main(["export", "--dataset", "rotten_tomatoes", "--alias", f"{method}-b{budget}", "--out",
                     str(tmp_path / f"registry-{method}"), "--tracking-uri", result.tracking_uri])
        assert code == 0
        info = json.loads((tmp_path / f"registry-{method}" / "export.json").read_text())
        assert info["registered_model"]["name"] == model.name and info["run_id"] == by_folder.run_id == version.run_id
        for sub in ("adapter", "peft"):
            a = load_file(str(next((tmp_path / f"folder-{method}" / sub).glob("*.safetensors"))))
            b = load_file(str(next((tmp_path / f"registry-{method}" / sub).glob("*.safetensors"))))
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_the_registered_model_shows_in_the_mlflow_ui(confirmed, tmp_path):
    """`melora-tune ui` on the confirmed search's store: the Model Registry page lists the dataset's registered model
    with a version per cell and its aliases, where MLflow users look for the model to use."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, result, _ = confirmed
    mlf, _, _ = runs_of(result)
    model = mlf.get_registered_model("melora-rotten_tomatoes")
    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "melora_tune.cli", "ui", "--tracking-uri", result.tracking_uri,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    driver = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        driver = browser()
        wait = WebDriverWait(driver, 90)
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        driver.get(f"http://127.0.0.1:{port}/#/models/{model.name}")
        wait.until(lambda d: model.name in body() and "Version" in body())
        for alias in model.aliases:  # lora-b<budget>, melora-b<budget>: one per cell
            wait.until(lambda d, a=alias: a in body())
        driver.save_screenshot(str(tmp_path / "registry.png"))
    finally:
        if driver is not None:
            driver.quit()
        stop_ui(proc, log)

