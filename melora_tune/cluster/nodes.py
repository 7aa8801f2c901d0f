"""The cluster's two Ray nodes: their temp dirs, starting them, waiting for them, asking the GCS about them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from melora_tune.cluster.network import wait_port
from melora_tune.cluster.processes import console_command, last_error_line, start_detached
from melora_tune.cluster.state import ClusterState, HeadNode, WorkerNode, save_state

WORKER_RESOURCE = "melora_worker"  # custom resource only the worker node has: pins work there
HEAD_RESOURCE = "melora_head"
# AF_UNIX paths are limited to 107 bytes; Ray puts sockets at
# <temp-dir>/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store (temp-dir + ~66).
MAX_RAY_TEMP_DIR = 40


def ray_env(state: ClusterState | None = None, auth_mode: str | None = None) -> dict[str, str]:
    """The environment a Ray client of this cluster needs (os.environ plus RAY_AUTH_MODE)."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = auth_mode or (state and state.auth_mode) or "token"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def ray_temp_root(directory: Path) -> Path:
    local = directory / "ray"
    if len(str(local / "worker")) <= MAX_RAY_TEMP_DIR:
        return local
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:10]
    return Path("/tmp") / f"melora-ray-{digest}"


def start_head(state: ClusterState, object_store_mb: int) -> subprocess.Popen:
    head = state.head
    return _launch(
        state,
        head,
        [
            "start", "--head",
            f"--port={head.gcs_port}",
            f"--ray-client-server-port={head.client_port}",
            "--include-dashboard=true",
            f"--dashboard-host={head.address}",
            f"--dashboard-port={head.dashboard_port}",
            f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
        ],
        object_store_mb,
    )


def wait_gcs(state: ClusterState, head_proc: subprocess.Popen, timeout: float) -> None:
    """Returns once the head's GCS accepts connections, which is all a worker's `ray start` needs
    (it waits for the rest of the head by itself): starting the worker then saves 10-20 s."""
    head = state.head
    wait_port(head.address, head.gcs_port, head_proc, timeout, "Ray head", Path(head.log))


def start_worker(state: ClusterState, object_store_mb: int) -> subprocess.Popen:
    return _launch(
        state,
        state.worker,
        ["start", f"--address={state.ray_address}", f"--resources={json.dumps({WORKER_RESOURCE: 1})}"],
        object_store_mb,
    )


def _launch(
    state: ClusterState, node: HeadNode | WorkerNode, start_args: list[str], object_store_mb: int
) -> subprocess.Popen:
    """Starts `ray start` in a new session and records the session id (= its pid) at once, so
    that a failed or interrupted start can still be stopped by `down`."""
    cmd = console_command("ray", "ray.scripts.scripts") + start_args + _node_flags(node, object_store_mb)
    proc = start_detached(cmd, Path(node.log), ray_env(state))
    node.sid = proc.pid
    save_state(state)
    return proc


def _node_flags(node: HeadNode | WorkerNode, object_store_mb: int) -> list[str]:
    # Every port is given (none left to Ray's defaults): two nodes on one host must not collide.
    p = node.ports
    return [
        f"--node-ip-address={node.address}",
        f"--temp-dir={node.temp_dir}",
        f"--num-cpus={node.num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        f"--node-manager-port={p.node_manager}",
        f"--object-manager-port={p.object_manager}",
        f"--dashboard-agent-listen-port={p.agent_listen}",
        f"--dashboard-agent-grpc-port={p.agent_grpc}",
        f"--runtime-env-agent-port={p.runtime_env}",
        f"--metrics-export-port={p.metrics}",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
    ]


def wait_ray_start(node: HeadNode | WorkerNode, proc: subprocess.Popen, timeout: float, what: str) -> None:
    log = Path(node.log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not start within {timeout:.0f} s (log: {log})") from None
    if rc != 0:
        raise RuntimeError(f"{what} failed to start (exit {rc}): {last_error_line(log)} (log: {log})")


# Queried in a child process: a Ray client keeps global state and can block on a dead GCS.
_NODES_SNIPPET = r"""
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [
    {"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
     "resources": n.get("Resources", {})}
    for n in ray.nodes()
]
print("NODES_JSON " + json.dumps(nodes))
ray.shutdown()
"""


def ray_nodes(state: ClusterState, timeout: float = 60.0) -> list[dict]:
    """The cluster's nodes as the GCS sees them (alive and dead). Raises RuntimeError."""
    env = ray_env(state)
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "10"
    try:
        out = subprocess.run(
            [state.python or sys.executable, "-c", _NODES_SNIPPET, state.ray_address],
            capture_output=True, text=True, env=env, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer from Ray at {state.ray_address} within {timeout:.0f} s") from None
    for line in out.stdout.splitlines():
        if line.startswith("NODES_JSON "):
            return json.loads(line[len("NODES_JSON "):])
    err = [l for l in out.stderr.splitlines() if l.strip()]
    raise RuntimeError(f"cannot reach Ray at {state.ray_address}: {err[-1][-300:] if err else 'no output'}")


def wait_alive_nodes(state: ClusterState, expected: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = ray_nodes(state, timeout=max(10.0, deadline - time.monotonic()))
        if sum(n["alive"] for n in nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['alive'] for n in nodes)} of {expected} Ray nodes alive after {timeout:.0f} s")
        time.sleep(1.0)
