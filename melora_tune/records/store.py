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


def normalize_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` (or a bare ``*.db`` path) -> an absolute SQLite URI, so a --resume from
    another directory finds the same file; servers (http, https, databricks...) pass through."""
    from melora_tune.errors import UsageError

    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return uri if path.startswith("/") else "sqlite:///" + str(Path(path).resolve())
    if "://" in uri or uri.startswith("databricks"):
        if uri.startswith("file:"):
            raise UsageError(f"tracking URI {uri!r} is MLflow's file store, which MLflow 3 refuses: use sqlite:///mlflow.db or http://host:5000")
        return uri
    if uri.endswith((".db", ".sqlite")):
        return "sqlite:///" + str(Path(uri).resolve())
    raise UsageError(f"tracking URI {uri!r}: use sqlite:///mlflow.db (a local database) or http://host:5000 (a tracking server)")
