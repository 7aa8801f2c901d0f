"""`melora-tune cluster up|status|down`: a local multi-node Ray cluster plus an MLflow server.

For tests and for trying a search the way it runs on a real cluster: a Ray head and one Ray
worker node on two distinct loopback addresses (127.0.0.2 and 127.0.0.3 by default; Ray
rewrites 127.0.0.1 to the host's external address, distinct loopback addresses keep it on
loopback), each with its own temp dir so that its processes and logs are told apart, and an
MLflow tracking server on 127.0.0.1 with a SQLite backend in DIR.

Each server is started in a session of its own (``start_new_session``), so every process of a
node, including the worker processes its raylet forks later, carries that session id: `down`
stops exactly those processes by id (SIGTERM, then SIGKILL after a timeout) and never touches
another Ray cluster on the same machine. The state (addresses, ports, session ids) lives in
DIR/cluster.json.

Binding: the dashboard, agents, client server and MLflow listen on the loopback addresses
given. Ray 2.60's core gRPC servers (GCS, raylet, object manager, workers) and the metrics
exporter listen on all interfaces whatever the node address is; that is why the cluster runs
with Ray token authentication by default (``RAY_AUTH_MODE=token``, token in ~/.ray/auth_token),
and why every client (the search driver included) needs ``RAY_AUTH_MODE=token`` in its
environment: `up` prints the line to export.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from melora_tune.errors import UsageError

STATE_FILE = "cluster.json"
WORKER_RESOURCE = "melora_worker"  # custom resource only the worker node has: pins work there
HEAD_RESOURCE = "melora_head"
MLFLOW_HOST = "127.0.0.1"
# AF_UNIX paths are limited to 107 bytes; Ray puts sockets at
# <temp-dir>/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store (temp-dir + ~66).
MAX_RAY_TEMP_DIR = 40


def default_dir() -> Path:
    return Path(os.environ.get("MELORA_CLUSTER_DIR") or Path.home() / ".cache" / "melora-tune" / "cluster")


# --------------------------------------------------------------------------------------------
# processes


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie holds no resources; its parent reaps it
        return None
    return int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    if not sid:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _session_of(int(entry)) == sid:
            pids.append(int(entry))
    return sorted(pids)


def stop_sessions(sids: list[int], timeout: float = 10.0) -> dict[str, int]:
    """SIGTERM every process of these sessions, SIGKILL what is left after `timeout` seconds."""
    sids = [s for s in sids if s]
    pids = sorted({p for s in sids for p in session_pids(s)})
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(session_pids(s) for s in sids):
        time.sleep(0.2)
    killed = 0
    # Processes forked after the SIGTERM (a raylet restarting a worker) are caught here too.
    for _ in range(3):
        left = sorted({p for s in sids for p in session_pids(s)})
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.3)
    return {"terminated": len(pids), "killed": killed, "left": len({p for s in sids for p in session_pids(s)})}


# --------------------------------------------------------------------------------------------
# addresses and ports


def _check_loopback(address: str, flag: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"{flag} {address!r} is not an IP address (use a loopback one, e.g. 127.0.0.2)") from None
    if ip.version != 4 or not ip.is_loopback:
        raise UsageError(f"{flag} {address} is not an IPv4 loopback address: the local cluster binds loopback only")
    if address == "127.0.0.1":
        raise UsageError(f"{flag} 127.0.0.1: Ray rewrites it to the host's external address; use 127.0.0.2 or another")
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError as err:
        raise UsageError(f"{flag} {address} cannot be bound here: {err.strerror}") from None
    return address


def _port_free(port: int, host: str = "") -> bool:
    """Free on `host`; with host '' (all interfaces) this fails if any address holds the port."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class _PortPool:
    """Distinct ports, free on every interface (Ray's gRPC servers bind all of them).

    The probing sockets stay open until `release()` so two picks never collide."""

    def __init__(self):
        self._held: list[socket.socket] = []
        self.ports: set[int] = set()

    def take(self, port: int | None = None, what: str = "port") -> int:
        s = socket.socket()
        try:
            s.bind(("", port or 0))
        except OSError:
            s.close()
            raise UsageError(f"{what} {port} is in use") from None
        self._held.append(s)
        chosen = s.getsockname()[1]
        self.ports.add(chosen)
        return chosen

    def release(self):
        for s in self._held:
            s.close()
        self._held.clear()


