"""The confirmed winners in MLflow's Model Registry, registered after every confirmation.

- one registered model per dataset: ``records.registered_model_name`` (``melora-rotten_tomatoes``);
- one version per search and cell (a method at a budget level), made from the winning
  confirmation run's artifact ``registered/``: ``adapter/`` (the native adapter, as the run logged it),
  ``peft/`` (the same adapter as a standard PEFT LoRA, built as ``melora-tune export`` builds it) and
  ``confirmed.json`` (the scores below);
- the alias ``<method>-b<budget>`` (``records.cell_alias``) on the newest search's version of the cell;
- version tags ``records.REGISTRY_TAGS``: the search (name and parent run id), cell, method, budget, the
  configuration and seed of the weights, the number of seeds and the confirmed validation/test means and
  standard deviations, the seed's own val_score/test_score.

The winner is chosen as the report and the export choose it (``records.winners``). Registering again (a later
``confirm`` adding seeds) updates the version's tags when the winner is the same run, and adds a version (the
alias moves to it) when another run now wins.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from melora_tune.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from melora_tune.adapters.peft_folder import write_peft
from melora_tune.records import (
    CONFIG_TAG, CONFIRMS_TAG, REGISTERED_ARTIFACT, SEED_TAG, TEST_SCORE, VAL_SCORE, VERSION_BUDGET_TAG,
    VERSION_CELL_TAG, VERSION_METHOD_TAG, VERSION_PARENT_TAG, VERSION_SEARCH_TAG, cell_alias, registered_model_name,
)
from melora_tune.records import read
from melora_tune.records.winners import confirmed_winners

log = logging.getLogger("melora_tune.search")


def _num(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return repr(value) if math.isfinite(value) else ""


def version_tags(search, winner: dict[str, Any], method: str, budget: int) -> dict[str, str]:
    run = winner["run"]
    tags = {
        VERSION_SEARCH_TAG: search.name, VERSION_PARENT_TAG: search.run_id, VERSION_CELL_TAG: cell_alias(method, budget),
        VERSION_METHOD_TAG: method, VERSION_BUDGET_TAG: str(int(budget)), CONFIG_TAG: str(winner["config"]),
        SEED_TAG: str(int(run["seed"])), CONFIRMS_TAG: str(run.get("confirms") or ""), "seeds": str(int(winner["seeds"])),
        "val_mean": _num(winner["val_mean"]), "val_std": _num(winner["val_std"]),
        "test_mean": _num(winner["test_mean"]), "test_std": _num(winner["test_std"]),
        VAL_SCORE: _num(run.get("val_score")), TEST_SCORE: _num(run.get("test_score")),
    }
    return {k: v for k, v in tags.items() if v != ""}


def _build_folder(mlf, run_id: str, cfg, dest: Path, scores: dict[str, str]) -> None:
    """dest/adapter (the run's native adapter), dest/peft (PEFT LoRA), dest/confirmed.json."""
    local = Path(mlf.download_artifacts(run_id, "adapter", str(dest)))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (local / name).is_file():
            raise RuntimeError(f"confirmation run {run_id} has no adapter/{name} artifact")
    write_peft(cfg, local, dest / "peft")
    (dest / "confirmed.json").write_text(json.dumps(scores, indent=1) + "\n")


def _existing(mlf, name: str) -> list:
    try:
        return list(mlf.search_model_versions(f"name = '{name}'"))
    except Exception:  # noqa: BLE001  (no such model yet)
        return []


def register_winners(mlf, search, dataset: str, budget: int, cfg, write=None) -> list[dict[str, Any]]:
    """Register each cell's confirmed winner of ``search`` (a ``read.SearchInfo``) under ``dataset``'s model;
    ``budget``: the level of a winner whose runs do not record one (records before cells); ``cfg``: the search's base
    trial config (its model and task type build the PEFT folder). Returns one
    ``{"name", "version", "alias", "run_id", "method", "budget"}`` per cell."""
    winners = confirmed_winners(read.confirmations_frame(mlf, search))
    if not winners:
        return []
    name = registered_model_name(dataset)
    try:
        mlf.get_registered_model(name)
    except Exception:  # noqa: BLE001  (not registered yet)
        mlf.create_registered_model(name, tags={"melora.dataset": dataset},
                                    description=f"Confirmed winners of melora-tune searches on {dataset}: one version "
                                                "per search and cell, alias <method>-b<budget>.")
    versions = _existing(mlf, name)
    out = []
    for winner in winners:
        method = winner["method"]
        level = winner["budget"] if winner.get("budget") is not None else budget
        alias = cell_alias(method, level)
        run_id = str(winner["run"]["run_id"])
        tags = version_tags(search, winner, method, level)
        mine = [v for v in versions if v.tags.get(VERSION_PARENT_TAG) == search.run_id
                and v.tags.get(VERSION_CELL_TAG) == alias and v.run_id == run_id]
        if mine:  # the same winner: its scores may have more seeds now
            version = mine[0].version
            for key, value in tags.items():
                mlf.set_model_version_tag(name, version, key, value)
        else:
            with tempfile.TemporaryDirectory(prefix="melora-register-") as tmp:
                folder = Path(tmp) / REGISTERED_ARTIFACT
                folder.mkdir()
                _build_folder(mlf, run_id, cfg, folder, tags)
                mlf.log_artifacts(run_id, str(folder), artifact_path=REGISTERED_ARTIFACT)
            source = f"{mlf.get_run(run_id).info.artifact_uri.rstrip('/')}/{REGISTERED_ARTIFACT}"
            version = mlf.create_model_version(name, source, run_id=run_id, tags=tags,
                                               description=f"{search.name}: confirmed winner of {method} at budget "
                                                           f"{level} ({winner['config']}, seed {tags[SEED_TAG]})").version
        mlf.set_registered_model_alias(name, alias, version)
        out.append({"name": name, "version": str(version), "alias": alias, "run_id": run_id, "method": method,
                    "budget": int(level)})
        (write or print)(f"registered {name} version {version} (alias {alias}): {winner['config']}, "
                         f"test {float(winner['test_mean']):.4f} over {int(winner['seeds'])} seed(s)")
    return out


def register_safely(mlf, search, dataset: str, budget: int, cfg, write=None) -> list[dict[str, Any]]:
    """``register_winners``; a failure is a warning (the confirmation's results stand without the registry)."""
    try:
        return register_winners(mlf, search, dataset, budget, cfg, write)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not register the confirmed winners in the MLflow Model Registry: %s", exc)
        (write or print)(f"warning: the confirmed winners were not registered in the Model Registry: {exc}")
        return []
