"""Starting or joining Ray, the environment its workers get, and the checks of what Ray will be given (a storage
folder, an address, a run name). ``search``, ``confirm`` and ``train`` all come through here, so a start behaves
and fails the same way everywhere.

Each check raises ``UsageError`` (one line: the problem and the fix) and leaves nothing behind: a folder that
would be written gets a probe file created and removed in it (or in its nearest existing parent, when it does
not exist yet), a Ray address one TCP connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import sys
import urllib.parse
from typing import Any

from melora_tune.errors import MachineError, UsageError, first_line
from melora_tune.records.store import probe_writable

# storage_path URIs Ray Tune opens with pyarrow.fs.FileSystem.from_uri (no custom filesystem is passed)
REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CONNECT_TIMEOUT_S = 5.0
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
START_TIMEOUT_ENV = "MELORA_RAY_START_TIMEOUT_S"
RAY_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # Ray 2.60's wait for a new GCS server (ray/_private/node.py)
RAY_GCS_WAIT_DEFAULT_S = 30
RAY_RAYLET_WAIT_S = 30  # Ray 2.60 waits this long for a new raylet to register, no setting
RAYLET_TIMEOUT = "timed out during startup"  # what Ray 2.60 then raises (ray/_private/node.py)

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


def start_timeout(value: float | None = None) -> float | None:
    """Seconds a local Ray may take to start: ``MELORA_RAY_START_TIMEOUT_S`` when set (a machine's setting, it wins),
    else ``value`` (a space's ``ray_start_timeout_s``), else None (Ray's own wait, 30 s)."""
    raw = os.environ.get(START_TIMEOUT_ENV, "").strip()
    if not raw:
        return value
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UsageError(f"{START_TIMEOUT_ENV}={raw!r}: give the seconds a local Ray may take to start, a number > 0 "
                         "(e.g. 120), or unset it")
    return seconds


def running_local_ray() -> str | None:
    """The address of a Ray started on this machine with ``ray start --head`` (Ray notes it in
    ``<tmp>/ray/ray_current_cluster``) when something answers there; None when there is none or the note is stale."""
    from ray._private import services  # heavy: Ray

    try:
        found = services.find_bootstrap_address(None)
        host, _, port = (found or "").rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return found
    except (OSError, ValueError):
        return None


def other_local_rays() -> list[str]:
    """GCS addresses of the Ray instances running on this machine (any owner: ``ray start``, another search)."""
    from ray._private import services  # heavy: Ray

    try:
        return sorted(services.find_gcs_addresses())
    except Exception:  # noqa: BLE001  (informational: a process table that cannot be read)
        return []


def start_failure(err: BaseException, timeout_s: float | None) -> str:
    """The one line for a local Ray that did not start: the cause (Ray's GCS or raylet too slow on a busy machine, other
    Ray instances on it, or Ray's own first line) and the fix (retry, a longer start timeout, one shared Ray)."""
    text = first_line(err)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    others = len(other_local_rays())
    busy = f"load average {load:.1f} on {os.cpu_count()} cores" + (
        f", {others} other Ray instance{'s' if others > 1 else ''} running here" if others else "")
    share = "start one shared Ray with ray start --head (searches then join it, or give --address HOST:PORT)"
    if "gcs_server_port" in text and "Timed out" in text:
        waited = f"the start timeout of {timeout_s:g} s" if timeout_s is not None else f"Ray's {RAY_GCS_WAIT_DEFAULT_S} s"
        return (f"could not start a local Ray: its GCS did not come up within {waited} ({busy}): retry when the machine "
                f"is quieter, raise ray_start_timeout_s in the space (or {START_TIMEOUT_ENV}), or {share}")
    if RAYLET_TIMEOUT in text:
        return (f"could not start a local Ray: its raylet did not register within Ray's fixed {RAY_RAYLET_WAIT_S} s "
                f"({busy}): retry when the machine is quieter, or {share}")
    return f"could not start a local Ray: {text} ({busy}): retry, or {share}"


def _children() -> list:
    import psutil  # heavy-ish, and a dependency of Ray rather than ours: only a local Ray start needs it

    return psutil.Process().children(recursive=True)


def _stop_new_children(before: set[int]) -> None:
    """End the processes a failed ``ray.init`` started (a GCS server, a raylet) and left running."""
    import psutil  # a dependency of Ray rather than ours: only a failed start needs it

    new = [p for p in _children() if p.pid not in before]
    for proc in new:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(new, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def say(line: str) -> None:
    print(f"melora-tune: {line}", file=sys.stderr, flush=True)


def start_ray(address: str | None = None, *, verbose: bool = True, num_cpus: int | None = None,
              timeout_s: float | None = None) -> bool:
    """Join the cluster at ``address``, or the Ray running on this machine that ``ray start --head`` started, or start
    a local one (``num_cpus`` of this machine's cores, all by default; ``address="local"`` forces it), unless this
    process already has one; True if this call started or joined it (so the caller shuts it down). Says which on
    stderr. Workers get ``worker_env()``; ``verbose`` forwards their logs to this process.

    A local start that fails (on a busy machine Ray's GCS or raylet comes up too slowly) stops what it started and
    raises ``MachineError`` (one line: the cause and the fix, exit 1). ``timeout_s`` (a space's
    ``ray_start_timeout_s``; ``MELORA_RAY_START_TIMEOUT_S`` wins) is Ray's wait for its GCS
    (``RAY_gcs_server_port_wait_time_s``, in whole seconds); Ray 2.60 then waits a fixed 30 s for the raylet."""
    import ray  # heavy (~1 s): only commands that run something need it

    if ray.is_initialized():
        return False
    timeout_s = start_timeout(timeout_s)
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": worker_env()},
    )
    given = address or os.environ.get("RAY_ADDRESS") or None
    running = None if given else running_local_ray()
    join = given if given and given != "local" else running
    if join:
        kwargs["address"] = join
        try:
            ray.init(**kwargs)
        except ConnectionError as err:
            raise UsageError(f"cannot join the Ray cluster at {join}: {first_line(err)}") from None
        except Exception as err:  # noqa: BLE001  (e.g. a token the running Ray refuses)
            if not running:
                raise
            raise MachineError(f"cannot join the Ray running on this machine at {running} (started with ray start): "
                               f"{first_line(err)}; give --address local to start a private one, or stop it "
                               "(ray stop)") from None
        where = ray.get_runtime_context().gcs_address if join == "auto" else join
        say(f"joined the running Ray at {where} (started with ray start; --address local starts a private one)"
            if running else f"joined the Ray cluster at {where}")
        return True

    kwargs["address"] = "local"  # not a stale ray_current_cluster note
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    others = other_local_rays()
    saved = os.environ.get(RAY_GCS_WAIT_ENV)
    if timeout_s is not None:
        os.environ[RAY_GCS_WAIT_ENV] = str(int(timeout_s))  # Ray reads whole seconds
    try:
        for attempt in (1, 2):
            before = {p.pid for p in _children()}
            try:
                ray.init(**kwargs)
                break
            except Exception as err:  # noqa: BLE001  (Ray raises Exception/RuntimeError for a start that timed out)
                with contextlib.suppress(Exception):
                    ray.shutdown()
                _stop_new_children(before)
                why = start_failure(err, timeout_s)
                # Ray's wait for its raylet is a fixed 30 s: on a machine busy starting other Rays (measured: load
                # average 112 on 2 cores, four Ray instances starting at once) it can run out while the next start
                # is quick. Once, and said; a second timeout is the user's to see.
                if attempt == 1 and RAYLET_TIMEOUT in first_line(err):
                    say(f"{why.split(': retry', 1)[0]}; retrying once")
                    continue
                raise MachineError(why) from None
    finally:
        if timeout_s is not None:
            if saved is None:
                os.environ.pop(RAY_GCS_WAIT_ENV, None)
            else:
                os.environ[RAY_GCS_WAIT_ENV] = saved
    cpus = int(ray.cluster_resources().get("CPU", 0))
    many = len(others) > 1
    note = f"; {len(others)} other Ray instance{'s' if many else ''} on this machine share{'' if many else 's'} its cores"
    note = note if others else ""
    say(f"started a local Ray ({cpus} CPUs) for this run; it stops when the run ends{note}")
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
