"""The local cluster's typed state and DIR/cluster.json: a save/load round trip, and files in the
layout the state had as a plain dict (what `melora-tune cluster up` wrote before the state was typed)
load and save back byte for byte. Fast: nothing starts."""

from __future__ import annotations

import json

import pytest

from melora_tune import cluster
from melora_tune.cluster import ClusterState, HeadNode, MlflowServer, NodePorts, WorkerNode
from melora_tune.cluster.commands import _new_state, _Ports
from melora_tune.errors import UsageError


def dict_layout(directory, stage: str) -> dict:
    """The state as the dict-based `up` built it, at three stages: saved before anything starts,
    after MLflow started (it gains mlflow.pid), and after everything is up (up_seconds)."""
    logs, temp = directory / "logs", cluster._ray_temp_root(directory)
    state = {
        "version": 1,
        "dir": str(directory),
        "created": 1764000000.25,
        "auth_mode": "token",
        "ray_address": "127.0.0.2:40001",
        "tracking_uri": "http://127.0.0.1:40000",
        "dashboard_url": "http://127.0.0.2:40002",
        "python": "/venv/bin/python",
        "head": {
            "address": "127.0.0.2",
            "gcs_port": 40001,
            "dashboard_port": 40002,
            "client_port": 40003,
            "num_cpus": 1,
            "temp_dir": str(temp / "head"),
            "log": str(logs / "ray-head.log"),
            "ports": {
                "node_manager": 40010, "object_manager": 40011, "agent_listen": 40012,
                "agent_grpc": 40013, "runtime_env": 40014, "metrics": 40015,
            },
            "sid": None,
        },
        "worker": {
            "address": "127.0.0.3",
            "num_cpus": 2,
            "resource": "melora_worker",
            "temp_dir": str(temp / "worker"),
            "log": str(logs / "ray-worker.log"),
            "ports": {
                "node_manager": 40020, "object_manager": 40021, "agent_listen": 40022,
                "agent_grpc": 40023, "runtime_env": 40024, "metrics": 40025,
            },
            "sid": None,
        },
        "mlflow": {
            "host": "127.0.0.1",
            "port": 40000,
            "backend_store_uri": f"sqlite:///{directory / 'mlflow.db'}",
            "artifacts_destination": str(directory / "mlartifacts"),
            "log": str(logs / "mlflow.log"),
            "sid": None,
        },
    }
    if stage in ("mlflow-started", "up"):
        state["mlflow"]["sid"] = 4100
        state["mlflow"]["pid"] = 4100
    if stage == "up":
        state["head"]["sid"] = 4200
        state["worker"]["sid"] = 4300
        state["up_seconds"] = 31.4
    return state


def write_as_the_dict_code_did(directory, state: dict) -> str:
    text = json.dumps(state, indent=2) + "\n"
    (directory / cluster.STATE_FILE).write_text(text)
    return text


def typed_state(directory) -> ClusterState:
    return ClusterState(
        dir=str(directory),
        created=1764000000.25,
        auth_mode="disabled",
        ray_address="127.0.0.4:6379",
        tracking_uri="http://127.0.0.1:5000",
        dashboard_url="http://127.0.0.4:8265",
        python="/usr/bin/python3",
        head=HeadNode(
            address="127.0.0.4", gcs_port=6379, dashboard_port=8265, client_port=10001, num_cpus=2,
            temp_dir=str(directory / "ray" / "head"), log=str(directory / "logs" / "ray-head.log"),
            ports=NodePorts(*range(41000, 41006)), sid=12,
        ),
        worker=WorkerNode(
            address="127.0.0.5", num_cpus=3, resource="melora_worker", temp_dir=str(directory / "ray" / "worker"),
            log=str(directory / "logs" / "ray-worker.log"), ports=NodePorts(*range(42000, 42006)), sid=13,
        ),
        mlflow=MlflowServer(
            host="127.0.0.1", port=5000, backend_store_uri="sqlite:///x.db", artifacts_destination="/a",
            log="/l", sid=11, pid=11,
        ),
        up_seconds=12.5,
    )


def test_save_then_load_gives_an_equal_state(tmp_path):
    state = typed_state(tmp_path)
    cluster.save_state(state)
    loaded = cluster.load_state(tmp_path)
    assert loaded == state
    assert isinstance(loaded.worker.ports, NodePorts) and loaded.worker.ports.metrics == 42005
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, then renamed


@pytest.mark.parametrize("stage", ["saved-first", "mlflow-started", "up"])
def test_a_file_in_the_dict_layout_loads_and_saves_back_byte_for_byte(tmp_path, stage):
    old = dict_layout(tmp_path, stage)
    text = write_as_the_dict_code_did(tmp_path, old)
    state = cluster.load_state(tmp_path)
    assert state.ray_address == "127.0.0.2:40001" and state.head.gcs_port == 40001
    assert state.worker.ports == NodePorts(40020, 40021, 40022, 40023, 40024, 40025)
    assert state.mlflow.pid == old["mlflow"].get("pid") and state.up_seconds == old.get("up_seconds")
    assert state.to_json() == old
    cluster.save_state(state)
    assert (tmp_path / cluster.STATE_FILE).read_text() == text  # same keys, same order, nothing added


