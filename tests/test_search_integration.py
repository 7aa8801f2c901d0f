"""A whole search on the real stack: local Ray (2 CPUs), Tune + Optuna TPE + ASHA, Ray Train V2 + DeepSpeed ZeRO-2,
SQLite MLflow and Optuna storage in tmp_path, a tiny random BERT with the bundled MiniLM tokenizer, and real
rotten_tomatoes sentences. No mocks.

The tiny model's classification bias starts at [0.3, 0]: untrained it predicts "rotten" (the minority class,
0.42 accuracy); a learning rate around 1e-2 moves it to the majority class within an epoch (0.58), a
learning rate of 1e-5 does not. So the points evaluated first make ASHA's first rung deterministic: the
1e-5 trial is below the rung's median and is stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import save_tiny_classifier

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert", max_positions=64)


def space(model_dir, tmp_path, **over) -> dict:
    # tiny BERT: query+value = 4 layers of 32x32: 256 params per unit of r; budget 512 (r <= 2), floor 256
    data = {
        "name": "itest",
        "model": str(model_dir),
        "task": {"name": "rotten_tomatoes", "max_train_samples": 512, "max_eval_samples": 128},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"max_params": 512, "min_fraction": 0.5},
        "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-5, "high": 3e-2}, "n": [2, 4], "r": [1, 2]},
        "training": {"epochs": 4, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2},
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 6,
        "max_concurrent_trials": 2,
        "n_startup_trials": 4,
        "seed": 0,
        "points_to_evaluate": [
            {"method": "lora", "r": 2, "lr": 1e-2},
            {"method": "melora", "n": 4, "r": 1, "lr": 1e-2},
            {"method": "lora", "r": 1, "lr": 1e-5},
        ],
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
        "storage_path": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    data.update(over)
    return data


def mlflow_children(tracking_uri: str, parent: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("rotten_tomatoes")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)
    return client, exp, runs


def test_search_end_to_end(tiny_model, tmp_path):
    import ray
    from optuna.trial import TrialState

    from melora_tune.search import run_search
    from melora_tune.search.cells import cell_studies

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    lines: list[str] = []
    try:
        t0 = time.time()
        result = run_search(space(tiny_model, tmp_path), write=lines.append)
        wall = time.time() - t0
    finally:
        ray.shutdown()
    print("\n".join(lines))
    print(result.table())
    print(f"search wall time {wall:.0f} s")

    # every trial ran within budget; the engine's own count agrees with the accounting
    assert result.status == "finished" and len(result.trials) == 6
    for row in result.trials:
        assert 256 <= row.adapter_params <= 512, row
        assert row.status in ("completed", "stopped_early"), row
    # ASHA stopped the lr=1e-5 trial at the first rung (0.42 < the rung's 0.58)
    stopped = [r for r in result.trials if r.status == "stopped_early"]
    assert stopped and any(r.lr == pytest.approx(1e-5) and r.epochs == 1.0 for r in stopped)
    assert any(r.status == "completed" and r.epochs == 4.0 for r in result.trials)
    assert set(result.best) == {"melora", "lora"} and all(b.checkpoint for b in result.best.values())

    # Optuna: one trial per Ray trial; stopped -> PRUNED with intermediate values, full fidelity -> COMPLETE
    studies = cell_studies(result.study_name, result.optuna_storage)  # one per cell: melora@512, lora@512
    assert {cell: len(s.trials) for cell, s in studies.items()} == {"melora@512": 3, "lora@512": 3}
    for row in result.trials:
        states = {t.number: t.state for t in studies[row.cell].trials}
        assert states[row.optuna_trial] == (TrialState.COMPLETE if row.status == "completed" else TrialState.PRUNED)
    for t in (t for s in studies.values() for t in s.trials):
        assert t.constraints["budget"] <= 0 and 256 <= t.user_attrs["adapter_params"] <= 512
        assert t.intermediate_values  # every evaluation was reported
    assert Path(result.optuna_storage.removeprefix("sqlite:///")) == tmp_path / "runs" / "optuna.db"

    # MLflow: exactly one child run per trial under the parent, with the params, metrics, status and adapter
    client, exp, runs = mlflow_children(result.tracking_uri, result.parent_run_id)
    assert len(runs) == 6
    assert len({r.data.tags["melora.trial_id"] for r in runs}) == 6
    by_trial = {(r.data.tags["melora.cell"], int(r.data.tags["melora.optuna_trial"])): r for r in runs}
    for row in result.trials:
        run = by_trial[(row.cell, row.optuna_trial)]
        p = run.data.params
        assert p["method"] == row.method and int(p["r"]) == row.r and float(p["lr"]) == pytest.approx(row.lr, rel=1e-5)
        assert int(p["adapter_params"]) == row.adapter_params and int(p["budget"]) == 512
        assert int(p["equivalent_rank"]) == row.equivalent_rank and float(p["alpha"]) == 16.0
        assert ("n" in p) == (row.method == "melora")
        assert run.data.tags["melora.status"] == row.status
        assert run.info.run_name.startswith(row.method) and "lr=" in run.info.run_name
        history = client.get_metric_history(run.info.run_id, "score")
        assert [m.step for m in history] == sorted({m.step for m in history})  # no duplicates
        assert len(history) == (4 if row.status == "completed" else int(row.epochs))
        assert {"eval_accuracy", "eval_loss", "train_loss", "epoch", "samples_per_s"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["melora.status"] == "finished"
    assert parent.data.metrics["best_score"] == pytest.approx(max(r.score for r in result.trials if r.status == "completed"))
    assert int(parent.data.params["budget"]) == 512
    assert [a.path for a in client.list_artifacts(result.parent_run_id, "space")] == ["space/itest.yaml"]
    # progress: one line per change, with the best so far and an ETA
    assert any("best 0." in ln and "ETA ~" in ln for ln in lines)
    assert any(ln.split("] ", 1)[1].startswith("stopped early lora r=1 lr=1.0e-5") for ln in lines)


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the search exited ({proc.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_search_resumes_without_duplicates(tiny_model, tmp_path):
    from optuna.trial import TrialState

    from melora_tune.search.cells import cell_studies

    data = space(tiny_model, tmp_path, num_samples=4, points_to_evaluate=[], training={
        "epochs": 2, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "melora_tune.cli", "search", str(path), "--name", "resumable"]
    log1 = open(tmp_path / "first.log", "w")
    # The kill drill's "tell" moment (melora_tune.drill): the driver SIGKILLs its own process group inside the
    # searcher's on_trial_complete for the first finished trial, its status set and Optuna not yet told, with the
    # other cell's trial running (two at once). test_kill_drill.py no longer runs this point itself: here it has
    # cells and a trial in flight, there it had neither.
    kill = {**env, "MELORA_DRILL_KILL_AT": "searcher.tell:1"}
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=kill, cwd=tmp_path, start_new_session=True)
    text = lambda: (tmp_path / "first.log").read_text()  # noqa: E731
    try:
        proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    assert proc.returncode == -signal.SIGKILL, text()[-3000:]
    assert "done 0/4" in text() and "done 1/4" not in text()  # killed before the first trial was counted done
    exp_dir = tmp_path / "runs" / "resumable"
    assert any(exp_dir.glob("experiment_state*.json"))
    time.sleep(3)  # Ray's reaper takes the killed driver's cluster down

    res = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    print(text()[-3000:])
    print(res.stdout[-6000:], res.stderr[-3000:])
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["status"] == "finished" and len(result["trials"]) == 4
    assert all(t["status"] in ("completed", "stopped_early") for t in result["trials"])

    studies = cell_studies("resumable", result["optuna_storage"])
    # no orphaned or duplicated Optuna trials, and each cell kept its share across the kill
    assert {cell: len(s.trials) for cell, s in studies.items()} == {"melora@512": 2, "lora@512": 2}
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for s in studies.values() for t in s.trials)
    assert sorted((t["cell"], t["optuna_trial"]) for t in result["trials"]) == [
        ("lora@512", 0), ("lora@512", 1), ("melora@512", 0), ("melora@512", 1)]

    _, _, runs = mlflow_children(result["tracking_uri"], result["parent_run_id"])
    assert len(runs) == 4  # one child run per trial, reused across the kill
    assert sorted((r.data.tags["melora.cell"], int(r.data.tags["melora.optuna_trial"])) for r in runs) == [
        ("lora@512", 0), ("lora@512", 1), ("melora@512", 0), ("melora@512", 1)]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_recorded_grid_exports_a_table_that_round_trips_mlflow(tiny_model, tmp_path):
    """sampler grid + record_test on the real stack: every grid point x seed once, test scored at every
    evaluation, and ``melora-tune table`` writes exactly what MLflow holds (CSV + JSON, read back)."""
    import json

    import pandas as pd
    import ray

    from melora_tune.cli import main
    from melora_tune.search import run_search

    if ray.is_initialized():
        ray.shutdown()
    data = space(tiny_model, tmp_path, name="rec", sampler="grid", record_test=True, points_to_evaluate=[],
                 methods=["lora"], asha={"enabled": False})
    data.pop("num_samples")
    data["space"] = {"lr_choices": [1e-2], "r": [1, 2], "seeds": [0, 1]}
    data["task"] = {"name": "rotten_tomatoes", "max_train_samples": 96, "max_eval_samples": 32}
    data["training"] = {**data["training"], "epochs": 2}
    result = run_search(data)
    assert result.status == "finished" and len(result.trials) == 4
    assert all(t.status == "completed" for t in result.trials)
    out = tmp_path / "rec.csv"
    code = main(["table", "--dataset", "rotten_tomatoes", "--search", result.name, "--tracking-uri", result.tracking_uri,
                 "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out)
    assert len(table) == 4 * 2 and set(table["seed"]) == {0, 1} and set(table["r"]) == {1, 2}
    assert table.groupby(["r", "seed"]).size().to_dict() == {(1, 0): 2, (1, 1): 2, (2, 0): 2, (2, 1): 2}
    client, _, runs = mlflow_children(result.tracking_uri, result.parent_run_id)
    for run in runs:
        rows = table[table["run_id"] == run.info.run_id].sort_values("step")
        for col, name in (("val_score", "score"), ("test_score", "test_score"), ("train_time_s", "train_time_s")):
            logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
            assert rows[col].tolist() == pytest.approx(logged, rel=1e-5), col
        assert len(rows) == 2 and rows["test_score"].notna().all()  # test at every evaluation, not only the last
        assert int(rows["seed"].iloc[0]) == int(run.data.params["training.seed"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["command"] == f"melora-tune table --search {result.name} --out {out}"  # main() called directly
    assert meta["searches"][0]["parent_run_id"] == result.parent_run_id and meta["not_completed"] == []
    assert meta["spaces"] == {"512": "search_spaces/rec.yaml"} and meta["rows"] == 8
    assert set(meta["columns"]) == set(table.columns)
    env = meta["environment"]  # the versions and machine the table was recorded with
    assert env["packages"]["torch"] and env["packages"]["optuna"] and env["cpus"] >= 1 and env["python"].startswith("3.")
