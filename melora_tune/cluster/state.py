"""The local cluster's state (addresses, ports, session ids, log paths), saved as DIR/cluster.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from melora_tune.errors import UsageError

STATE_FILE = "cluster.json"


def default_dir() -> Path:
    return Path(os.environ.get("MELORA_CLUSTER_DIR") or Path.home() / ".cache" / "melora-tune" / "cluster")


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


def save_state(state: dict) -> None:
    path = state_path(Path(state["dir"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
