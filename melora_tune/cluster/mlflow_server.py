"""The cluster's MLflow tracking server: its health check and waiting for it to answer."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from melora_tune.cluster.processes import last_error_line
from melora_tune.cluster.state import ClusterState

MLFLOW_HOST = "127.0.0.1"


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
