"""``melora-tune ui``: browse searches in MLflow UI (or Optuna's dashboard with ``--optuna``).

MLflow UI shows one experiment per dataset; a search is a parent run with one
child run per trial (expand it), named after the trial (``melora n=4 r=2
lr=1.2e-3``), with its parameters, metric curves (score, losses per step) and
its adapter as artifacts. The server binds 127.0.0.1 unless --host says
otherwise (anyone who can reach it can read and change the tracking store).

``--optuna`` starts optuna-dashboard on the searches' Optuna storage instead
(default: the storage recorded by the newest search, else
sqlite:///melora_runs/optuna.db). Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from melora_tune.errors import UsageError

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
    cmd = [_executable("mlflow"), "server", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port),
           "--workers", "1", "--serve-artifacts"]
    if tracking_uri.startswith("sqlite:///"):
        # where runs logged with MLflow's default artifact root would go; searches set their own (mlartifacts/ too)
        cmd += ["--artifacts-destination", str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return cmd, env


def default_optuna_storage(tracking_uri: str | None) -> str:
    """The Optuna storage of the newest search in the tracking store, else ./melora_runs/optuna.db."""
    try:
        from melora_tune.report import collect

        mlf = collect.client(collect.tracking_uri(tracking_uri))
        newest = None
        for dataset in collect.searched_datasets(mlf):
            info = collect.resolve_search(mlf, dataset)
            if newest is None or (info.start_time or 0) > (newest.start_time or 0):
                newest = info
        if newest is not None:
            location = collect.study_location(newest, collect.trials_frame(mlf, newest))
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
    elif "://" not in storage:
        path = Path(storage)
        if not path.is_file():
            raise UsageError(f"Optuna storage {storage!r}: give a URL (sqlite:///optuna.db) or an existing journal file")
    return [_executable("optuna-dashboard"), storage, "--host", host, "--port", str(port)], dict(os.environ)


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def serve(cmd: list[str], env: dict[str, str], what: str, url: str, host: str, links: list[str] = ()) -> int:
    """Run the server in its own process group; Ctrl-C (or SIGTERM) here stops it cleanly."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    print(f"{what} at {url}  (Ctrl-C to stop)", flush=True)
    for line in links:
        print(f"  {line}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"melora-tune ui: warning: listening on {host}: anyone who can reach this machine can read and change "
              "the store", file=sys.stderr, flush=True)

    def _stop(signum, frame):  # Ctrl-C, SIGTERM or a closed terminal: stop the server (it has its own process group)
        raise KeyboardInterrupt

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _stop) for sig in stop_signals}
    try:
        code = proc.wait()
        if code != 0:
            print(f"melora-tune ui: {Path(cmd[0]).name} exited with status {code}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        stop(proc)
        print(f"{what} stopped", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (its workers too): SIGTERM (uvicorn and gunicorn shut down cleanly on
    it; a SIGINT makes uvicorn print a traceback), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # workers the server left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
        storage = args.optuna or default_optuna_storage(args.tracking_uri)
        if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
            storage = "sqlite:///" + str(Path(storage.removeprefix("sqlite:///")).resolve())
        cmd, env = optuna_command(storage, args.host, args.port)
        return serve(cmd, env, f"Optuna dashboard ({storage})", url_for(args.host, args.port), args.host)
    from melora_tune.report.collect import tracking_uri

    uri = tracking_uri(args.tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise UsageError(f"{uri} is already a tracking server: open it in a browser (melora-tune ui serves a local sqlite:/// store)")
    cmd, env = mlflow_command(uri, args.host, args.port)
    url = url_for(args.host, args.port)
    return serve(cmd, env, f"MLflow UI ({uri})", url, args.host, experiment_links(uri, url))


def experiment_links(uri: str, url: str) -> list[str]:
    """'dataset: URL' of the runs table of every experiment holding a search (MLflow 3 opens on its GenAI view
    otherwise; each search is a parent run there: expand it for its trials)."""
    try:
        from melora_tune.report import collect

        mlf = collect.client(uri)
        out = []
        for name in collect.searched_datasets(mlf):
            exp = mlf.get_experiment_by_name(name)
            out.append(f"{name}: {url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        return out
    except Exception:  # noqa: BLE001  (links are a convenience; the server starts regardless)
        return []
