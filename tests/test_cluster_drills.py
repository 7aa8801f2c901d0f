"""Failure drills on the local two-node cluster (`melora-tune cluster up`), with the real search.

1. Kill the search driver mid-search (SIGKILL): `melora-tune search --resume` completes it; the
   interrupted trials continue from their last checkpoint (not from scratch), and MLflow keeps one
   parent run and one child run per trial.
2. Kill the Ray worker node mid-trial (SIGKILL of every process of that node): the trial
   continues from its last checkpoint on the surviving node (the head) within the same search
   (resources.max_failures), and the search completes.
In both, MLflow holds one child run per trial and Optuna one trial per Tune trial.

A tiny random BertForSequenceClassification (2 layers, hidden 32) with the bundled MiniLM tokenizer
trains on real data (rotten_tomatoes) on CPU. Each drill runs 1-2 searches (30-90 s each on 2
cores); the module shares one cluster, and the node drill runs last (it leaves one node).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from melora_tune import cluster
from helpers import save_tiny_classifier

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def melora(*args: str, env=None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "melora_tune.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def make_tiny_model(path: Path) -> Path:
    return save_tiny_classifier(path, head_bias=(0.0, 0.0))


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    root = tmp_path_factory.mktemp("drills")
    model = make_tiny_model(root / "tiny-bert")
    cdir = root / "cluster"
    up = melora("cluster", "up", "--dir", str(cdir), "--num-cpus-head", "1", "--num-cpus-worker", "1", "--timeout", "180")
    try:
        assert up.returncode == 0, up.stderr
        state = cluster.load_state(cdir)
        yield {"root": root, "model": model, "dir": cdir, "state": state, "env": cluster.ray_env(state)}
    finally:
        melora("cluster", "down", "--dir", str(cdir), "--timeout", "5")
        leftover = cluster.load_state(cdir)
        if leftover:
            cluster.stop_sessions(list(cluster._component_sids(leftover).values()), timeout=2)


def write_space(d: dict, name: str, **overrides) -> Path:
    space = {
        "name": name,
        "model": str(d["model"]),
        "task_type": "seq_cls",
        "task": {"name": "rotten_tomatoes", "max_train_samples": 2000, "max_eval_samples": 100, "seed": 0},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"max_params": 512},
        "methods": ["lora"],
        "space": {"lr": {"low": 1.0e-3, "high": 5.0e-3, "log": True}, "r": [1, 2]},
        "training": {"epochs": 5, "micro_batch_size": 16, "max_length": 48, "zero_stage": 0, "seed": 0, "keep_checkpoints": 2},
        "asha": {"enabled": False},
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "n_startup_trials": 2,
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "driver_cpus": 0.1},
    }
    space.update(overrides)
    path = d["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def search_args(d: dict, space: Path, name: str) -> list[str]:
    s = d["state"]
    return ["search", str(space), "--address", s["ray_address"], "--tracking-uri", s["tracking_uri"],
            "--storage-path", str(d["root"] / "runs"), "--name", name]


def start_search(d: dict, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "melora_tune.cli", *args], stdout=out, stderr=subprocess.STDOUT,
            env=d["env"], cwd=d["root"], start_new_session=True,
        )


def reports(d: dict, name: str) -> dict[str, list[dict]]:
    """trial folder -> the rows of its result.json (one per report, in order)."""
    out = {}
    for result in sorted((d["root"] / "runs" / name).glob("trial_*/result.json")):
        rows = [json.loads(l) for l in result.read_text().splitlines() if l.strip()]
        out[result.parent.name] = rows
    return out


def checkpointed(d: dict, name: str) -> dict[str, int]:
    """trial folder -> its last reported epoch, for trials that reported (and so checkpointed) at least once."""
    return {t: int(rows[-1]["epoch"]) for t, rows in reports(d, name).items() if rows}


def wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON result in:\n{stdout[-3000:]}")


def trial_errors(exp: Path) -> str:
    """What Tune recorded for each errored trial (its error.txt) and what each trial folder holds: a failed
    trial after a resume is rare (once in CI, not reproduced in 3 local runs), so its failure must name the cause."""
    out = []
    for trial in sorted(exp.glob("trial_*")):
        rows = [json.loads(l) for l in (trial / "result.json").read_text().splitlines() if l.strip()] \
            if (trial / "result.json").is_file() else []
        out.append(f"{trial.name}: {sorted(p.name for p in trial.iterdir())} epochs "
                   f"{[(r.get('epoch'), r.get('iterations_since_restore')) for r in rows]}")
        if (trial / "error.txt").is_file():
            out.append((trial / "error.txt").read_text()[-3000:])
    return "\n".join(out)


def resumed_rows(rows: list[dict], before: int) -> list[dict]:
    return rows[before:]


# --------------------------------------------------------------------------------------------


def test_driver_killed_mid_search_resume_completes_it(drill):
    name = "driver-drill"
    space = write_space(drill, name, num_samples=2, max_concurrent_trials=2)
    log = drill["root"] / f"{name}.log"
    proc = start_search(drill, search_args(drill, space, name), log)
    exp = drill["root"] / "runs" / name
    # Kill once a trial has a checkpoint and Tune has written its experiment state *after* it: a snapshot
    # older than the checkpoint restores the trial without it (from scratch), which is Tune's contract, not
    # a resume bug (seen once in CI: the kill landed between result.json and the forced snapshot).
    def snapshot_after_checkpoint():
        snapshots = list(exp.glob("experiment_state-*.json"))
        if not snapshots:
            return False
        newest = max(f.stat().st_mtime for f in snapshots)
        return any(1 <= e < 5 and newest > (exp / t / "result.json").stat().st_mtime
                   for t, e in checkpointed(drill, name).items())

    wait_for("a checkpointed trial and an experiment snapshot written after it", snapshot_after_checkpoint,
             timeout=420, proc=proc, log=log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = {t: len(rows) for t, rows in reports(drill, name).items()}
    last_epoch = checkpointed(drill, name)
    meta = json.loads((exp / "melora_search.json").read_text())

    done = melora(*search_args(drill, space, name), "--resume", "--json", env=drill["env"], timeout=900, cwd=drill["root"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = last_json(done.stdout)
    assert result["status"] == "finished"
    assert len(result["trials"]) == 2
    statuses = [(t["trial_id"], t["status"], t.get("epochs"), t.get("score")) for t in result["trials"]]
    assert all(t["status"] == "completed" for t in result["trials"]), (
        f"{statuses}\n{trial_errors(exp)}\n{done.stdout[-2500:]}\n{done.stderr[-2500:]}")

    # Interrupted trials went on from their checkpoint: the first report after the resume is a
    # later epoch than 1 and the first since a restore.
    after = reports(drill, name)
    interrupted = [t for t, e in last_epoch.items() if 1 <= e < 5]
    assert interrupted
    for t in interrupted:
        first = resumed_rows(after[t], before[t])[0]
        assert first["iterations_since_restore"] == 1, first
        assert 1 < first["epoch"] <= last_epoch[t] + 1, (first["epoch"], last_epoch[t])
        assert int(after[t][-1]["epoch"]) == 5

    # The resumed search kept its parent run and logged no trial twice (MLflow, Optuna).
    assert result["parent_run_id"] == meta["parent_run_id"]
    assert_one_record_per_trial(drill, name, 2)


BLOCKER = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0.9, resources={"melora_head": 1})
class Blocker:
    def where(self):
        return ray.util.get_node_ip_address()

b = Blocker.remote()
print("BLOCKING", ray.get(b.where.remote()), flush=True)
while True:
    time.sleep(1)
"""


