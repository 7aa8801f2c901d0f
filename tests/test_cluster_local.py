"""The local multi-node cluster end to end: `melora-tune cluster up`, a Ray client and an MLflow
client against it, `status`, `up` twice, `down` (twice).

One cluster per module (starting one costs 30-60 s on 2 cores); the tests run in file order
and the last one takes it down (the fixture's finalizer takes it down too if a test failed).
The CLI runs as a subprocess, and so do the Ray clients: a Ray driver keeps global state, and the
cluster needs RAY_AUTH_MODE=token in the client's environment, which must not leak into other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from melora_tune import cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def melora(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "melora_tune.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("local-cluster")
    done = melora(
        "cluster", "up", "--dir", str(directory), "--num-cpus-head", "1", "--num-cpus-worker", "1", "--timeout", "180"
    )
    try:
        assert done.returncode == 0, done.stderr
        state = cluster.load_state(directory)
        yield {"dir": directory, "state": state, "stdout": done.stdout}
    finally:
        melora("cluster", "down", "--dir", str(directory), "--timeout", "5")
        leftover = cluster.load_state(directory)
        if leftover:  # down failed: stop by session id so no process outlives the test run
            cluster.stop_sessions(list(cluster._component_sids(leftover).values()), timeout=2)


def test_up_prints_address_and_tracking_uri(local_cluster):
    state, out = local_cluster["state"], local_cluster["stdout"]
    assert state["ray_address"].startswith("127.0.0.2:")
    assert state["tracking_uri"].startswith("http://127.0.0.1:")
    assert f"--address {state['ray_address']} --tracking-uri {state['tracking_uri']}" in out
    assert "export RAY_AUTH_MODE=token" in out
    alive = cluster.alive_pids(state)
    assert all(alive[name] for name in ("head", "worker", "mlflow")), alive


CLIENT = textwrap.dedent(
    """
    import json, os, sys, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=sys.argv[1], log_to_driver=False)
    alive = [n for n in ray.nodes() if n["Alive"]]
    worker = [n for n in alive if "melora_worker" in n["Resources"]]

    @ray.remote(num_cpus=1)
    def where():
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "sid": os.getsid(0)}

    by_resource = ray.get(where.options(resources={"melora_worker": 0.001}).remote(), timeout=120)
    by_affinity = ray.get(
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker[0]["NodeID"], soft=False)).remote(),
        timeout=120,
    )
    print("RESULT " + json.dumps({
        "alive": sorted(n["NodeManagerAddress"] for n in alive),
        "worker_ids": [n["NodeID"] for n in worker],
        "by_resource": by_resource,
        "by_affinity": by_affinity,
    }))
    """
)


def test_ray_client_sees_two_nodes_and_runs_a_task_on_the_worker(local_cluster):
    state = local_cluster["state"]
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, state["ray_address"]],
        capture_output=True, text=True, timeout=240, env=cluster.ray_env(state),
    )
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["alive"] == ["127.0.0.2", "127.0.0.3"]
    assert len(result["worker_ids"]) == 1
    for placed in (result["by_resource"], result["by_affinity"]):
        assert placed["node_id"] == result["worker_ids"][0]
        assert placed["ip"] == "127.0.0.3"
        assert placed["sid"] == state["worker"]["sid"]  # the task's process belongs to the worker node's session


def test_mlflow_answers_health_and_creates_an_experiment(local_cluster):
    uri = local_cluster["state"]["tracking_uri"]
    with urllib.request.urlopen(uri + "/health", timeout=10) as resp:
        assert resp.status == 200
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("cluster-local-test")
    assert client.get_experiment_by_name("cluster-local-test").experiment_id == exp_id
    assert (local_cluster["dir"] / "mlflow.db").exists()  # the SQLite backend lives in DIR


def test_status_shows_both_nodes_and_mlflow(local_cluster):
    done = melora("cluster", "status", "--dir", str(local_cluster["dir"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "node 127.0.0.2" in done.stdout and "node 127.0.0.3" in done.stdout
    assert done.stdout.count("ALIVE") == 2
    assert "answers /health" in done.stdout
    as_json = json.loads(melora("cluster", "status", "--dir", str(local_cluster["dir"]), "--json").stdout)
    assert as_json["healthy"] and as_json["mlflow_ok"]


def test_up_twice_fails_with_one_line(local_cluster):
    done = melora("cluster", "up", "--dir", str(local_cluster["dir"]), timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "already up" in done.stderr
    assert cluster.alive_pids(local_cluster["state"])["head"]  # the running cluster is untouched


def test_down_stops_every_process_and_is_idempotent(local_cluster):
    state, directory = local_cluster["state"], local_cluster["dir"]
    sids = cluster._component_sids(state)
    before = {pid for pids in cluster.alive_pids(state).values() for pid in pids}
    assert len(before) > 10  # gcs_server, raylets, dashboard, agents, workers, mlflow + its worker
    done = melora("cluster", "down", "--dir", str(directory), "--timeout", "5")
    assert done.returncode == 0, done.stderr
    assert "stopped the local cluster" in done.stdout
    assert not [pid for pid in before if Path(f"/proc/{pid}").exists() and cluster._session_of(pid) in sids.values()]
    assert not any(cluster.session_pids(sid) for sid in sids.values())
    for role in ("head", "worker"):
        assert not (Path(state[role]["temp_dir"]) / "ray_current_cluster").exists()
    assert not cluster.state_path(directory).exists()
    again = melora("cluster", "down", "--dir", str(directory))
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    status = melora("cluster", "status", "--dir", str(directory))
    assert status.returncode == 2 and "no local cluster" in status.stderr
