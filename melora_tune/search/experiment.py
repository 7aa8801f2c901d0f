"""A search's place on disk, resolved and checked before anything is created: the experiment folder, its record
``melora_search.json`` (study name, Optuna storage, MLflow ids: what ``--resume`` and ``confirm`` reuse) and the
space it was started with.

Layout of one search under the storage path::

    <storage_path>/optuna.db                   the Optuna studies (one per search, named after it)
    <storage_path>/<name>/                      the Ray Tune experiment (state, trials, checkpoints)
    <storage_path>/<name>/melora_search.json    study name, Optuna storage, MLflow ids: what --resume reuses

``name`` is ``<space name>-<timestamp>`` unless given; ``resume=True`` without a
name continues the newest search of the same space under the storage path.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from melora_tune.errors import UsageError
from melora_tune.records import META_NAME
from melora_tune.records.store import absolute_sqlite
from melora_tune.search.preflight import check_start
from melora_tune.search.cells import cell_label, split_shares
from melora_tune.search.samplers import get_sampler
from melora_tune.search.schema import DEFAULT_STORAGE_PATH, DEFAULT_TRACKING_URI, SearchSpace, load_space, parse_space
from melora_tune.search.memcheck import search_memory
from melora_tune.search.schedulers import DEFAULT as DEFAULT_SCHEDULER
from melora_tune.search.space import FeasibleSpace, build_space
from melora_tune.search.warm_start import source_studies, warm_points, warm_priors
from melora_tune.trial.ray_env import check_run_name

# Keys of a space that may differ between a search and its --resume.
RESUME_MAY_CHANGE = {"storage_path", "optuna_storage", "tracking_uri", "ray_start_timeout_s"}



def resolve_space(space: SearchSpace | dict | str | os.PathLike) -> tuple[SearchSpace, str, str]:
    """(validated space, its YAML text, a file name for the artifact)."""
    if isinstance(space, SearchSpace):
        return space, yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False), f"{space.name}.yaml"
    if isinstance(space, dict):
        parsed = parse_space(space)
        return parsed, yaml.safe_dump(space, sort_keys=False), f"{parsed.name}.yaml"
    parsed, text = load_space(space)
    return parsed, text, Path(space).name


def with_num_samples(space: SearchSpace, num_samples: int | None) -> SearchSpace:
    """The space with ``--num-samples`` applied (None keeps the space's own)."""
    if num_samples is None:
        return space
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}")
    return space.model_copy(update={"num_samples": num_samples})


def with_shares(space: SearchSpace, feasible: FeasibleSpace) -> tuple[SearchSpace, dict[str, int]]:
    """Every cell's share of the trials (equal), and the space with num_samples = their sum.

    ``trials_per_cell`` gives the share; otherwise ``num_samples`` is split evenly (refused when it does not
    divide). A grid (an enumerating sampler) runs each cell's whole grid unless a share is given; a share
    larger than a cell's grid is refused (a grid point runs once).
    """
    labels = {cell_label(m, level): cell for (m, level), cell in feasible.cells.items()}
    given = "num_samples" in space.model_fields_set
    tpc = space.trials_per_cell
    if tpc is not None and given and space.num_samples != tpc * len(labels):
        raise UsageError(f"num_samples={space.num_samples} and trials_per_cell={tpc} disagree: {len(labels)} cells x "
                         f"{tpc} = {tpc * len(labels)} trials; give one of them")
    if get_sampler(space.sampler).enumerates and tpc is None and (not given or space.num_samples == feasible.grid_size()):
        shares = {label: cell.grid_size() for label, cell in labels.items()}
    else:
        try:
            shares = split_shares(space.num_samples, list(labels), tpc)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if get_sampler(space.sampler).enumerates:
            for label, cell in labels.items():
                if shares[label] > cell.grid_size():
                    raise UsageError(
                        f"cell {label} gets {shares[label]} trials but its grid has {cell.grid_size()} points (sampler "
                        f"{space.sampler} runs each once): lower trials_per_cell/num_samples, or leave both out to run "
                        "every cell's whole grid")
    return space.model_copy(update={"num_samples": sum(shares.values())}), shares


