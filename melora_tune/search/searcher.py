"""Optuna (TPE) under ASHA: what each ended trial tells the sampler, and a study that survives restarts.

Why not Ray's stock ``OptunaSearch`` policy
-------------------------------------------
Stock ``OptunaSearch`` tells Optuna that a trial ASHA stopped after one epoch
is COMPLETE with its one-epoch score. TPE then ranks a half-trained
configuration against fully trained ones as if both were final, i.e. it mixes
fidelities: an early-stopped trial whose epoch-1 accuracy happens to beat
another's epoch-2 accuracy pulls TPE's "good" density towards it, and a
trial that was stopped because it was *worse* than its rung can still look
good in absolute terms. Here:

* **COMPLETE** only for trials that reached the max fidelity (the trial's last
  report has ``status == "completed"``, i.e. the final epoch); the value is
  the final-epoch score, so all COMPLETE values share one fidelity.
* **PRUNED** for trials ASHA stopped early. Every evaluation was already
  reported as an intermediate value (``trial.report(score, step)``, step =
  the optimizer step), so Optuna's TPE ranks them after every COMPLETE trial,
  deeper-trained ones first and then by their last intermediate score
  (``optuna.samplers._tpe.sampler._split_pruned_trials``). Being stopped is
  evidence of being worse than the rung's peers, and this is how TPE uses it.
* **PRUNED + constraint ``diverged`` = 1** for trials whose loss went
  non-finite. A violated constraint puts them below every feasible trial
  (TPE's infeasible group), so TPE learns to avoid the region (typically too
  high a learning rate). FAIL would hide them from TPE entirely and let it
  propose the same region again.
* **FAIL** for trials that raised (a crash, a node lost): that says nothing
  about the configuration, so TPE ignores it.

Every trial also carries ``set_constraint("budget", excess)`` (<= 0: within
budget, always the case, see ``space.py``) and user attributes (config,
adapter_params, equivalent_rank, budget, melora.status).

Restarts
--------
The study lives in a persistent Optuna storage (SQLite by default) under a
stable name, so optuna-dashboard can read it and a resumed search continues
it. Ray snapshots the searcher every few seconds; a driver killed between two
snapshots leaves Optuna trials Ray does not know about (asked, maybe even
told, after the last snapshot). Those *orphans* are handed out again, in
order, to the next trials Ray asks for (same parameters: Optuna returns the
stored value of an already-suggested name), so the study ends with exactly
one Optuna trial per Ray trial and no duplicates. A trial told before the
kill and re-run after it is not told twice.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from melora_tune import drill
from melora_tune.records.store import sqlite_open_lock
from melora_tune.search.samplers import make_sampler
from melora_tune.search.warm_start import PRIOR_ATTR
# GridSampler stays importable from here: searcher snapshots of grid searches started before it moved name this path
from melora_tune.search.samplers.brute_force import GridSampler  # noqa: F401

log = logging.getLogger("melora_tune.search")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STATUS_ATTR = "melora.status"
WARM_ATTR = "melora.warm_start_from"  # an enqueued configuration an earlier search found best (search.warm_start)
DUPLICATE_ATTR = "melora.duplicate_of"  # a proposal answered from an earlier trial's record, never trained
# Duplicate proposals in a row before an untaken configuration is drawn instead: a model sure of its optimum
# proposes it again however often it is told (GP's acquisition barely moves for a repeated point, and each of
# its proposals costs a fit: 20 redraws made a 24-point replay 5x slower than 3 for no better regret)
MAX_REDRAWS = 3
# Ray Tune's statuses of a trial that has ended (completed, stopped by the scheduler, or failed)
ENDED_STATUSES = ("TERMINATED", "ERROR")


def outcome(result: dict[str, Any] | None, error: bool, max_t: float, time_attr: str = "epoch") -> str:
    """completed | stopped_early | diverged | failed | interrupted, from a trial's last result.

    A trial with no evaluation at all was never scored: ASHA cannot have stopped it, so it was
    interrupted (the experiment was stopped, or it never started) and a --resume will run it.
    """
    if error:
        return "failed"
    result = result or {}
    status = result.get("status")
    if status == "diverged":
        return "diverged"
    if status == "failed":
        return "failed"
    if not _finite(result.get("score")):
        return "interrupted"
    if status == "completed" or (status is None and result.get(time_attr, 0) >= max_t):
        return "completed"
    return "stopped_early"


from melora_tune.records import finite as _finite  # noqa: E402

TELL_POLICIES = ("fidelity", "stock")


class BudgetOptunaSearch(OptunaSearch):
    """``OptunaSearch`` over a ``FeasibleSpace`` with the fidelity-aware tell policy above.

    ``sampler``: a registered sampler's name (``search.samplers``: tpe, random, grid, ...). ``tell_policy="stock"`` tells exactly what Ray's
    ``OptunaSearch`` does (intermediate values at ``training_iteration``; an ended trial COMPLETE with its
    last score, whatever its fidelity): the baseline the fidelity policy is measured against
    (``benchmarks/search_efficiency.py``). Restart handling (orphans) is the same for both.

    ``prior`` (warm start's learning-rate curve, ``search/warm_start.py``): ``{"anchor": <the WARM_ATTR of one
    enqueued warm point>, "anchor_value": <its score in the earlier search>, "trials": [{"params", "value",
    "from"}, ...]}``. When the anchor trial completes here with score v, every prior trial is added to the study
    (``study.add_trials``, COMPLETE, marked ``PRIOR_ATTR``) with its earlier score shifted by ``v -
    anchor_value``: the earlier curve, moved onto this search's scale at the one point both searches ran.
    The sampler models them with its own results; nothing here trains, re-runs or counts them.
    """

    def __init__(
        self,
        space,
        *,
        storage: str | optuna.storages.BaseStorage,
        study_name: str,
        seed: int = 0,
        n_startup_trials: int = 10,
        max_t: float,
        time_attr: str = "epoch",
        metric: str = "score",
        mode: str = "max",
        points_to_evaluate: list[dict] | None = None,
        warm: list[dict] | None = None,
        prior: dict | None = None,
        sampler: str = "tpe",
        tell_policy: str = "fidelity",
    ) -> None:
        if tell_policy not in TELL_POLICIES:
            raise ValueError(f"unknown tell_policy {tell_policy!r}: choose from {', '.join(TELL_POLICIES)}")
        if isinstance(storage, str):
            if "://" in storage:
                with sqlite_open_lock(storage):  # a new SQLite study database is created by one search at a time
                    storage = optuna.storages.RDBStorage(storage)
            else:
                storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
        super().__init__(
            space=space,
            metric=metric,
            mode=mode,
            sampler=make_sampler(seed, n_startup_trials, sampler, space),
            study_name=study_name,
            storage=storage,
        )
        self._seed = seed
        self._max_t = max_t
        self.tell_policy = tell_policy
        self._time_attr = time_attr
        # Ray would enqueue these again on every fresh start of the same study; skip_if_exists does not
        for point in points_to_evaluate or []:
            self._ot_study.enqueue_trial(point, skip_if_exists=True)
        for point in warm or []:  # after the space's own points; each says where it came from
            self._ot_study.enqueue_trial(point["params"], user_attrs={WARM_ATTR: point["from"]}, skip_if_exists=True)
        self._prior = prior if prior and prior.get("trials") else None

    # ---- suggestions ---------------------------------------------------------------------
    def _owned_numbers(self) -> set[int]:
        return {t.number for t in self._ot_trials.values()}

    def orphans(self) -> list[optuna.trial.FrozenTrial]:
        """Trials in the study that no Ray trial of this search owns (left by a killed driver)."""
        owned = self._owned_numbers()
        states = (TrialState.RUNNING, *FINISHED)  # not WAITING: enqueued points are Optuna's to hand out
        return [t for t in self._ot_study.get_trials(deepcopy=False, states=states)
                if t.number not in owned and DUPLICATE_ATTR not in t.user_attrs and PRIOR_ATTR not in t.user_attrs]

    def suggest(self, trial_id: str) -> dict | str | None:
        """The next configuration; in a finite space (``space.lr_choices``) never one already run or running.

        A proposal equal to a taken configuration is answered from the record instead of being trained: its
        Optuna trial is told what the earlier trial was told (Optuna's own advice for duplicates) and marked
        ``melora.duplicate_of``, and the sampler proposes again. After ``MAX_REDRAWS`` duplicates in a row
        (a model sure of its optimum) an untaken configuration is drawn uniformly (seeded) and enqueued; when
        none is left the search is FINISHED: every configuration has been run once.
        """
        config = self._suggest(trial_id)
        redraws = 0
        while self._finite and isinstance(config, dict):
            ot_trial = self._ot_trials[trial_id]
            earlier = self._taken_by(ot_trial)
            if earlier is None:
                return config
            self._answer_duplicate(trial_id, ot_trial, earlier)
            redraws += 1
            if redraws >= MAX_REDRAWS and not self._enqueue_untaken():
                return self.FINISHED
            config = self._suggest(trial_id)
        return config

    @property
    def _finite(self) -> bool:
        return bool(getattr(self._space, "lr_choices", None))

    def _taken(self) -> dict[tuple, optuna.trial.FrozenTrial]:
        """Configuration (its Optuna parameters) -> the first trial that ran it (not duplicates, not FAIL)."""
        out: dict[tuple, optuna.trial.FrozenTrial] = {}
        states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        for t in self._ot_study.get_trials(deepcopy=False, states=states):
            if DUPLICATE_ATTR not in t.user_attrs and PRIOR_ATTR not in t.user_attrs:
                out.setdefault(tuple(sorted(t.params.items())), t)
        return out

    def _taken_by(self, ot_trial) -> optuna.trial.FrozenTrial | None:
        key = tuple(sorted(ot_trial.params.items()))
        earlier = self._taken().get(key)
        return earlier if earlier is not None and earlier.number != ot_trial.number else None

    def _answer_duplicate(self, trial_id: str, ot_trial, earlier: optuna.trial.FrozenTrial) -> None:
        """Tell a duplicate proposal what its configuration's first trial was told (FAIL while that one runs:
        nothing is known yet, and FAIL is what samplers ignore)."""
        self._ot_trials.pop(trial_id)
        ot_trial.set_user_attr(DUPLICATE_ATTR, earlier.number)
        for step, value in earlier.intermediate_values.items():
            ot_trial.report(value, step)
        with warnings.catch_warnings():  # the budget constraint is already set, by the space
            warnings.simplefilter("ignore")
            for name, value in earlier.constraints.items():
                if name != "budget":
                    ot_trial.set_constraint(name, value)
        if earlier.state == TrialState.COMPLETE:
            self._ot_study.tell(ot_trial, earlier.value, state=TrialState.COMPLETE)
        elif earlier.state == TrialState.PRUNED:
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)

    def _enqueue_untaken(self) -> bool:
        """Enqueue one configuration no trial has taken (uniformly, seeded); False when every one is taken."""
        import itertools  # only when a sampler keeps proposing taken configurations

        import numpy as np  # only when a sampler keeps proposing taken configurations

        taken = set(self._taken())
        space = self._space
        extra = [("lr", space.lr_choices)]
        extra += [(k, c) for k, c in (("alpha", space.alpha_choices), ("dropout", space.dropout_choices)) if c]
        extra += [("seed", space.seeds)] if space.seeds else []
        untaken = []
        for path in self._paths():
            for values in itertools.product(*(c for _, c in extra)):
                params = {**path, **dict(zip((k for k, _ in extra), values))}
                if tuple(sorted(params.items())) not in taken:
                    untaken.append(params)
        if not untaken:
            return False
        pick = untaken[int(np.random.default_rng(self._seed + len(taken)).integers(len(untaken)))]
        self._ot_study.enqueue_trial(pick)
        return True

    def _add_prior(self, anchor_here: float) -> None:
        """Add the earlier search's curve, shifted onto this search's scale (once per study: a resumed search
        finds them there)."""
        prior, self._prior = self._prior, None
        if any(PRIOR_ATTR in t.user_attrs for t in self._ot_study.get_trials(deepcopy=False)):
            return
        shift = anchor_here - float(prior["anchor_value"])
        space = self._space
        trials = [optuna.trial.create_trial(
            params=t["params"], distributions=self._distributions(t["params"]), value=float(t["value"]) + shift,
            user_attrs={PRIOR_ATTR: t["from"]},
            # every trial has the same constraints (GP refuses a study where they differ)
            constraints={"budget": space.budget_excess(space.candidate(t["params"]))}) for t in prior["trials"]]
        self._ot_study.add_trials(trials)
        log.info("warm start: %d earlier results added to the model, shifted by %+.4f", len(trials), shift)

    def _distributions(self, params: dict[str, Any]) -> dict[str, Any]:
        """Each parameter's Optuna distribution, exactly as the space suggests it (TPE pools a name's values only
        across equal distributions)."""
        categorical = optuna.distributions.CategoricalDistribution
        space = self._space
        choices = {**space.distributions(), "lr": space.lr_choices, "alpha": space.alpha_choices,
                   "dropout": space.dropout_choices, "seed": space.seeds}
        low, high, log_ = space.lr
        return {key: optuna.distributions.FloatDistribution(low, high, log=log_) if key == "lr" and not choices["lr"]
                else categorical(choices[key]) for key in params}

    def _paths(self) -> list[dict[str, Any]]:
        """Every configuration of the space as the Optuna parameters of its path through the tree."""
        space = self._space
        out = []
        for method in space.methods:
            for cand in space.candidates[method]:
                params: dict[str, Any] = {"method": method}
                parents: list[tuple[str, int]] = []
                for key in space.levels(method):
                    params[space.param_name(method, key, parents)] = getattr(cand, key)
                    parents.append((key, getattr(cand, key)))
                out.append(params)
        return out

    def _suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials:
            orphans = self.orphans()
            if orphans:
                frozen = orphans[0]
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
                log.info("trial %s re-runs Optuna trial %d (left by an interrupted run)", trial_id, frozen.number)
                if frozen.state.is_finished():
                    # told before the kill: replay its parameters without writing to the finished trial
                    from ray.tune.utils.util import unflatten_dict

                    fixed = optuna.trial.FixedTrial(frozen.params, number=frozen.number)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return unflatten_dict(self._suggest_from_define_by_run_func(self._space, fixed))
        return super().suggest(trial_id)

    # ---- results ---------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.tell_policy == "stock":
            return super().on_trial_result(trial_id, result)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if not _finite(value):
            return
        step = result.get("step", result.get("training_iteration"))
        if not _finite(step):
            return
        ot_trial = self._ot_trials[trial_id]
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if frozen.state != TrialState.RUNNING or int(step) in frozen.intermediate_values:
            return  # already reported (a result re-delivered after a restart, or the stopping result twice)
        ot_trial.report(float(value), int(step))

    def _state(self, ot_trial) -> TrialState:
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.tell_policy == "stock":
            return super().on_trial_complete(trial_id, result, error)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        kind = outcome(result, error, self._max_t, self._time_attr)
        if kind == "interrupted":
            return  # not told: the trial stays RUNNING in the study and --resume runs (and tells) it
        value = (result or {}).get(self.metric)
        # Tune skips on_trial_result for the result on which the scheduler stops a trial: report it here
        self.on_trial_result(trial_id, result or {})
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if frozen.state in FINISHED:
            if frozen.state == TrialState.FAIL and kind != "failed":
                self._retell(frozen, kind, value)  # a failed trial that --resume re-ran
            self._completed_trials.add(trial_id)
            return
        ot_trial.set_user_attr(STATUS_ATTR, kind)
        drill.point("searcher.tell")
        if kind == "completed" and _finite(value):
            self._ot_study.tell(ot_trial, float(value), state=TrialState.COMPLETE)
            prior = getattr(self, "_prior", None)  # None in a snapshot taken before priors existed
            if prior and frozen.user_attrs.get(WARM_ATTR) == prior["anchor"]:
                self._add_prior(float(value))
        elif kind == "failed":
            self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
        else:
            if kind == "diverged":
                ot_trial.set_user_attr("melora.reason", (result or {}).get("reason"))
                ot_trial.set_constraint("diverged", 1.0)
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        drill.point("searcher.told")
        self._completed_trials.add(trial_id)

    def _retell(self, frozen: optuna.trial.FrozenTrial, kind: str, value: Any) -> None:
        """Record a re-run of a FAIL trial as a new finished trial with the same parameters."""
        state = TrialState.COMPLETE if kind == "completed" and _finite(value) else TrialState.PRUNED
        constraints = dict(frozen.constraints)
        if kind == "diverged":
            constraints["diverged"] = 1.0
        system_attrs = {k: v for k, v in frozen.system_attrs.items() if not k.startswith("constraints")}
        trial = optuna.trial.create_trial(
            state=state,
            value=float(value) if state == TrialState.COMPLETE else None,
            params=frozen.params,
            distributions=frozen.distributions,
            user_attrs={**frozen.user_attrs, STATUS_ATTR: kind, "melora.retry_of": frozen.number},
            system_attrs=system_attrs,
            constraints=constraints,
            intermediate_values=frozen.intermediate_values,
        )
        self._ot_study.add_trial(trial)
