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

Modules: `state` (the typed state, DIR/cluster.json), `processes` (sessions: finding, stopping,
starting detached), `network` (loopback addresses, free ports), `nodes` (the Ray head and worker
nodes), `mlflow_server` (the tracking server), `commands` (`up`, `status`, `down`, `kill_node` and
the CLI subcommands).
"""

from melora_tune.cluster.commands import add_cluster_parser, down, kill_node, status, up
from melora_tune.cluster.mlflow_server import MLFLOW_HOST, mlflow_health
from melora_tune.cluster.nodes import HEAD_RESOURCE, MAX_RAY_TEMP_DIR, WORKER_RESOURCE, ray_env, ray_nodes
from melora_tune.cluster.processes import alive_pids, session_pids, stop_sessions
from melora_tune.cluster.state import (
    STATE_FILE,
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

# The old module's private helpers under their old names: the tests reach for them.
from melora_tune.cluster.nodes import ray_temp_root as _ray_temp_root
from melora_tune.cluster.processes import session_of as _session_of

_component_sids = ClusterState.session_ids

__all__ = [
    "ClusterState",
    "HEAD_RESOURCE",
    "HeadNode",
    "MAX_RAY_TEMP_DIR",
    "MLFLOW_HOST",
    "MlflowServer",
    "NodePorts",
    "STATE_FILE",
    "WORKER_RESOURCE",
    "WorkerNode",
    "add_cluster_parser",
    "alive_pids",
    "default_dir",
    "down",
    "kill_node",
    "load_state",
    "mlflow_health",
    "ray_env",
    "ray_nodes",
    "save_state",
    "session_pids",
    "state_path",
    "status",
    "stop_sessions",
    "up",
]
