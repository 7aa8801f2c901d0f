"""The cluster's MLflow tracking server: starting it, its health check, waiting for it to answer."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from melora_tune.cluster.processes import console_command, last_error_line, start_detached
from melora_tune.cluster.state import ClusterState, save_state
from melora_tune.records.store import mlflow_server_command

MLFLOW_HOST = "127.0.0.1"


def start_mlflow(state: ClusterState) -> subprocess.Popen:
    m = state.mlflow
    cmd, env = mlflow_server_command(console_command("mlflow", "mlflow"), m.backend_store_uri, m.host, m.port,
                                     m.artifacts_destination)
    proc = start_detached(cmd, Path(m.log), env)
    m.sid = m.pid = proc.pid  # the pid is the session id: a new session's leader
    save_state(state)  # at once, so that `down` can stop it should `up` fail later
    return proc


def mlflow_health(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_mlflow(state: ClusterState, proc: subprocess.Popen, timeout: float) -> None:
    uri = state.tracking_uri
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mlflow_health(uri):
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"MLflow server exited ({proc.returncode}): {last_error_line(Path(state.mlflow.log))}"
            )
        time.sleep(0.5)
    raise RuntimeError(f"MLflow server did not answer {uri}/health within {timeout:.0f} s (log: {state.mlflow.log})")
