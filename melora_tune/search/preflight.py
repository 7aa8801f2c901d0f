"""What a search start checks before it creates anything: ``search --dry-run`` and the real start run the same
``check_start``, so a dry run that passes means the start gets past every check that needs no Ray.

Each check raises ``UsageError`` (one line: the problem and the fix) and leaves nothing behind: a folder that
would be written gets a probe file created and removed in it (or in its nearest existing parent, when it does
not exist yet), a tracking server gets one HTTP request, a Ray address one TCP connection.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from melora_tune.errors import UsageError

# MLflow 3.x tracking stores (mlflow.tracking._tracking_service.utils registers these; file stores are refused
# by normalize_tracking_uri, as MLflow 3.13+ refuses them; databricks-uc / uc are model registries only)
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# storage_path URIs Ray Tune opens with pyarrow.fs.FileSystem.from_uri (no custom filesystem is passed)
REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
HTTP_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0


def probe_writable(path: str | Path, what: str, fix: str) -> None:
    """``path`` (a folder, existing or to be created) can take files: create and remove a probe file there."""
    path = Path(path).expanduser()
    target = path
    while not target.exists() and not target.is_symlink() and target.parent != target:
        target = target.parent
    if not target.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {target} is not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".melora-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{what} {path} is not writable ({err.strerror or err}); {fix}") from None


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


def tracking_scheme(uri: str) -> str:
    """The store kind of a normalised tracking URI (sqlite, postgresql, http...); UsageError when MLflow has none."""
    scheme = "databricks" if uri == "databricks" else urllib.parse.urlparse(uri).scheme.lower()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if base not in TRACKING_SCHEMES:
        raise UsageError(f"tracking URI {uri!r}: MLflow has no tracking store for {scheme + '://' if scheme else 'it'}; "
                         "use sqlite:///mlflow.db (a local database) or http://host:5000 (a tracking server)")
    return base


def check_tracking(uri: str) -> str:
    """The MLflow tracking URI, normalised: a scheme MLflow 3 supports, a writable SQLite location, a tracking server
    that answers. Returns the URI the search will use."""
    from melora_tune.records.store import normalize_tracking_uri

    uri = normalize_tracking_uri(uri)  # refuses a bare word and MLflow's file store
    base = tracking_scheme(uri)
    if base == "sqlite":
        db = uri.removeprefix("sqlite:///")
        if Path(db).is_dir():
            raise UsageError(f"tracking URI {uri!r} names a folder: give the database file, e.g. sqlite:///{db}/mlflow.db")
        probe_writable(Path(db).parent, "MLflow database folder", "give a writable place, e.g. --tracking-uri sqlite:///mlflow.db")
    elif base in ("postgresql", "mysql", "mssql"):
        check_database_url(uri, "tracking URI")
    elif base in ("http", "https"):
        check_server(uri)
    return uri


def check_server(uri: str) -> None:
    """One GET of MLflow's /health: any HTTP answer (even 401/404) means a server is there."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=HTTP_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UsageError(f"the MLflow tracking server {uri} does not answer ({reason}): start it (mlflow server "
                         "--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000) or use a sqlite:/// URI") from None


def check_database_url(url: str, what: str):
    """A database URL SQLAlchemy can parse, of a dialect whose driver is installed; returns the parsed URL."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:  # (a subclass of ArgumentError)
        raise UsageError(f"{what} {url!r}: unknown database backend {url.split('://', 1)[0]!r}; use sqlite:///, "
                         "postgresql:// or mysql://") from None
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"{what} {url!r} is not a database URL: use e.g. sqlite:///optuna.db or "
                         "postgresql://user@host/db") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise UsageError(f"{what} {url!r} needs the database driver {err.name or err}, which is not installed: "
                         "pip install it, or use sqlite:///") from None
    return parsed


def check_optuna_storage(storage: str) -> None:
    """Optuna's storage: a database URL (RDBStorage) or a journal file path (JournalStorage), writable."""
    fix = "give a writable place (optuna_storage in the space, default <storage_path>/optuna.db)"
    if "://" not in storage:
        path = Path(storage).expanduser()
        if path.is_dir():
            raise UsageError(f"optuna_storage {storage!r} is a folder: give a journal file or a sqlite:/// URL")
        probe_writable(path.parent, "Optuna journal folder", fix)
        return
    parsed = check_database_url(storage, "optuna_storage")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database)
        if db.is_dir():
            raise UsageError(f"optuna_storage {storage!r} names a folder: give the database file, e.g. {db}/optuna.db")
        probe_writable(db.parent, "Optuna database folder", fix)


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


def check_task_data(space) -> None:
    """A local data file is read and checked now (columns, labels, empty text, splits), as ``train`` does before
    Ray starts; built-in and GLUE tasks are checked by name only (GLUE would download)."""
    from melora_tune.data import TaskSpec, load_task
    from melora_tune.data.registry import BUILTIN_TASKS, INSTRUCT_TASKS, check_glue_task, glue_name, unknown_task
    from melora_tune.data.tasks import is_local

    spec = TaskSpec(**space.task.model_dump())
    if is_local(spec) or spec.name.strip().lower() in INSTRUCT_TASKS:
        load_task(spec)  # also checks the instruction settings (metric, template) against the data
        return
    if spec.hub_dataset is not None:
        return  # loading it is what a worker does (it may download): checked there
    if spec.glue_task is not None:
        check_glue_task(spec.glue_task)
    if spec.name.strip().lower() not in BUILTIN_TASKS and glue_name(spec.name) is None:
        raise unknown_task(spec.name)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_run_name(name: str, flag: str = "--name") -> None:
    """A run or experiment name becomes a folder under the storage path: no separators, nothing like '..'."""
    if not RUN_NAME.fullmatch(name or "") or name.endswith("."):
        raise UsageError(f"{flag} {name!r}: use letters, digits, '_', '-' or '.' (it names a folder under the storage path, "
                         "so no '/' or '..')")


def check_start(space, *, storage: str, tracking: str, optuna_storage: str, address: str | None = None) -> str:
    """Every check of a search start that needs no Ray; returns the normalised tracking URI."""
    check_storage(storage)
    tracking = check_tracking(tracking)
    check_optuna_storage(optuna_storage)
    check_ray_address(address)
    check_task_data(space)
    return tracking
