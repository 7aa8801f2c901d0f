"""Where a search's records live: the MLflow tracking URI, normalised. Light on purpose (no Ray import), so
``report``, ``export`` and ``ui`` start quickly."""

from __future__ import annotations

from pathlib import Path


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
    from melora_tune.errors import UsageError

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
    import os

    cmd = [*mlflow, "server", "--backend-store-uri", backend_store_uri, "--host", host, "--port", str(port), "--workers", "1"]
    if serve_artifacts:
        cmd.append("--serve-artifacts")
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    return cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
