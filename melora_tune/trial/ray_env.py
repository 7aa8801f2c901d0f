"""Starting or joining Ray, the environment its workers get, and the checks of what Ray will be given (a storage
folder, an address, a run name). ``search``, ``confirm`` and ``train`` all come through here, so a start behaves
and fails the same way everywhere.

Each check raises ``UsageError`` (one line: the problem and the fix) and leaves nothing behind: a folder that
would be written gets a probe file created and removed in it (or in its nearest existing parent, when it does
not exist yet), a Ray address one TCP connection.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import urllib.parse
from typing import Any

from melora_tune.errors import UsageError, first_line
from melora_tune.records.store import probe_writable

# storage_path URIs Ray Tune opens with pyarrow.fs.FileSystem.from_uri (no custom filesystem is passed)
REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CONNECT_TIMEOUT_S = 5.0
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# Environment the workers must see (Ray workers on other nodes do not inherit the driver's).
PROPAGATED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "MELORA_DS_SHM_COMM",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
)


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Train V2 logs every print() of a worker, even output a library captures by swapping
    # sys.stdout (datasets' hashing through dill disassembles functions that way).
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def start_ray(address: str | None = None, *, verbose: bool = True, num_cpus: int | None = None) -> bool:
    """Start a local Ray (``num_cpus`` of this machine's cores, all by default) or join the cluster at
    ``address``, unless this process already has one; True if this call started or joined it (so the caller
    shuts it down). Workers get ``worker_env()``; ``verbose`` forwards their logs to this process."""
    import ray  # heavy (~1 s): only commands that run something need it

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": worker_env()},
    )
    if address:
        kwargs["address"] = address
    elif num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise UsageError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None
    return True


def check_storage(storage: str, fix: str = "give a folder you can write with --storage-path (or storage_path in the space)") -> None:
    """The experiment storage: a writable local folder, or a URI of a filesystem Ray Tune can open."""
    scheme = urllib.parse.urlparse(storage).scheme if "://" in storage else ""
    if scheme == "file":
        probe_writable(urllib.parse.urlparse(storage).path, "storage path", fix)
    elif scheme:
        if scheme.lower() not in REMOTE_STORAGE_SCHEMES:
            raise UsageError(f"storage path {storage!r}: Ray Tune cannot open {scheme}:// storage; use a local or shared "
                             f"folder, or one of {', '.join(s + '://' for s in REMOTE_STORAGE_SCHEMES)}")
    else:
        probe_writable(storage, "storage path", fix)


def check_ray_address(address: str | None, flag: str = "--address") -> None:
    """A Ray address to join answers a TCP connection (ray.init waits minutes on an address nothing listens on)."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, or ray://host:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {address}: nothing answers there ({err.strerror or err}); start the cluster "
                         f"(ray start --head) or leave out {flag} to run on a local one") from None


def check_run_name(name: str, flag: str = "--name") -> None:
    """A run or experiment name becomes a folder under the storage path: no separators, nothing like '..'."""
    if not RUN_NAME.fullmatch(name or "") or name.endswith("."):
        raise UsageError(f"{flag} {name!r}: use letters, digits, '_', '-' or '.' (it names a folder under the storage path, "
                         "so no '/' or '..')")