def train_workers_on(d: dict, role: str) -> list[int]:
    import psutil

    pids = []
    for pid in cluster.session_pids(d["state"][role]["sid"]):
        try:
            # a one-worker trial trains in its Tune trial process; more workers run in Train worker actors
            if psutil.Process(pid).name().startswith(("ray::RayTrainWorker", "ray::ImplicitFunc")):
                pids.append(pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_worker_node_killed_mid_trial_resumes_on_the_head(drill):
    name = "node-drill"
    space = write_space(drill, name)
    # Hold 0.9 of the head's single CPU so the trial's training process (0.9 CPU) must start on the
    # worker node; released right before the worker node is killed.
    blocker_log = drill["root"] / "blocker.log"
    with open(blocker_log, "w") as out:
        blocker = subprocess.Popen(
            [sys.executable, "-c", BLOCKER, drill["state"]["ray_address"]], stdout=out, stderr=subprocess.STDOUT,
            env=drill["env"], start_new_session=True,
        )
    try:
        wait_for("the blocker actor on the head", lambda: "BLOCKING 127.0.0.2" in blocker_log.read_text(), 120)
        log = drill["root"] / f"{name}.log"
        proc = start_search(drill, search_args(drill, space, name), log)
        wait_for("a checkpointed epoch", lambda: any(1 <= e < 5 for e in checkpointed(drill, name).values()),
                 timeout=420, proc=proc, log=log)
        assert train_workers_on(drill, "worker"), "the trial's training process is not on the worker node"
        assert not train_workers_on(drill, "head")
    finally:
        os.killpg(blocker.pid, signal.SIGKILL)
        blocker.wait(timeout=30)
    assert cluster.kill_node(drill["dir"], "worker")
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the search did not finish within 900 s of the node loss:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]

    # The trial went on from its last checkpoint on the head: its first report there is a later
    # epoch than 1 (the step counter did not restart) and no later than one past the last epoch
    # trained on the lost node; it then trained to the end.
    (trial, rows), = reports(drill, name).items()
    on_worker = [r for r in rows if r["worker_node_ip"] == WORKER_IP]
    on_head = [r for r in rows if r["worker_node_ip"] == HEAD_IP]
    assert on_worker and on_head, [(r["epoch"], r["worker_node_ip"]) for r in rows]
    assert rows[: len(on_worker)] == on_worker, "reports from the lost node after the restart"
    lost_at = int(on_worker[-1]["epoch"])
    first = on_head[0]
    assert 1 < first["epoch"] <= lost_at + 1, (first["epoch"], lost_at)
    assert first["restarts"] >= 1
    assert int(rows[-1]["epoch"]) == 5 and rows[-1]["status"] == "completed"
    assert_one_record_per_trial(drill, name, 1)


def assert_one_record_per_trial(d: dict, name: str, n: int) -> None:
    """MLflow: one child run per trial under the search's parent; Optuna: one trial per Tune trial."""
    import optuna
    from mlflow.tracking import MlflowClient

    from melora_tune.search.cells import cell_studies

    meta = json.loads((d["root"] / "runs" / name / "melora_search.json").read_text())
    client = MlflowClient(tracking_uri=d["state"]["tracking_uri"])
    children = client.search_runs(
        [meta["mlflow_experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{meta['parent_run_id']}'"
    )
    assert len(children) == n, [r.info.run_name for r in children]
    assert all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
    studies = cell_studies(meta["study_name"], meta["optuna_storage"])
    assert list(studies) == ["lora@512"]  # one method, one level: one cell, one study
    study = studies["lora@512"]
    assert len(study.trials) == n, [(t.number, t.params, t.state) for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == n
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), [t.state for t in study.trials]