def is_remote(path: str) -> bool:
    return "://" in path


def comparable(space: SearchSpace) -> dict[str, Any]:
    data = space.model_dump(mode="json")
    for key in RESUME_MAY_CHANGE:
        data.pop(key, None)
    if data.get("scheduler") == DEFAULT_SCHEDULER:
        data.pop("scheduler")  # the key came later: a search recorded before it compares equal on --resume
    return data


def find_latest(storage: Path, space_name: str) -> Path | None:
    found = [p.parent for p in storage.glob(f"{space_name}-*/{META_NAME}")]
    found += [p.parent for p in storage.glob(f"{space_name}/{META_NAME}")]
    return max(found, key=lambda p: (p / META_NAME).stat().st_mtime) if found else None


def has_snapshot(exp_dir: Path) -> bool:
    return any(exp_dir.glob("experiment_state*.json"))


def plan_paths(space: SearchSpace, *, storage_path: str | None, name: str | None, resume: bool) -> tuple[str, str, Path | None]:
    """(storage path, experiment name, experiment dir when local)."""
    storage = storage_path or space.storage_path or DEFAULT_STORAGE_PATH
    if name is not None:
        check_run_name(name)
    if is_remote(storage):
        if resume and not name:
            raise UsageError("--resume on remote storage needs --name (the search's experiment name)")
        name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return storage, name, None
    root = Path(storage).expanduser().resolve()
    if resume:
        if name:
            exp_dir = root / name
            if not exp_dir.is_dir():
                raise UsageError(f"nothing to resume: {exp_dir} does not exist")
        else:
            found = find_latest(root, space.name)
            if found is None:
                raise UsageError(f"nothing to resume: no search of {space.name!r} under {root} (start one without --resume)")
            exp_dir = found
        # no experiment_state file (interrupted before Ray's first snapshot): run_search starts Tune afresh under
        # the same name, reusing the search's MLflow parent run and Optuna study (melora_search.json)
        return str(root), exp_dir.name, exp_dir
    name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir = root / name
    if exp_dir.is_dir() and has_snapshot(exp_dir):
        raise UsageError(f"search {exp_dir} already exists: continue it with --resume, or give another --name")
    return str(root), name, exp_dir


def read_meta(exp_dir: Path | None) -> dict[str, Any]:
    if exp_dir is None or not (exp_dir / META_NAME).is_file():
        return {}
    try:
        meta = json.loads((exp_dir / META_NAME).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {exp_dir / META_NAME} ({err}): restore it, or start a new search with another --name") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{exp_dir / META_NAME} is not a search record: restore it, or start a new search with another --name")
    return meta


def write_meta(exp_dir: Path | None, meta: dict[str, Any]) -> None:
    if exp_dir is None:
        return
    created = not exp_dir.exists()
    tmp = exp_dir / (META_NAME + ".tmp")
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        tmp.replace(exp_dir / META_NAME)
    except OSError as err:
        if exp_dir.is_dir():
            tmp.unlink(missing_ok=True)
            if created and not any(exp_dir.iterdir()):
                exp_dir.rmdir()
        raise UsageError(f"cannot write the search record {exp_dir / META_NAME} ({err.strerror or err}): "
                         "give a writable --storage-path") from None


def default_optuna_storage(storage: str) -> str:
    if is_remote(storage):
        return "sqlite:///" + str(Path("optuna.db").resolve())
    return "sqlite:///" + str(Path(storage) / "optuna.db")


@dataclass
class StartPlan:
    """Where a search goes, resolved and checked before anything is created."""

    storage: str
    exp_name: str
    exp_dir: Path | None
    meta: dict[str, Any]
    tracking: str
    optuna_storage: str
    study_name: str


