"""Which trial (and which seed) an export takes, its adapter and its configuration, read from the search's
records: the confirmed winner when the search was confirmed, the search's best trial otherwise."""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from melora_tune.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from melora_tune.errors import UsageError
from melora_tune.records import VERSION_PARENT_TAG, cell_alias, read, registered_model_name
from melora_tune.records.read import space_artifact
from melora_tune.records.winners import best_seed, completed_seeds
from melora_tune.report.confirmed import confirmed_table
from melora_tune.report.export_paths import check_tree, safe_path
from melora_tune.search.schema import parse_space
from melora_tune.search.trainable import trial_config
from melora_tune.trial.config import TRIAL_KEY, TrialConfig, load_trial_config

ALIAS_RE = re.compile(r"[\w-]+")  # MLflow's alias characters


def download_adapter(mlf, row, dest: Path, artifact: str = "adapter") -> Path:
    """The trial's ``adapter`` artifact (or ``artifact``: a registered version's ``registered/adapter``) into
    dest/adapter (falls back to its local best checkpoint)."""
    target = safe_path(dest, "adapter")
    try:
        names = {a.path for a in mlf.list_artifacts(row["run_id"], artifact)}
    except Exception:  # noqa: BLE001
        names = set()
    if {f"{artifact}/{CONFIG_NAME}", f"{artifact}/{WEIGHTS_NAME}"} <= names:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            local = Path(mlf.download_artifacts(row["run_id"], artifact, tmp))
            check_tree(Path(tmp))
            shutil.copytree(local, target)
    else:
        ckpt = row.get("best_checkpoint")
        local = Path(str(ckpt)) / "adapter" if isinstance(ckpt, str) and "://" not in ckpt else None
        if local is None or not (local / CONFIG_NAME).is_file():
            raise UsageError(f"trial {row['run_name']!r} (MLflow run {row['run_id']}) has no adapter artifact and its "
                             "checkpoint is not on this machine: nothing to export")
        shutil.copytree(local, target, symlinks=False)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (target / name).is_file():
            raise UsageError(f"the adapter of run {row['run_id']} lacks {name}")
    return target


def confirmed_choice(confirmations, method: str | None, budget: int | None = None):
    """(the confirmation run to export, its configuration's row of the confirmed table), or None.

    The winner is chosen on validation only: among the cells' winners (of ``method``, at the level ``budget``, when
    given) the configuration with the highest mean validation score over its seeds (``report.confirmed``), then
    that configuration's seed with the best validation score."""
    if confirmations is None or confirmations.empty:
        return None
    table = confirmed_table(confirmations)
    winners = table[table["winner"]] if not table.empty else table
    if method is not None:
        winners = winners[winners["method"] == method]
    if budget is not None:
        winners = winners[winners["budget"] == int(budget)]
    if winners.empty:
        return None
    config = winners.sort_values("val_mean", ascending=False, kind="mergesort").iloc[0]
    run = best_seed(completed_seeds(confirmations), config["config"])
    run.update(trial_id=run.get("confirms_trial"), optuna_trial=None, score=run["val_score"], best_score=math.nan,
               status="completed")
    return run, config.to_dict()


def registry_choice(mlf, dataset: str, alias: str | None, version: str | None):
    """(search, the confirmation run's row, its configuration's confirmed row, the version) of a registered model
    version of ``dataset`` named by ``alias`` or ``version``; one-line UsageErrors for a bad or unknown one."""
    name = registered_model_name(dataset)
    if alias is not None and (not ALIAS_RE.fullmatch(alias) or alias.lower() == "latest"):
        raise UsageError(f"--alias {alias!r} is not a cell alias (<method>-b<budget>, e.g. {cell_alias('lora', 512)}: "
                         "letters, digits, '_' and '-')")
    if version is not None and (not str(version).isdigit() or int(version) < 1):
        raise UsageError(f"--model-version {version!r} is not a version number (1, 2, ...)")
    try:
        model = mlf.get_registered_model(name)
    except Exception:  # noqa: BLE001
        raise UsageError(f"no registered model {name!r} for dataset {dataset!r}: a confirmation registers its winners "
                         "(melora-tune confirm SPACE.yaml)") from None
    aliases = ", ".join(sorted(model.aliases)) or "none"
    try:
        found = (mlf.get_model_version_by_alias(name, alias) if alias is not None
                 else mlf.get_model_version(name, str(int(version))))
    except Exception:  # noqa: BLE001
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise UsageError(f"registered model {name!r} has no {what} (its aliases: {aliases})") from None
    parent = found.tags.get(VERSION_PARENT_TAG)
    info = read.resolve_search(mlf, dataset, parent)
    confirmations = read.confirmations_frame(mlf, info)
    seeds = completed_seeds(confirmations)
    mine = seeds[seeds["run_id"] == found.run_id]
    if mine.empty:
        raise UsageError(f"{name} version {found.version}: its run {found.run_id} is not a completed confirmation of "
                         f"search {info.name}")
    run = mine.iloc[0].to_dict()
    table = confirmed_table(confirmations)
    config = table[table["config"] == run["config"]].iloc[0].to_dict()
    run.update(trial_id=run.get("confirms_trial"), optuna_trial=None, score=run["val_score"], best_score=math.nan,
               status="completed")
    return info, run, config, found


