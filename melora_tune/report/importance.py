"""Parameter importance from the search's Optuna study (Optuna's fANOVA evaluator, seeded).

The search space is conditional: MELoRA's rank is named ``melora.r|n=4`` (its
choices depend on n), LoRA's ``lora.r``. Importance is computed on a copy of
the study with those names folded to what a user searched (``method``, ``n``,
``r``, ``u``, ``m``, ``m_b``, ``lr``, ``alpha``, ``dropout``): once over every
method (the parameters every trial has) and once per method. Only COMPLETE
trials count (the full-fidelity ones; ASHA-stopped trials are PRUNED).

A search over cells (a method at a budget level) keeps one study per cell, named ``<study_name>.<method>@<level>``:
then each cell's study gives one scope, named by its cell; a search from before cells has the one study.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

from melora_tune.errors import first_line
from melora_tune.search.cells import cell_study_names
from melora_tune.search.warm_start import PRIOR_ATTR

log = logging.getLogger("melora_tune.report")

MIN_TRIALS = 2


@dataclass
class Importance:
    """Importances per scope ("all methods", "melora", ...): a {param: importance} dict, or why there is none."""

    study_name: str | None = None
    storage: str | None = None
    scopes: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # scope -> why no importance
    error: str | None = None  # the study itself could not be read

    @property
    def available(self) -> bool:
        return bool(self.scopes)


def canonical_name(name: str) -> str:
    """'melora.r|n=4' -> 'r'; 'lora.r' -> 'r'; 'lr' -> 'lr'."""
    head = name.split("|", 1)[0]
    return head.split(".", 1)[1] if "." in head else head


def _merge(a, b):
    """Union of two distributions of one canonical parameter (categorical choices merged)."""
    from optuna.distributions import (  # heavy: Optuna, loaded where a study is used
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if a is None:
        return b
    if isinstance(a, CategoricalDistribution) and isinstance(b, CategoricalDistribution):
        choices = list(a.choices) + [c for c in b.choices if c not in a.choices]
        try:
            choices = sorted(choices)
        except TypeError:
            pass
        return CategoricalDistribution(choices)
    if isinstance(a, FloatDistribution) and isinstance(b, FloatDistribution):
        return FloatDistribution(min(a.low, b.low), max(a.high, b.high), log=a.log and b.log)
    if isinstance(a, IntDistribution) and isinstance(b, IntDistribution):
        return IntDistribution(min(a.low, b.low), max(a.high, b.high), log=a.log and b.log)
    return a


def canonical_trials(trials) -> list:
    """COMPLETE trials of this search (not the warm start's added curve) with folded parameter names (FrozenTrials
    ready for an in-memory study)."""
    import optuna  # heavy: Optuna, loaded where a study is used
    from optuna.trial import TrialState  # heavy: Optuna, loaded where a study is used

    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
                and PRIOR_ATTR not in t.user_attrs]
    dists: dict[str, object] = {}
    for t in complete:
        for name, dist in t.distributions.items():
            dists[canonical_name(name)] = _merge(dists.get(canonical_name(name)), dist)
    out = []
    for t in complete:
        params = {canonical_name(k): v for k, v in t.params.items()}
        out.append(optuna.trial.create_trial(
            params=params,
            distributions={k: dists[k] for k in params},
            value=t.value,
            state=TrialState.COMPLETE,
            user_attrs=dict(t.user_attrs),
        ))
    return out


def _importances(trials, direction, params: list[str]) -> dict[str, float]:
    import optuna  # heavy: Optuna, loaded where a study is used
    from optuna.importance import FanovaImportanceEvaluator  # heavy: Optuna, loaded where a study is used

    study = optuna.create_study(direction=direction)
    study.add_trials(trials)
    result = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=params)
    return {k: float(v) for k, v in result.items()}


def study_importance(study) -> Importance:
    """Importances of a loaded Optuna study: overall and per method."""
    out = Importance(study_name=study.study_name)
    trials = canonical_trials(study.get_trials(deepcopy=False))
    direction = study.direction
    scopes: list[tuple[str, list]] = [("all methods", trials)]
    methods = sorted({t.params.get("method") for t in trials if t.params.get("method")})
    if len(methods) > 1:
        scopes += [(m, [t for t in trials if t.params.get("method") == m]) for m in methods]
    elif methods:
        scopes = [(methods[0], trials)]
    for scope, subset in scopes:
        if len(subset) < MIN_TRIALS:
            out.notes[scope] = (
                f"needs at least {MIN_TRIALS} completed (full-fidelity) trials, the study has {len(subset)}"
            )
            continue
        common = set.intersection(*(set(t.params) for t in subset))
        varying = sorted(k for k in common if len({repr(t.params[k]) for t in subset}) > 1)
        if not varying:
            out.notes[scope] = "the completed trials share no parameter that varies between them: nothing to compare"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = _importances(subset, direction, varying)
        except Exception as exc:  # noqa: BLE001  (fANOVA fails e.g. when every value is equal)
            out.notes[scope] = f"Optuna could not compute it: {type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}".rstrip(": ")
            continue
        if not values:
            out.notes[scope] = "no parameter is shared by every completed trial"
            continue
        out.scopes[scope] = values
    return out


def search_importance(location: dict[str, str] | None) -> Importance:
    """Load the study at ``location`` ({study_name, optuna_storage}) and compute its importances: one scope per cell
    when the search kept a study per cell (``search.cells.cell_study_names``), else the one study's scopes."""
    if location is None:
        return Importance(error="the search's Optuna study was not found (its storage path is not recorded in MLflow "
                                "and melora_search.json is not next to the trials' checkpoints)")
    import optuna  # heavy: Optuna, loaded where a study is used

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, storage = location["study_name"], location["optuna_storage"]
    try:
        cells = list(cell_study_names(name, storage).values())
    except Exception:  # noqa: BLE001  (an unreadable storage: the load below says why)
        cells = []
    if cells:
        return _cells_importance(name, storage, cells)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:  # noqa: BLE001
        return Importance(study_name=name, storage=storage, error=f"cannot load Optuna study {name!r} from {storage}: {exc}")
    result = study_importance(study)
    result.storage = storage
    return result


def _cells_importance(name: str, storage: str, cells: list[str]) -> Importance:
    import optuna  # heavy: Optuna, loaded where a study is used

    out = Importance(study_name=name, storage=storage)
    for study_name in cells:
        scope = study_name[len(name) + 1:]
        try:
            got = study_importance(optuna.load_study(study_name=study_name, storage=storage))
        except Exception as exc:  # noqa: BLE001  (one cell's study must not cost the others)
            out.notes[scope] = f"cannot load Optuna study {study_name!r}: {first_line(exc)}"
            continue
        for values in got.scopes.values():  # a cell's study holds one method: its one scope is the cell
            out.scopes[scope] = values
        for note in got.notes.values():
            out.notes.setdefault(scope, note)
    return out