def plan_start(space: SearchSpace, *, storage_path: str | None, name: str | None, resume: bool,
               tracking_uri: str | None, address: str | None = None) -> StartPlan:
    """Resolve where the search goes and run every start check that needs no Ray (``preflight.check_start``):
    ``--dry-run`` and the real start both call this, before any MLflow run, experiment folder or Ray."""
    storage, exp_name, exp_dir = plan_paths(space, storage_path=storage_path, name=name, resume=resume)
    meta = read_meta(exp_dir)
    if resume and meta.get("space") is not None and meta["space"] != comparable(space):
        changed = sorted(k for k in set(meta["space"]) | set(comparable(space)) if meta["space"].get(k) != comparable(space).get(k))
        raise UsageError(
            f"cannot resume {exp_name}: the space changed since it started ({', '.join(changed)}); "
            "a resumed search must keep its space (start a new search instead)"
        )
    tracking = tracking_uri or space.tracking_uri or meta.get("tracking_uri") or DEFAULT_TRACKING_URI
    optuna_storage = space.optuna_storage or meta.get("optuna_storage") or default_optuna_storage(storage)
    optuna_storage = absolute_sqlite(optuna_storage)
    tracking = check_start(space, storage=storage, tracking=tracking, optuna_storage=optuna_storage, address=address)
    return StartPlan(storage, exp_name, exp_dir, meta, tracking, optuna_storage, meta.get("study_name") or exp_name)


@dataclass
class PreparedSearch:
    """A space resolved, its feasible configurations enumerated, its base trial built and its start planned."""

    space: SearchSpace
    text: str  # the space's YAML, logged as an artifact
    filename: str
    feasible: FeasibleSpace
    base_trial: dict[str, Any]
    plan: StartPlan
    shares: dict[str, int]  # cell label (method@level) -> its trials
    warm: dict[str, list[dict]] = field(default_factory=dict)  # cell label -> warm-start points (search.warm_start)
    priors: dict[str, dict] = field(default_factory=dict)  # cell label -> the earlier learning-rate curve (warm_priors)


def prepare_search(space: SearchSpace | dict | str | os.PathLike, *, spec=None, num_samples: int | None = None,
                   storage_path: str | None = None, tracking_uri: str | None = None, name: str | None = None,
                   resume: bool = False, address: str | None = None) -> PreparedSearch:
    """Everything a search start does before Ray: validate the space, enumerate its feasible configurations,
    check each method's largest trial fits its GPU, then ``plan_start`` (storage, tracking URI, Optuna storage,
    Ray address, local data). Nothing is started or written. ``spec`` (a ``ModelSpec``) skips loading the
    model config (tests)."""
    space, text, filename = resolve_space(space)
    space = with_num_samples(space, num_samples)
    feasible = build_space(space, spec=spec)
    space, shares = with_shares(space, feasible)
    base_cfg = space.base_trial(feasible.target_modules, feasible.modules_to_save)
    feasible.memory = search_memory(space, feasible, base_cfg)  # a trial that cannot fit its GPU is refused here
    base_trial = base_cfg.to_dict()  # Tune's param_space: plain JSON
    plan = plan_start(space, storage_path=storage_path, name=name, resume=resume, tracking_uri=tracking_uri, address=address)
    warm, priors = {}, {}
    if space.warm_start:
        if is_remote(plan.storage):
            raise UsageError("warm_start reads earlier searches from a local storage path; this one is remote")
        sources = [source_studies(plan.storage, name) for name in space.warm_start]
        warm = warm_points(sources, feasible, shares)
        priors = warm_priors(feasible, warm)
    return PreparedSearch(space, text, filename, feasible, base_trial, plan, shares, warm, priors)


def dry_run(space: SearchSpace | dict | str | os.PathLike, **kwargs) -> PreparedSearch:
    """``search --dry-run``: the checks of a real start (``prepare_search``), nothing started or written;
    ``feasible.memory`` holds the memory estimates, ``shares`` each cell's trials."""
    return prepare_search(space, **kwargs)
