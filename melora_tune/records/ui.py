"""``melora-tune ui``: browse searches in MLflow UI (or Optuna's dashboard with ``--optuna``).

MLflow UI shows one experiment per dataset; a search is a parent run with one
child run per trial (expand it), named after the trial (``melora n=4 r=2
lr=1.2e-3``), with its parameters, metric curves (score, losses per step) and
its adapter as artifacts. The server binds 127.0.0.1 unless --host says
otherwise (anyone who can reach it can read and change the tracking store).

``--optuna`` starts optuna-dashboard on the searches' Optuna storage instead
(default: the storage recorded by the newest search, else
sqlite:///melora_runs/optuna.db). Ctrl-C, SIGTERM or SIGHUP stops the server and
every process it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from melora_tune.errors import UsageError
from melora_tune.records import read
from melora_tune.records.store import absolute_sqlite, check_database_url, mlflow_server_command

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STOP_TIMEOUT_S = 10.0


def _executable(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name} is not installed in this environment: pip install {name}")
    return found


def mlflow_command(tracking_uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment for a tracking store."""
    # where runs logged with MLflow's default artifact root would go; searches set their own (mlartifacts/ too)
    artifacts = (str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
                 if tracking_uri.startswith("sqlite:///") else None)
    return mlflow_server_command([_executable("mlflow")], tracking_uri, host, port, artifacts, serve_artifacts=True)


def default_optuna_storage(tracking_uri: str | None) -> str:
    """The Optuna storage of the newest search in the tracking store, else ./melora_runs/optuna.db."""
    try:
        mlf = read.client(read.tracking_uri(tracking_uri))
        newest = None
        for dataset in read.searched_datasets(mlf):
            info = read.resolve_search(mlf, dataset)
            if newest is None or (info.start_time or 0) > (newest.start_time or 0):
                newest = info
        if newest is not None:
            location = read.study_location(newest, read.trials_frame(mlf, newest))
            if location:
                return location["optuna_storage"]
    except UsageError:
        pass
    db = Path("melora_runs") / "optuna.db"
    if db.is_file():
        return "sqlite:///" + str(db.resolve())
    raise UsageError("no Optuna storage found (no search recorded one, and there is no ./melora_runs/optuna.db): "
                     "give it, e.g. --optuna sqlite:///melora_runs/optuna.db")


def optuna_command(storage: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    if storage.startswith("sqlite:///"):
        db = Path(storage.removeprefix("sqlite:///"))
        if not db.is_file():
            raise UsageError(f"no Optuna database at {db}")
    elif "://" in storage:
        check_database_url(storage, "Optuna storage")  # optuna-dashboard would die on it with a traceback
    else:
        path = Path(storage)
        if not path.is_file():
            raise UsageError(f"Optuna storage {storage!r}: give a URL (sqlite:///optuna.db) or an existing journal file")
    return [_executable("optuna-dashboard"), storage, "--host", host, "--port", str(port)], dict(os.environ)


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(cmd: list[str], env: dict[str, str], what: str, url: str, host: str, links: list[str] = ()) -> int:
    """Run the server in its own process group until it exits or this process gets Ctrl-C, SIGTERM or SIGHUP;
    then stop the whole group (the server and every process it started) before returning.

    The handlers are in place before the server starts, and a signal that arrives while it is being started
    is acted on once it has: no window leaves a server behind. A second signal during the shutdown does not
    cut it short."""
    state: dict = {"proc": None, "signal": None, "stopping": False}

    def _on_signal(signum, frame):
        state["signal"] = state["signal"] or signum
        if state["proc"] is not None and not state["stopping"]:
            raise _Stop(signum)

    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        state["proc"] = proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        if state["signal"] is not None:  # arrived while the server was being started
            raise _Stop(state["signal"])
        _say(f"{what} at {url}  (Ctrl-C to stop)")
        for line in links:
            _say(f"  {line}")
        if host not in ("127.0.0.1", "localhost", "::1"):
            _say(f"melora-tune ui: warning: listening on {host}: anyone who can reach this machine can read and change "
                 "the store", sys.stderr)
        code = proc.wait()
        if code != 0:
            _say(f"melora-tune ui: {Path(cmd[0]).name} exited with status {code}", sys.stderr)
        return code
    except KeyboardInterrupt:  # Ctrl-C, or _Stop
        state["stopping"] = True
        stop(state["proc"])
        _say(f"{what} stopped")
        return 0
    finally:
        state["stopping"] = True
        if state["proc"] is not None:
            stop(state["proc"])  # nothing left when the server exited by itself (its group may not have)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stop(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) reached ``serve`` (a KeyboardInterrupt, so one that lands during
    the shutdown still ends as "interrupted", never as a traceback)."""


def _say(line: str, stream=None) -> None:
    """Print, ignoring a closed terminal (SIGHUP): the shutdown must go on."""
    try:
        print(line, file=stream or sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc; elsewhere [pgid] while the group exists."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (its workers too): SIGTERM (uvicorn and gunicorn shut down cleanly on
    it; a SIGINT makes uvicorn print a traceback), wait until every member is gone, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None and not group_members(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        except PermissionError:  # the group is gone and its id reused by someone else's
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                proc.wait(0.1)
            except subprocess.TimeoutExpired:
                continue
            if not group_members(pgid):
                break
            time.sleep(0.1)
    proc.poll()


def add_ui_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ui",
        help="browse searches in MLflow UI (or optuna-dashboard with --optuna)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking store (default: sqlite:///mlflow.db here)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--optuna", nargs="?", const="", default=None, metavar="STORAGE",
                   help="start optuna-dashboard instead, on STORAGE (default: the newest search's Optuna storage)")
    p.set_defaults(func=ui_command)
    return p


def ui_command(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1..65535, got {args.port}")
    if args.optuna is not None:
        storage = absolute_sqlite(args.optuna or default_optuna_storage(args.tracking_uri))
        cmd, env = optuna_command(storage, args.host, args.port)
        return serve(cmd, env, f"Optuna dashboard ({storage})", url_for(args.host, args.port), args.host)
    uri = read.tracking_uri(args.tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise UsageError(f"{uri} is already a tracking server: open it in a browser (melora-tune ui serves a local sqlite:/// store)")
    cmd, env = mlflow_command(uri, args.host, args.port)
    url = url_for(args.host, args.port)
    return serve(cmd, env, f"MLflow UI ({uri})", url, args.host, experiment_links(uri, url))


def experiment_links(uri: str, url: str) -> list[str]:
    """'dataset: URL' of the runs table of every experiment holding a search (MLflow 3 opens on its GenAI view
    otherwise; each search is a parent run there: expand it for its trials)."""
    try:
        mlf = read.client(uri)
        out = []
        for name in read.searched_datasets(mlf):
            exp = mlf.get_experiment_by_name(name)
            out.append(f"{name}: {url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        return out
    except Exception:  # noqa: BLE001  (links are a convenience; the server starts regardless)
        return []
