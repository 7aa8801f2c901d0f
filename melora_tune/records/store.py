"""Where a search's records live: the MLflow tracking URI, normalised and checked, and the Optuna storage.
Light on purpose (no Ray import), so ``report``, ``export`` and ``ui`` start quickly.

Each check raises ``UsageError`` (one line: the problem and the fix) and leaves nothing behind: a folder that
would be written gets a probe file created and removed in it, a tracking server gets one HTTP request.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from melora_tune.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (see sqlite_open_lock)
    fcntl = None

# MLflow 3.x tracking stores (mlflow.tracking._tracking_service.utils registers these; file stores are refused
# by normalize_tracking_uri, as MLflow 3.13+ refuses them; databricks-uc / uc are model registries only)
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
HTTP_TIMEOUT_S = 5.0


@contextlib.contextmanager
def sqlite_open_lock(uri: str):
    """Hold an exclusive lock on a local SQLite database file while a store opens it. MLflow and Optuna create and
    migrate their schema on first open, and two searches opening one new database together collide there (MLflow:
    "table _alembic_tmp_tags already exists"). An advisory ``flock``, apart from SQLite's own locks; other URIs, or a
    database whose folder does not exist yet, go unlocked."""
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser() if uri.startswith("sqlite:///") else None
    if fcntl is None or path is None or not path.parent.is_dir():
        yield
        return
    with open(path, "ab") as handle:  # a new database starts as the empty file SQLite reads as empty
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database (``mlartifacts/``); a server decides its own."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` (the same file from any working directory); others as given."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def normalize_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` (or a bare ``*.db`` path) -> an absolute SQLite URI, so a --resume from
    another directory finds the same file; servers (http, https, databricks...) pass through."""
    if uri.startswith("sqlite:///"):
        return absolute_sqlite(uri)
    if "://" in uri or uri.startswith("databricks"):
        if uri.startswith("file:"):
            raise UsageError(f"tracking URI {uri!r} is MLflow's file store, which MLflow 3 refuses: use sqlite:///mlflow.db or http://host:5000")
        return uri
    if uri.endswith((".db", ".sqlite")):
        return "sqlite:///" + str(Path(uri).resolve())
    raise UsageError(f"tracking URI {uri!r}: use sqlite:///mlflow.db (a local database) or http://host:5000 (a tracking server)")


def mlflow_server_command(mlflow: list[str], backend_store_uri: str, host: str, port: int,
                          artifacts_destination: str | None = None, serve_artifacts: bool = False) -> tuple[list[str], dict[str, str]]:
    """``mlflow server`` for one store (``mlflow``: how to run the CLI) and its environment: one worker and no
    job-execution backend, the lightest server that serves the UI and REST API (~0.5 GB instead of ~2 GB)."""
    cmd = [*mlflow, "server", "--backend-store-uri", backend_store_uri, "--host", host, "--port", str(port), "--workers", "1"]
    if serve_artifacts:
        cmd.append("--serve-artifacts")
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    return cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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
    import sqlalchemy  # heavy: SQLAlchemy, loaded where a database URL is checked
    from sqlalchemy.engine import make_url  # heavy: SQLAlchemy, loaded where a database URL is checked

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