# --------------------------------------------------------------------------------------------
# state


def state_path(directory: Path) -> Path:
    return Path(directory) / STATE_FILE


def load_state(directory: Path) -> dict | None:
    path = state_path(directory)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}; remove it after checking no cluster runs") from None


def _save_state(state: dict) -> None:
    path = state_path(Path(state["dir"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def _component_sids(state: dict) -> dict[str, int]:
    return {name: state[name]["sid"] for name in ("worker", "head", "mlflow") if state.get(name, {}).get("sid")}


def alive_pids(state: dict) -> dict[str, list[int]]:
    return {name: session_pids(sid) for name, sid in _component_sids(state).items()}


def ray_env(state: dict | None = None, auth_mode: str | None = None) -> dict[str, str]:
    """The environment a Ray client of this cluster needs (os.environ plus RAY_AUTH_MODE)."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = auth_mode or (state or {}).get("auth_mode", "token")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _ray_temp_root(directory: Path) -> Path:
    local = directory / "ray"
    if len(str(local / "worker")) <= MAX_RAY_TEMP_DIR:
        return local
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:10]
    return Path("/tmp") / f"melora-ray-{digest}"


def _cli(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", module]


# --------------------------------------------------------------------------------------------
# up


def _start_detached(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def _last_error_line(log: Path) -> str:
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if any(k in line for k in ("Error", "error", "ERROR", "failed", "Failed")):
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


def mlflow_health(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_mlflow(state: dict, proc: subprocess.Popen, timeout: float) -> None:
    uri = state["tracking_uri"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mlflow_health(uri):
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"MLflow server exited ({proc.returncode}): {_last_error_line(Path(state['mlflow']['log']))}"
            )
        time.sleep(0.5)
    raise RuntimeError(f"MLflow server did not answer {uri}/health within {timeout:.0f} s (log: {state['mlflow']['log']})")


def up(
    directory: Path,
    head_address: str = "127.0.0.2",
    worker_address: str = "127.0.0.3",
    num_cpus_head: int = 1,
    num_cpus_worker: int = 1,
    mlflow_port: int | None = None,
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    object_store_mb: int = 256,
    auth_mode: str | None = None,
    timeout: float = 120.0,
    wait_nodes: bool = True,
) -> dict:
    """Starts head, worker and MLflow; returns the state. Raises UsageError for user errors."""
    directory = Path(directory).expanduser().resolve()
    auth_mode = (auth_mode or os.environ.get("RAY_AUTH_MODE") or "token").lower()
    if auth_mode not in ("token", "disabled"):
        raise UsageError(f"--auth {auth_mode!r}: use token or disabled")
    _check_loopback(head_address, "--head-address")
    _check_loopback(worker_address, "--worker-address")
    if head_address == worker_address:
        raise UsageError("--head-address and --worker-address must differ (two nodes on one host need two addresses)")
    if num_cpus_head < 1 or num_cpus_worker < 1:
        raise UsageError("--num-cpus-head and --num-cpus-worker must be at least 1 (a trial cannot request 0 CPU)")
    if object_store_mb < 80:
        raise UsageError("--object-store-mb must be at least 80")

    previous = load_state(directory)
    if previous is not None:
        running = {k: v for k, v in alive_pids(previous).items() if v}
        if running:
            raise UsageError(
                f"a local cluster is already up in {directory} ({', '.join(running)} running; "
                f"Ray {previous.get('ray_address')}); stop it with: melora-tune cluster down --dir {directory}"
            )
        state_path(directory).unlink()  # stale: nothing of it runs any more

    pool = _PortPool()
    try:
        if mlflow_port is not None and not _port_free(mlflow_port, MLFLOW_HOST):
            raise UsageError(f"--mlflow-port {mlflow_port} is in use on {MLFLOW_HOST}")
        ports = {
            "mlflow": pool.take(mlflow_port, "--mlflow-port"),
            "gcs": pool.take(ray_port, "--ray-port"),
            "dashboard": pool.take(dashboard_port, "--dashboard-port"),
            "client": pool.take(),
        }
        node_ports = {
            role: {
                k: pool.take()
                for k in ("node_manager", "object_manager", "agent_listen", "agent_grpc", "runtime_env", "metrics")
            }
            for role in ("head", "worker")
        }
    finally:
        pool.release()

    directory.mkdir(parents=True, exist_ok=True)
    temp_root = _ray_temp_root(directory)
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    ray_address = f"{head_address}:{ports['gcs']}"
    state: dict = {
        "version": 1,
        "dir": str(directory),
        "created": time.time(),
        "auth_mode": auth_mode,
        "ray_address": ray_address,
        "tracking_uri": f"http://{MLFLOW_HOST}:{ports['mlflow']}",
        "dashboard_url": f"http://{head_address}:{ports['dashboard']}",
        "python": sys.executable,
        "head": {
            "address": head_address,
            "gcs_port": ports["gcs"],
            "dashboard_port": ports["dashboard"],
            "client_port": ports["client"],
            "num_cpus": num_cpus_head,
            "temp_dir": str(temp_root / "head"),
            "log": str(logs / "ray-head.log"),
            "ports": node_ports["head"],
            "sid": None,
        },
        "worker": {
            "address": worker_address,
            "num_cpus": num_cpus_worker,
            "resource": WORKER_RESOURCE,
            "temp_dir": str(temp_root / "worker"),
            "log": str(logs / "ray-worker.log"),
            "ports": node_ports["worker"],
            "sid": None,
        },
        "mlflow": {
            "host": MLFLOW_HOST,
            "port": ports["mlflow"],
            "backend_store_uri": f"sqlite:///{directory / 'mlflow.db'}",
            "artifacts_destination": str(directory / "mlartifacts"),
            "log": str(logs / "mlflow.log"),
            "sid": None,
        },
    }
    _save_state(state)
    env = ray_env(auth_mode=auth_mode)
    store = str(object_store_mb * 1024 * 1024)

    def node_flags(role: str) -> list[str]:
        p = state[role]["ports"]
        return [
            f"--node-ip-address={state[role]['address']}",
            f"--temp-dir={state[role]['temp_dir']}",
            f"--num-cpus={state[role]['num_cpus']}",
            "--num-gpus=0",
            f"--object-store-memory={store}",
            f"--node-manager-port={p['node_manager']}",
            f"--object-manager-port={p['object_manager']}",
            f"--dashboard-agent-listen-port={p['agent_listen']}",
            f"--dashboard-agent-grpc-port={p['agent_grpc']}",
            f"--runtime-env-agent-port={p['runtime_env']}",
            f"--metrics-export-port={p['metrics']}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]

    ray = _cli("ray", "ray.scripts.scripts")
    try:
        # MLflow first: it boots while Ray starts.
        mlflow_env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        mlflow_proc = _start_detached(
            _cli("mlflow", "mlflow")
            + [
                "server",
                "--backend-store-uri", state["mlflow"]["backend_store_uri"],
                "--artifacts-destination", state["mlflow"]["artifacts_destination"],
                "--host", MLFLOW_HOST,
                "--port", str(ports["mlflow"]),
                "--workers", "1",
            ],
            Path(state["mlflow"]["log"]),
            mlflow_env,
        )
        state["mlflow"]["sid"] = mlflow_proc.pid
        state["mlflow"]["pid"] = mlflow_proc.pid
        _save_state(state)

        head_cmd = ray + [
            "start", "--head",
            f"--port={ports['gcs']}",
            f"--ray-client-server-port={ports['client']}",
            "--include-dashboard=true",
            f"--dashboard-host={head_address}",
            f"--dashboard-port={ports['dashboard']}",
            f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
        ] + node_flags("head")
        # The worker's `ray start` waits for the GCS by itself: launch it as soon as the GCS
        # port accepts connections rather than after the whole head is up (saves 10-20 s).
        head_proc = _launch_recorded(state, "head", head_cmd, env)
        _wait_port(head_address, ports["gcs"], head_proc, timeout, "Ray head", Path(state["head"]["log"]))
        worker_cmd = ray + [
            "start",
            f"--address={ray_address}",
            f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
        ] + node_flags("worker")
        worker_proc = _launch_recorded(state, "worker", worker_cmd, env)
        _wait_ray_start(state, "head", head_proc, timeout, "Ray head")
        _wait_ray_start(state, "worker", worker_proc, timeout, "Ray worker")
        _wait_mlflow(state, mlflow_proc, timeout)
        if wait_nodes:
            _wait_nodes(state, expected=2, timeout=timeout)
    except BaseException as err:
        stop_sessions(list(_component_sids(state).values()), timeout=5)
        with contextlib.suppress(OSError):
            state_path(directory).unlink()
        if isinstance(err, (RuntimeError, OSError)):
            raise UsageError(f"local cluster did not come up: {err}") from None
        raise
    state["up_seconds"] = round(time.time() - state["created"], 1)
    _save_state(state)
    return state


def _launch_recorded(state: dict, role: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Starts `ray start` in a new session and records the session id (= its pid) at once, so
    that a failed or interrupted start can still be stopped by `down`."""
    proc = _start_detached(cmd, Path(state[role]["log"]), env)
    state[role]["sid"] = proc.pid
    _save_state(state)
    return proc


def _wait_ray_start(state: dict, role: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    log = Path(state[role]["log"])
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not start within {timeout:.0f} s (log: {log})") from None
    if rc != 0:
        raise RuntimeError(f"{what} failed to start (exit {rc}): {_last_error_line(log)} (log: {log})")


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        if proc.poll() not in (None, 0):
            raise RuntimeError(f"{what} failed to start (exit {proc.returncode}): {_last_error_line(log)} (log: {log})")
        time.sleep(0.3)
    raise RuntimeError(f"{what}: nothing listens on {host}:{port} after {timeout:.0f} s (log: {log})")


# --------------------------------------------------------------------------------------------
# querying Ray (in a child process: a Ray client keeps global state and can block on a dead GCS)

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


def ray_nodes(state: dict, timeout: float = 60.0) -> list[dict]:
    """The cluster's nodes as the GCS sees them (alive and dead). Raises RuntimeError."""
    env = ray_env(state)
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "10"
    try:
        out = subprocess.run(
            [state.get("python") or sys.executable, "-c", _NODES_SNIPPET, state["ray_address"]],
            capture_output=True, text=True, env=env, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer from Ray at {state['ray_address']} within {timeout:.0f} s") from None
    for line in out.stdout.splitlines():
        if line.startswith("NODES_JSON "):
            return json.loads(line[len("NODES_JSON "):])
    err = [l for l in out.stderr.splitlines() if l.strip()]
    raise RuntimeError(f"cannot reach Ray at {state['ray_address']}: {err[-1][-300:] if err else 'no output'}")


def _wait_nodes(state: dict, expected: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = ray_nodes(state, timeout=max(10.0, deadline - time.monotonic()))
        if sum(n["alive"] for n in nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['alive'] for n in nodes)} of {expected} Ray nodes alive after {timeout:.0f} s")
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------
# status, down, kill


def status(directory: Path, query_ray: bool = True) -> dict:
    directory = Path(directory).expanduser().resolve()
    state = load_state(directory)
    if state is None:
        raise UsageError(f"no local cluster in {directory} (start one with: melora-tune cluster up --dir {directory})")
    procs = alive_pids(state)
    report = {
        "dir": str(directory),
        "ray_address": state["ray_address"],
        "tracking_uri": state["tracking_uri"],
        "dashboard_url": state.get("dashboard_url"),
        "auth_mode": state.get("auth_mode"),
        "processes": {k: len(v) for k, v in procs.items()},
        "nodes": None,
        "ray_error": None,
        "mlflow_ok": mlflow_health(state["tracking_uri"]),
    }
    if query_ray and procs.get("head"):
        try:
            report["nodes"] = ray_nodes(state, timeout=60)
        except RuntimeError as err:
            report["ray_error"] = str(err)
    elif query_ray:
        report["ray_error"] = "the Ray head is not running"
    alive = [n for n in report["nodes"] or [] if n["alive"]]
    report["healthy"] = bool(report["mlflow_ok"] and len(alive) >= 2)
    return report


def down(directory: Path, timeout: float = 10.0, keep_logs: bool = False) -> dict | None:
    """Stops everything the state file names; None when there was nothing to stop."""
    directory = Path(directory).expanduser().resolve()
    state = load_state(directory)
    if state is None:
        return None
    result = stop_sessions(list(_component_sids(state).values()), timeout=timeout)
    if result["left"]:
        raise UsageError(f"{result['left']} processes survived SIGKILL; state kept in {state_path(directory)}")
    for role in ("head", "worker"):
        temp = Path(state[role]["temp_dir"])
        with contextlib.suppress(OSError):
            (temp / "ray_current_cluster").unlink()
        if not keep_logs:
            shutil.rmtree(temp, ignore_errors=True)
    if not keep_logs:
        root = _ray_temp_root(directory)
        with contextlib.suppress(OSError):
            root.rmdir()
    state_path(directory).unlink()
    return result


def kill_node(directory: Path, role: str = "worker", sig: int = signal.SIGKILL) -> list[int]:
    """Kills one Ray node abruptly (failure drills): every process of its session gets `sig`."""
    state = load_state(Path(directory).expanduser().resolve())
    if state is None:
        raise UsageError(f"no local cluster in {directory}")
    pids = session_pids(state[role]["sid"])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


# --------------------------------------------------------------------------------------------
# CLI


def add_cluster_parser(sub) -> None:
    p = sub.add_parser(
        "cluster",
        help="start, inspect or stop a local multi-node Ray cluster with an MLflow server",
        description=__doc__.split("\n\n")[0],
    )
    csub = p.add_subparsers(dest="cluster_command", required=True, parser_class=type(p))
    dir_help = "state, logs and MLflow data (default $MELORA_CLUSTER_DIR or ~/.cache/melora-tune/cluster)"

    u = csub.add_parser("up", help="start a Ray head, a Ray worker node and an MLflow server on loopback")
    u.add_argument("--head-address", default="127.0.0.2", help="loopback address of the head node (default 127.0.0.2)")
    u.add_argument("--worker-address", default="127.0.0.3", help="loopback address of the worker node (default 127.0.0.3)")
    u.add_argument("--num-cpus-head", type=int, default=1, help="CPUs the head node offers (default 1)")
    u.add_argument("--num-cpus-worker", type=int, default=1, help="CPUs the worker node offers (default 1)")
    u.add_argument("--mlflow-port", type=int, help="MLflow port on 127.0.0.1 (default: a free one)")
    u.add_argument("--ray-port", type=int, help="GCS port of the head (default: a free one)")
    u.add_argument("--dashboard-port", type=int, help="Ray dashboard port (default: a free one)")
    u.add_argument("--object-store-mb", type=int, default=256, help="object store per node in MiB (default 256)")
    u.add_argument("--auth", choices=("token", "disabled"), help="Ray auth mode (default $RAY_AUTH_MODE or token)")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each server (default 120)")
    u.add_argument("--dir", type=Path, default=None, help=dir_help)
    u.set_defaults(func=_up_command)

    s = csub.add_parser("status", help="show the nodes Ray sees and whether MLflow answers")
    s.add_argument("--dir", type=Path, default=None, help=dir_help)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_status_command)

    d = csub.add_parser("down", help="stop every process of the local cluster (idempotent)")
    d.add_argument("--dir", type=Path, default=None, help=dir_help)
    d.add_argument("--timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    d.add_argument("--keep-logs", action="store_true", help="keep the Ray temp dirs (session logs)")
    d.set_defaults(func=_down_command)


def _up_command(args) -> int:
    directory = args.dir or default_dir()
    state = up(
        directory,
        head_address=args.head_address,
        worker_address=args.worker_address,
        num_cpus_head=args.num_cpus_head,
        num_cpus_worker=args.num_cpus_worker,
        mlflow_port=args.mlflow_port,
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        object_store_mb=args.object_store_mb,
        auth_mode=args.auth,
        timeout=args.timeout,
    )
    h, w, m = state["head"], state["worker"], state["mlflow"]
    print(f"Ray head    {h['address']}  {h['num_cpus']} CPU  dashboard {state['dashboard_url']}")
    print(f"Ray worker  {w['address']}  {w['num_cpus']} CPU  custom resource {w['resource']}")
    print(f"MLflow      {state['tracking_uri']}  ({m['backend_store_uri']}, artifacts {m['artifacts_destination']})")
    print(f"up in {state['up_seconds']} s; state {state_path(Path(state['dir']))}; logs {Path(state['dir']) / 'logs'}")
    print()
    print(f"export RAY_AUTH_MODE={state['auth_mode']}")
    print(f"--address {state['ray_address']} --tracking-uri {state['tracking_uri']}")
    print(
        "e.g. melora-tune search search_spaces/demo.yaml "
        f"--address {state['ray_address']} --tracking-uri {state['tracking_uri']}"
    )
    print(f"stop: melora-tune cluster down --dir {state['dir']}")
    return 0


def _status_command(args) -> int:
    report = status(args.dir or default_dir())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["healthy"] else 1
    print(f"Ray {report['ray_address']}  dashboard {report['dashboard_url']}  (RAY_AUTH_MODE={report['auth_mode']})")
    print("processes: " + ", ".join(f"{k} {v}" for k, v in report["processes"].items()))
    if report["nodes"] is None:
        print(f"nodes: unknown ({report['ray_error']})")
    else:
        for n in sorted(report["nodes"], key=lambda n: n["address"]):
            res = n["resources"]
            extra = [k for k in res if k in (HEAD_RESOURCE, WORKER_RESOURCE)]
            print(
                f"node {n['address']:<12} {'ALIVE' if n['alive'] else 'DEAD ':<5}  "
                f"CPU {res.get('CPU', 0):g}  GPU {res.get('GPU', 0):g}  {' '.join(extra)}  {n['node_id'][:12]}"
            )
    print(f"MLflow {report['tracking_uri']}: {'answers /health' if report['mlflow_ok'] else 'NOT answering'}")
    return 0 if report["healthy"] else 1


def _down_command(args) -> int:
    directory = (args.dir or default_dir()).expanduser().resolve()
    result = down(directory, timeout=args.timeout, keep_logs=args.keep_logs)
    if result is None:
        print(f"no local cluster in {directory}: nothing to stop")
    else:
        print(
            f"stopped the local cluster in {directory}: {result['terminated']} processes "
            f"({result['killed']} needed SIGKILL)"
        )
    return 0