def trial_dict(mlf, search, row, adapter_cfg, seed: int | None = None) -> dict[str, Any]:
    """The TrialConfig dict of the trial: the search's base config (from its space file) + the trial's values."""
    exact = read.exact_params(row)
    found = space_artifact(mlf, search.run_id)
    if found is not None:
        filename, text = found
        space = parse_space(yaml.safe_load(text), source=f"space artifact {filename} of run {search.run_id}")
        base = space.base_trial_dict(list(adapter_cfg.target_modules), list(adapter_cfg.modules_to_save))
    elif isinstance(exact.get(TRIAL_KEY), dict):
        base = exact[TRIAL_KEY]
    else:
        raise UsageError(f"search run {search.run_id} has no space/ artifact and the trial's params.json is not on this "
                         "machine: cannot rebuild the trial's config")
    lr = exact.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or not math.isclose(lr, float(row["lr"]), rel_tol=1e-4):
        lr = float(row["lr"])
    hp = {k: v for k, v in adapter_cfg.model_dump().items() if k not in ("target_modules", "modules_to_save")}
    data = trial_config({TRIAL_KEY: base, **hp, "lr": float(lr)}).to_dict()
    if seed is not None:  # a confirmation: its own seed
        data["training"]["seed"] = int(seed)
    return data


def write_trial_yaml(path: Path, data: dict[str, Any], header: list[str]):
    cfg = TrialConfig.from_dict(data, source="exported trial")
    path.write_text("".join(f"# {line}\n" for line in header) + cfg.to_yaml())
    loaded = load_trial_config(path)
    if loaded.to_dict() != cfg.to_dict():
        raise RuntimeError(f"{path} does not load back as the trial's config")
    return loaded


def selection(confirmed: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    """What the export took and how sure we are of it, in words (README, header, CLI) and as data (export.json)."""
    if confirmed is None:
        line = (f"UNCONFIRMED: the search's best trial, validation score {row['score']:.4f} from one seed "
                f"({row['status'].replace('_', ' ')}); no confirmation ran (melora-tune confirm SPACE.yaml)")
        return {"kind": "unconfirmed", "line": line, "text": line + ".",
                "weights": f"the trial's best checkpoint (score {row['score']:.4f})"}
    ci = (f"95% CI {confirmed['test_lo']:.4f} to {confirmed['test_hi']:.4f}" if math.isfinite(confirmed["test_lo"])
          else "one seed: no interval")
    line = (f"CONFIRMED winner {confirmed['configuration']}: test {confirmed['test_mean']:.4f} "
            f"± {confirmed['test_std']:.4f} over {int(confirmed['seeds'])} seeds ({ci}), validation "
            f"{confirmed['val_mean']:.4f}; these weights are seed {int(row['seed'])}, its best on validation")
    data = {k: plain(confirmed[k]) for k in ("configuration", "seeds", "val_mean", "val_std", "test_mean", "test_std",
                                              "test_lo", "test_hi")}
    data.update(seed=int(row["seed"]), confirms=row.get("confirms"))
    return {"kind": "confirmed", "line": line, "text": line + ".", "confirmed": data,
            "weights": f"the final model of confirmation seed {int(row['seed'])} (validation {row['score']:.4f}, "
                       f"test {row['test_score']:.4f})"}


def plain(value: Any) -> Any:
    """numpy / pandas scalars -> JSON-able Python values (NA -> None)."""
    try:
        import pandas as pd  # heavy: pandas, loaded where tables are built

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value
