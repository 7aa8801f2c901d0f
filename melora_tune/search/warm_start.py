"""Warm start: a new search's cells begin with what an earlier search (on another dataset, say) found best.

``warm_start: [NAME, ...]`` in a space names earlier searches: an experiment folder under the storage path
(``trec-20261206-101500``), or a space name (its newest search there). For every cell (method, level) of the
new search, the earlier search's study of the **same method** is read (the same level when it has one, else
the nearest level by parameter count; never another method's results, so equal effort is kept) and its best
completed configurations, at most ``max(1, share // 3)`` distinct ones, are enqueued as the cell's first
trials (Optuna's ``enqueue_trial``, after the space's own ``points_to_evaluate``), each marked
``melora.warm_start_from``. What the new cell cannot run is left out of the enqueued parameters and drawn by
its sampler (another level's rank; the learning rate, which transfers best, is kept); a configuration whose
learning rate is outside the cell's range is skipped. The sampler then models the cell's own results, the warm ones included:
they are trained here, on this search's data, not copied from the earlier search.

The earlier search's **learning-rate curve** goes along too (``warm_priors``): every completed trial of the cell's
method at the level its best point came from, whole configurations this cell can run, is added to the cell's study
(``study.add_trials``, marked ``melora.prior_from``) once that best point has been trained here. Scores of another
dataset are on another scale, so each is shifted by what the best point scored here minus what it scored there: the
earlier curve, moved onto this search's scale at the one configuration both searches ran. A model-based sampler
(TPE, GP) then starts from the whole curve, not only from the enqueued points; random sampling ignores it. Nothing
added is trained, counted in the cell's share or reported as a trial of this search. Measured in the replay
(``benchmarks/warm_curve.py``, TREC and rotten_tomatoes): the enqueued best configurations cut the compute to within
0.5 point of every cell's best from 19 % to 6 % of the grid's; the curve changed that on 2 of TPE's 200 replays.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from melora_tune.errors import UsageError
from melora_tune.records import META_NAME
from melora_tune.search.cells import cell_label, cell_studies

SEARCHED_ALWAYS = ("alpha", "dropout", "seed")  # a cell may fix these where the earlier search drew them
PRIOR_ATTR = "melora.prior_from"  # an earlier search's result added to a study for its sampler, never trained there


def _find(root: Path, name: str) -> Path:
    direct = root / name / META_NAME
    if direct.is_file():
        return direct.parent
    found = sorted(root.glob(f"{name}-*/{META_NAME}"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    raise UsageError(f"warm_start: no search {name!r} under {root}: give an earlier search's name (its experiment "
                     "folder) or its space's name, with the same storage_path")


def source_studies(root: str | Path, name: str) -> tuple[str, dict[str, Any]]:
    """(the earlier search's name, its Optuna studies by cell label) from its record under ``root``."""
    folder = _find(Path(root), name)
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"warm_start: cannot read {folder / META_NAME} ({err}): name another search") from None
    studies = cell_studies(meta["study_name"], meta["optuna_storage"])
    if "" in studies:  # a search from before cells: one study, all methods
        whole = studies.pop("")
        studies = {f"{m}@{meta.get('space', {}).get('budget', {}).get('max_params') or 0}": whole
                   for m in {t.params.get("method") for t in whole.trials} if m}
    if not studies:
        raise UsageError(f"warm_start: search {folder.name} has no Optuna study in {meta['optuna_storage']}")
    return folder.name, studies


def _fitting(cell, params: dict[str, Any]) -> dict[str, Any] | None:
    """The part of an earlier trial's Optuna parameters this cell can use: the learning rate (None when it is
    outside the cell's range: nothing to transfer) and every choice the cell's tree holds. A choice it does not
    hold (another level's rank) is left out, and the cell's sampler draws it: the learning rate is what
    transfers best between levels and datasets."""
    dists = cell.distributions()
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "lr":
            low, high, _ = cell.lr
            if not (value in cell.lr_choices if cell.lr_choices else low <= value <= high):
                return None
            out[key] = value
        elif key in ("alpha", "dropout"):
            choices = cell.alpha_choices if key == "alpha" else cell.dropout_choices
            if choices and value in choices:
                out[key] = value
        elif key == "seed":
            if cell.seeds and value in cell.seeds:
                out[key] = value
        elif key in dists and value in dists[key]:
            out[key] = value
    return out


def _nearest(studies: dict[str, Any], method: str, level: int):
    mine = {int(label.split("@")[1]): study for label, study in studies.items() if label.split("@")[0] == method}
    if not mine:
        return None, None
    best = min(mine, key=lambda lv: (abs(math.log(max(lv, 1) / level)), lv))
    return best, mine[best]


def _completed(study, method: str) -> list:
    """The earlier search's own completed trials of ``method`` (not a curve that search was itself given)."""
    from optuna.trial import TrialState  # heavy: only a space with warm_start loads Optuna at the dry run

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.params.get("method") == method and t.value is not None and PRIOR_ATTR not in t.user_attrs]


def warm_points(sources: list[tuple[str, dict[str, Any]]], feasible, shares: dict[str, int]) -> dict[str, list[dict]]:
    """Per cell label, the configurations to enqueue first (Optuna parameter names, with ``WARM_ATTR``; ``study``:
    the earlier cell study it came from, and ``source``: that search and cell, for ``warm_priors``)."""
    out: dict[str, list[dict]] = {}
    for (method, level), cell in feasible.cells.items():
        label = cell_label(method, level)
        want = max(1, shares.get(label, 0) // 3)
        picked: list[dict] = []
        for name, studies in sources:
            src_level, study = _nearest(studies, method, level)
            if study is None:
                continue
            source = f"{name}:{cell_label(method, src_level)}"
            for t in sorted(_completed(study, method), key=lambda t: (-t.value, t.number)):
                params = _fitting(cell, t.params)
                if len(picked) >= want or params is None or any(p["params"] == params for p in picked):
                    continue
                picked.append({"params": params, "from": f"{source}#{t.number}", "value": t.value, "study": study,
                               "source": source})
        out[label] = picked
    return out


def warm_priors(feasible, warm: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per cell label with warm points: the ``prior`` of its ``BudgetOptunaSearch`` (the earlier curve of the
    cell's first warm point's study, anchored at that point, the earlier search's best)."""
    out: dict[str, dict[str, Any]] = {}
    for (method, level), cell in feasible.cells.items():
        label = cell_label(method, level)
        if not warm.get(label):
            continue
        anchor = warm[label][0]
        trials = []
        for t in _completed(anchor["study"], method):
            params = _fitting(cell, t.params)
            if params is None or any(k not in params for k in t.params if k not in SEARCHED_ALWAYS):
                continue  # only whole configurations: a curve point needs its rank and its learning rate
            trials.append({"params": params, "value": t.value, "from": f"{anchor['source']}#{t.number}"})
        out[label] = {"anchor": anchor["from"], "anchor_value": anchor["value"], "trials": trials}
    return out