def test_up_builds_the_state_in_the_dict_layout(tmp_path):
    ports = _Ports(
        mlflow=40000, gcs=40001, dashboard=40002, client=40003,
        head=NodePorts(*range(40010, 40016)), worker=NodePorts(*range(40020, 40026)),
    )
    state = _new_state(tmp_path, "token", ports, "127.0.0.2", "127.0.0.3", num_cpus_head=1, num_cpus_worker=2)
    expected = dict_layout(tmp_path, "saved-first")
    built = state.to_json()
    assert built.pop("created") > 0 and built.pop("python")
    del expected["created"], expected["python"]
    assert json.dumps(built) == json.dumps(expected)  # the same keys in the same order, the same values


def test_the_state_reads_by_json_key_as_the_dict_did(tmp_path):
    old = dict_layout(tmp_path, "up")
    write_as_the_dict_code_did(tmp_path, old)
    state = cluster.load_state(tmp_path)
    for key in ("ray_address", "tracking_uri", "auth_mode", "dir"):
        assert state[key] == old[key]
    assert state["worker"]["sid"] == 4300 and state["head"]["temp_dir"] == old["head"]["temp_dir"]
    with pytest.raises(KeyError):
        state["no_such_key"]
    assert cluster._component_sids(state) == state.session_ids() == {"worker": 4300, "head": 4200, "mlflow": 4100}


def test_a_partial_state_file_loads_so_that_down_can_stop_what_it_names(tmp_path):
    partial = {
        "dir": str(tmp_path), "ray_address": "127.0.0.2:1", "tracking_uri": "http://127.0.0.1:1",
        "head": {"sid": 4242, "temp_dir": str(tmp_path / "ray" / "head")},
        "worker": {"sid": None, "temp_dir": str(tmp_path / "ray" / "worker")},
        "mlflow": {"sid": None},
    }
    write_as_the_dict_code_did(tmp_path, partial)
    state = cluster.load_state(tmp_path)
    assert state.session_ids() == {"head": 4242}
    assert state.worker.ports is None and state.mlflow.pid is None and state.up_seconds is None


def test_a_state_file_without_nodes_loads_with_nothing_to_stop(tmp_path):
    write_as_the_dict_code_did(tmp_path, {"dir": str(tmp_path)})
    assert cluster.load_state(tmp_path).session_ids() == {}


def test_no_state_file_is_no_state(tmp_path):
    assert cluster.load_state(tmp_path) is None


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", json.dumps({"head": {"ports": {"node_manager": 1}}}), json.dumps({"worker": "x"})],
)
def test_an_unreadable_state_file_is_a_usage_error(tmp_path, text):
    (tmp_path / cluster.STATE_FILE).write_text(text)
    with pytest.raises(UsageError, match="cannot read .*cluster.json.*remove it after checking no cluster runs"):
        cluster.load_state(tmp_path)


def test_ray_nodes_whose_raylet_registered_too_late_are_started_once_more_and_said(tmp_path, monkeypatch, capsys):
    """`cluster up`'s `ray start` fails when the new raylet misses Ray's fixed 30 s registration wait (on a machine
    busy starting other Rays); both nodes are stopped and started once more, and it says so. Any other start failure,
    or a second timeout, is the user's to see (and `up` then stops everything: tests/test_cluster_local.py)."""
    from melora_tune.cluster import commands

    ports = _Ports(mlflow=40000, gcs=40001, dashboard=40002, client=40003,
                   head=NodePorts(*range(40010, 40016)), worker=NodePorts(*range(40020, 40026)))
    state = _new_state(tmp_path, "token", ports, "127.0.0.2", "127.0.0.3", num_cpus_head=1, num_cpus_worker=1)
    calls, stopped = [], []
    timeout_line = ("Ray head failed to start (exit 1): Exception: The current node timed out during startup. This could "
                    "happen because some of the raylet failed to startup or the GCS has become overloaded.")

    def start(node):
        def launch(st, _mb):
            getattr(st, node).sid = 100 + len(calls)
            calls.append(node)
            return node
        return launch

    def wait_ray_start(node, proc, timeout, what):
        if failures and proc == "head":
            raise RuntimeError(failures.pop(0))

    monkeypatch.setattr(commands, "start_head", start("head"))
    monkeypatch.setattr(commands, "start_worker", start("worker"))
    monkeypatch.setattr(commands, "wait_gcs", lambda *a: None)
    monkeypatch.setattr(commands, "wait_ray_start", wait_ray_start)
    monkeypatch.setattr(commands, "stop_sessions", lambda sids, timeout: stopped.append(sorted(sids)))

    failures = [timeout_line]
    commands._start_ray_nodes(state, 256, 60)
    assert calls == ["head", "worker", "head", "worker"] and stopped == [[100, 101]]
    assert capsys.readouterr().err == (f"melora-tune: {timeout_line}; stopping both Ray nodes and starting them once "
                                       "more\n")

    calls.clear()
    failures = [timeout_line, timeout_line]
    with pytest.raises(RuntimeError, match="timed out during startup"):
        commands._start_ray_nodes(state, 256, 60)
    assert calls == ["head", "worker", "head", "worker"]

    calls.clear()
    failures = ["Ray head failed to start (exit 1): ValueError: port 6379 is in use"]
    with pytest.raises(RuntimeError, match="port 6379 is in use"):
        commands._start_ray_nodes(state, 256, 60)
    assert calls == ["head", "worker"]
