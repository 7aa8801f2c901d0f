"""The local cluster's state (addresses, ports, session ids, log paths), saved as DIR/cluster.json.

Field names are the JSON keys and field order is the key order, so cluster.json reads the same to
whatever parsed it when the state was a plain dict, and a file written then loads now. Every field
but the ports has a default: `down` must still stop what a partial or hand-written file names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from melora_tune.errors import UsageError

STATE_FILE = "cluster.json"

# Keys the file gains only once the thing they describe exists (the dict grew them then).
_LATER = {"omit_if_none": True}


class _Record:
    """JSON by field name; `record[key]` reads a field, as callers of the dict state did."""

    @classmethod
    def from_json(cls, data: dict):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            record = _record_type(hints[f.name])
            value = data[f.name]
            values[f.name] = record.from_json(value) if record and value is not None else value
        return cls(**values)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = value.to_json() if isinstance(value, _Record) else value
        return out

    def __getitem__(self, key: str):
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def _record_type(hint) -> type[_Record] | None:
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, _Record)), None)


@dataclass
class NodePorts(_Record):
    """A Ray node's own server ports, chosen by `up` so that two nodes on one host never collide."""

    node_manager: int
    object_manager: int
    agent_listen: int
    agent_grpc: int
    runtime_env: int
    metrics: int


@dataclass
class HeadNode(_Record):
    address: str | None = None
    gcs_port: int | None = None
    dashboard_port: int | None = None
    client_port: int | None = None
    num_cpus: int | None = None
    temp_dir: str | None = None
    log: str | None = None
    ports: NodePorts | None = None
    sid: int | None = None  # session id = pid of the `ray start` that began it; None until started


@dataclass
class WorkerNode(_Record):
    address: str | None = None
    num_cpus: int | None = None
    resource: str | None = None
    temp_dir: str | None = None
    log: str | None = None
    ports: NodePorts | None = None
    sid: int | None = None


@dataclass
class MlflowServer(_Record):
    host: str | None = None
    port: int | None = None
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    log: str | None = None
    sid: int | None = None
    pid: int | None = field(default=None, metadata=_LATER)


@dataclass
class ClusterState(_Record):
    version: int = 1
    dir: str | None = None
    created: float | None = None
    auth_mode: str | None = None
    ray_address: str | None = None
    tracking_uri: str | None = None
    dashboard_url: str | None = None
    python: str | None = None
    head: HeadNode = field(default_factory=HeadNode)
    worker: WorkerNode = field(default_factory=WorkerNode)
    mlflow: MlflowServer = field(default_factory=MlflowServer)
    up_seconds: float | None = field(default=None, metadata=_LATER)

    def components(self) -> dict[str, HeadNode | WorkerNode | MlflowServer]:
        # In this order `status` lists them, as it did when the state was a dict.
        return {"worker": self.worker, "head": self.head, "mlflow": self.mlflow}

    def session_ids(self) -> dict[str, int]:
        """The session id of every component started so far."""
        return {name: c.sid for name, c in self.components().items() if c.sid}


def default_dir() -> Path:
    return Path(os.environ.get("MELORA_CLUSTER_DIR") or Path.home() / ".cache" / "melora-tune" / "cluster")


def state_path(directory: Path) -> Path:
    return Path(directory) / STATE_FILE


def load_state(directory: Path) -> ClusterState | None:
    path = state_path(directory)
    if not path.exists():
        return None
    try:
        return ClusterState.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise UsageError(f"cannot read {path}: {err}; remove it after checking no cluster runs") from None


def save_state(state: ClusterState) -> None:
    path = state_path(Path(state.dir))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
