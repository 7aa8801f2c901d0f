"""`up`, `status`, `down` and `kill_node`, and the `melora-tune cluster` subcommands that call them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from melora_tune.cluster.mlflow_server import MLFLOW_HOST, mlflow_health, start_mlflow, wait_mlflow
from melora_tune.cluster.network import PortPool, check_loopback, port_free
from melora_tune.cluster.nodes import (
    HEAD_RESOURCE,
    WORKER_RESOURCE,
    ray_nodes,
    ray_temp_root,
    start_head,
    start_worker,
    wait_alive_nodes,
    wait_gcs,
    wait_ray_start,
)
from melora_tune.cluster.processes import alive_pids, session_pids, stop_sessions
from melora_tune.cluster.state import (
    ClusterState,
    HeadNode,
    MlflowServer,
    NodePorts,
    WorkerNode,
    default_dir,
    load_state,
    save_state,
    state_path,
)
from melora_tune.errors import UsageError


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
) -> ClusterState:
    """Starts head, worker and MLflow; returns the state. Raises UsageError for user errors."""
    directory = Path(directory).expanduser().resolve()
    auth_mode = _checked_auth_mode(auth_mode)
    _check_nodes(head_address, worker_address, num_cpus_head, num_cpus_worker, object_store_mb)
    _clear_stale_state(directory)
    ports = _allocate_ports(mlflow_port, ray_port, dashboard_port)
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    state = _new_state(directory, auth_mode, ports, head_address, worker_address, num_cpus_head, num_cpus_worker)
    # Saved now and again by each start with its session id: `down` can stop a half-started cluster.
    save_state(state)
    with _stopped_if_not_up(state):
        mlflow = start_mlflow(state)  # first: it boots while Ray starts
        _start_ray_nodes(state, object_store_mb, timeout)
        wait_mlflow(state, mlflow, timeout)
        if wait_nodes:
            wait_alive_nodes(state, expected=2, timeout=timeout)
    state.up_seconds = round(time.time() - state.created, 1)
    save_state(state)
    return state


# Ray's message when a new node's raylet did not register with the GCS within its fixed 30 s (ray/_private/node.py).
# trial/ray_env.py has the same for a local start; not imported from there: the trial package costs a `cluster`
# command about 1 s of imports (measured with -X importtime).
RAYLET_TIMEOUT = "timed out during startup"


def _start_ray_nodes(state: ClusterState, object_store_mb: int, timeout: float) -> None:
    """Head, then worker once the head's GCS answers. Ray waits a fixed 30 s for a new node's raylet to register; on a
    machine busy starting other Rays that can run out while a second start is quick (measured for a local start:
    load average 112 on 2 cores), so such a start is retried once, said on stderr, after its two nodes are stopped
    (their ports are this cluster's own)."""
    for attempt in (1, 2):
        head = start_head(state, object_store_mb)
        try:
            wait_gcs(state, head, timeout)
            worker = start_worker(state, object_store_mb)
            wait_ray_start(state.head, head, timeout, "Ray head")
            wait_ray_start(state.worker, worker, timeout, "Ray worker")
            return
        except RuntimeError as err:
            if attempt == 2 or RAYLET_TIMEOUT not in str(err):
                raise
            print(f"melora-tune: {err}; stopping both Ray nodes and starting them once more", file=sys.stderr, flush=True)
            stop_sessions([state.head.sid, state.worker.sid], timeout=5)


def _checked_auth_mode(auth_mode: str | None) -> str:
    auth_mode = (auth_mode or os.environ.get("RAY_AUTH_MODE") or "token").lower()
    if auth_mode not in ("token", "disabled"):
        raise UsageError(f"--auth {auth_mode!r}: use token or disabled")
    return auth_mode


def _check_nodes(
    head_address: str, worker_address: str, num_cpus_head: int, num_cpus_worker: int, object_store_mb: int
) -> None:
    check_loopback(head_address, "--head-address")
    check_loopback(worker_address, "--worker-address")
    if head_address == worker_address:
        raise UsageError("--head-address and --worker-address must differ (two nodes on one host need two addresses)")
    if num_cpus_head < 1 or num_cpus_worker < 1:
        raise UsageError("--num-cpus-head and --num-cpus-worker must be at least 1 (a trial cannot request 0 CPU)")
    if object_store_mb < 80:
        raise UsageError("--object-store-mb must be at least 80")


def _clear_stale_state(directory: Path) -> None:
    """Refuses to start over a cluster of which anything still runs; forgets one of which nothing does."""
    previous = load_state(directory)
    if previous is None:
        return
    running = {k: v for k, v in alive_pids(previous).items() if v}
    if running:
        raise UsageError(
            f"a local cluster is already up in {directory} ({', '.join(running)} running; "
            f"Ray {previous.ray_address}); stop it with: melora-tune cluster down --dir {directory}"
        )
    state_path(directory).unlink()


@dataclasses.dataclass
class _Ports:
    mlflow: int
    gcs: int
    dashboard: int
    client: int
    head: NodePorts
    worker: NodePorts


def _allocate_ports(mlflow_port: int | None, ray_port: int | None, dashboard_port: int | None) -> _Ports:
    """The ports asked for, checked free, and free ones for the rest."""
    pool = PortPool()
    try:
        if mlflow_port is not None and not port_free(mlflow_port, MLFLOW_HOST):
            raise UsageError(f"--mlflow-port {mlflow_port} is in use on {MLFLOW_HOST}")
        return _Ports(
            mlflow=pool.take(mlflow_port, "--mlflow-port"),
            gcs=pool.take(ray_port, "--ray-port"),
            dashboard=pool.take(dashboard_port, "--dashboard-port"),
            client=pool.take(),
            head=NodePorts(**{f.name: pool.take() for f in dataclasses.fields(NodePorts)}),
            worker=NodePorts(**{f.name: pool.take() for f in dataclasses.fields(NodePorts)}),
        )
    finally:
        pool.release()


def _new_state(
    directory: Path,
    auth_mode: str,
    ports: _Ports,
    head_address: str,
    worker_address: str,
    num_cpus_head: int,
    num_cpus_worker: int,
) -> ClusterState:
    """Where everything of a cluster in `directory` goes: nothing started yet (no session ids)."""
    temp_root = ray_temp_root(directory)
    logs = directory / "logs"
    return ClusterState(
        dir=str(directory),
        created=time.time(),
        auth_mode=auth_mode,
        ray_address=f"{head_address}:{ports.gcs}",
        tracking_uri=f"http://{MLFLOW_HOST}:{ports.mlflow}",
        dashboard_url=f"http://{head_address}:{ports.dashboard}",
        python=sys.executable,
        head=HeadNode(
            address=head_address,
            gcs_port=ports.gcs,
            dashboard_port=ports.dashboard,
            client_port=ports.client,
            num_cpus=num_cpus_head,
            temp_dir=str(temp_root / "head"),
            log=str(logs / "ray-head.log"),
            ports=ports.head,
        ),
        worker=WorkerNode(
            address=worker_address,
            num_cpus=num_cpus_worker,
            resource=WORKER_RESOURCE,
            temp_dir=str(temp_root / "worker"),
            log=str(logs / "ray-worker.log"),
            ports=ports.worker,
        ),
        mlflow=MlflowServer(
            host=MLFLOW_HOST,
            port=ports.mlflow,
            backend_store_uri=f"sqlite:///{directory / 'mlflow.db'}",
            artifacts_destination=str(directory / "mlartifacts"),
            log=str(logs / "mlflow.log"),
        ),
    )


@contextlib.contextmanager
def _stopped_if_not_up(state: ClusterState):
    """A failed or interrupted `up` leaves nothing running and no state file behind."""
    try:
        yield
    except BaseException as err:
        stop_sessions(list(state.session_ids().values()), timeout=5)
        with contextlib.suppress(OSError):
            state_path(Path(state.dir)).unlink()
        if isinstance(err, (RuntimeError, OSError)):
            raise UsageError(f"local cluster did not come up: {err}") from None
        raise


def status(directory: Path, query_ray: bool = True) -> dict:
    directory = Path(directory).expanduser().resolve()
    state = load_state(directory)
    if state is None:
        raise UsageError(f"no local cluster in {directory} (start one with: melora-tune cluster up --dir {directory})")
    procs = alive_pids(state)
    report = {
        "dir": str(directory),
        "ray_address": state.ray_address,
        "tracking_uri": state.tracking_uri,
        "dashboard_url": state.dashboard_url,
        "auth_mode": state.auth_mode,
        "processes": {k: len(v) for k, v in procs.items()},
        "nodes": None,
        "ray_error": None,
        "mlflow_ok": mlflow_health(state.tracking_uri),
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
    result = stop_sessions(list(state.session_ids().values()), timeout=timeout)
    if result["left"]:
        raise UsageError(f"{result['left']} processes survived SIGKILL; state kept in {state_path(directory)}")
    for node in (state.head, state.worker):
        if not node.temp_dir:  # a hand-written state file may name no temp dir
            continue
        temp = Path(node.temp_dir)
        with contextlib.suppress(OSError):
            (temp / "ray_current_cluster").unlink()
        if not keep_logs:
            shutil.rmtree(temp, ignore_errors=True)
    if not keep_logs:
        root = ray_temp_root(directory)
        with contextlib.suppress(OSError):
            root.rmdir()
    state_path(directory).unlink()
    return result


def kill_node(directory: Path, role: str = "worker", sig: int = signal.SIGKILL) -> list[int]:
    """Kills one Ray node abruptly (failure drills): every process of its session gets `sig`."""
    state = load_state(Path(directory).expanduser().resolve())
    if state is None:
        raise UsageError(f"no local cluster in {directory}")
    pids = session_pids(state.components()[role].sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def add_cluster_parser(sub) -> None:
    from melora_tune import cluster as package  # its docstring's first paragraph is the help text

    p = sub.add_parser(
        "cluster",
        help="start, inspect or stop a local multi-node Ray cluster with an MLflow server",
        description=package.__doc__.split("\n\n")[0],
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
    h, w, m = state.head, state.worker, state.mlflow
    print(f"Ray head    {h.address}  {h.num_cpus} CPU  dashboard {state.dashboard_url}")
    print(f"Ray worker  {w.address}  {w.num_cpus} CPU  custom resource {w.resource}")
    print(f"MLflow      {state.tracking_uri}  ({m.backend_store_uri}, artifacts {m.artifacts_destination})")
    print(f"up in {state.up_seconds} s; state {state_path(Path(state.dir))}; logs {Path(state.dir) / 'logs'}")
    print()
    print(f"export RAY_AUTH_MODE={state.auth_mode}")
    print(f"--address {state.ray_address} --tracking-uri {state.tracking_uri}")
    print(
        "e.g. melora-tune search search_spaces/demo.yaml "
        f"--address {state.ray_address} --tracking-uri {state.tracking_uri}"
    )
    print(f"stop: melora-tune cluster down --dir {state.dir}")
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
