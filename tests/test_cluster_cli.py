"""`melora-tune cluster`: argument errors, not-up handling and stopping processes by session, fast
(nothing of Ray or MLflow starts here; tests/test_cluster_local.py runs the real cluster)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from melora_tune import cluster
from melora_tune.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--head-address", "10.1.2.3"], "not an IPv4 loopback address"),
        (["--worker-address", "localhost"], "is not an IP address"),
        (["--head-address", "127.0.0.1"], "Ray rewrites it"),
        (["--head-address", "127.0.0.3", "--worker-address", "127.0.0.3"], "must differ"),
        (["--num-cpus-worker", "0"], "at least 1"),
    ],
)
def test_up_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, message):
    code, out, err = run(capsys, "cluster", "up", "--dir", str(tmp_path), *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("melora-tune cluster: error:")
    assert not (tmp_path / cluster.STATE_FILE).exists()


def test_up_refuses_a_port_in_use(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = run(capsys, "cluster", "up", "--dir", str(tmp_path), "--mlflow-port", str(port))
    assert code == 2 and f"--mlflow-port {port} is in use" in err and err.count("\n") == 1
    assert not (tmp_path / cluster.STATE_FILE).exists()


def test_status_and_down_when_nothing_is_up(tmp_path, capsys):
    code, _, err = run(capsys, "cluster", "status", "--dir", str(tmp_path))
    assert code == 2 and "no local cluster in" in err and err.count("\n") == 1
    code, out, _ = run(capsys, "cluster", "down", "--dir", str(tmp_path))
    assert code == 0 and "nothing to stop" in out


def spawn_session(script: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", script], start_new_session=True)


def wait_count(sid: int, n: int, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = cluster.session_pids(sid)
        if len(pids) >= n:
            return pids
        time.sleep(0.05)
    return cluster.session_pids(sid)


def test_stop_sessions_terminates_children_and_kills_what_ignores_sigterm():
    polite = spawn_session("sleep 300 & sleep 300 & wait")
    # A process that ignores SIGTERM, and a grandchild that left its parent's process group (as Ray
    # worker processes do with setpgid): both still carry the session id.
    stubborn = spawn_session("trap '' TERM; (set -m; sleep 300 & wait) & while true; do sleep 0.1; done")
    try:
        assert len(wait_count(polite.pid, 3)) == 3
        stubborn_pids = wait_count(stubborn.pid, 3)
        assert len(stubborn_pids) >= 3
        result = cluster.stop_sessions([polite.pid, stubborn.pid], timeout=1.0)
        assert result["left"] == 0 and result["killed"] >= 1
        assert cluster.session_pids(polite.pid) == [] and cluster.session_pids(stubborn.pid) == []
    finally:
        for p in (polite, stubborn):
            p.kill()
            p.wait()


def test_down_with_a_stale_state_file_stops_what_it_names_and_clears_it(tmp_path, capsys):
    proc = spawn_session("sleep 300 & wait")
    try:
        wait_count(proc.pid, 2)
        temp = tmp_path / "ray" / "head"
        temp.mkdir(parents=True)
        (temp / "ray_current_cluster").write_text("127.0.0.2:1\n")
        state = {
            "dir": str(tmp_path), "ray_address": "127.0.0.2:1", "tracking_uri": "http://127.0.0.1:1",
            "head": {"sid": proc.pid, "temp_dir": str(temp)},
            "worker": {"sid": None, "temp_dir": str(tmp_path / "ray" / "worker")},
            "mlflow": {"sid": None},
        }
        (tmp_path / cluster.STATE_FILE).write_text(json.dumps(state))
        code, out, _ = run(capsys, "cluster", "down", "--dir", str(tmp_path), "--timeout", "2")
        assert code == 0 and "stopped the local cluster" in out
        assert cluster.session_pids(proc.pid) == []
        assert not (tmp_path / cluster.STATE_FILE).exists() and not temp.exists()
        code, out, _ = run(capsys, "cluster", "down", "--dir", str(tmp_path))
        assert code == 0 and "nothing to stop" in out
    finally:
        proc.kill()
        proc.wait()


def test_ray_temp_dirs_stay_short_enough_for_unix_sockets(tmp_path):
    deep = tmp_path / ("x" * 80)
    root = cluster._ray_temp_root(deep)
    assert len(str(root / "worker")) <= cluster.MAX_RAY_TEMP_DIR
    assert cluster._ray_temp_root(deep) == root  # stable per DIR
    assert cluster._ray_temp_root(Path("/tmp/c")) == Path("/tmp/c/ray")  # a short DIR keeps them inside
