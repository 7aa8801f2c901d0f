"""The Ray Tune side of cells (``search.cells``): ``CellSearcher`` (one Optuna study per cell, equal shares) and
``CellScheduler`` (one copy of the space's scheduler per cell, rung decisions written to ``rungs.jsonl``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from melora_tune.search.cells import CELL_KEY
from melora_tune.search.searcher import BudgetOptunaSearch

log = logging.getLogger("melora_tune.search")


class CellSearcher(Searcher):
    """Ray Tune searcher of a search with cells: one ``BudgetOptunaSearch`` (one Optuna study) per cell,
    trials handed out round-robin until every cell has its share (module docstring)."""

    def __init__(self, searchers: dict[str, BudgetOptunaSearch], shares: dict[str, int], *, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.shares = dict(shares)
        self.counts = {cell: 0 for cell in searchers}
        self.owner: dict[str, str] = {}  # Ray trial id -> cell

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return False  # each cell's searcher was built with its space, metric and mode

    def next_cell(self) -> str | None:
        open_cells = [c for c in self.searchers if self.counts[c] < self.shares[c]]
        if not open_cells:
            return None
        return min(open_cells, key=lambda c: self.counts[c])  # ties: the first in cell order

    def suggest(self, trial_id: str) -> dict | None:
        cell = self.owner.get(trial_id)
        if cell is None:
            cell = self.next_cell()
            if cell is None:
                return Searcher.FINISHED
        config = self.searchers[cell].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        if trial_id not in self.owner:
            self.owner[trial_id] = cell
            self.counts[cell] += 1
        return {**config, CELL_KEY: cell}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        cell = self.owner.get(trial_id)
        if cell is not None:
            self.searchers[cell].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.owner.get(trial_id)
        if cell is not None:
            self.searchers[cell].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str):
        import pickle  # the searcher's own snapshot, read back only by restore (Tune's searcher checkpoint)

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str):
        import pickle  # Tune's searcher checkpoint, written by save above in this experiment's own folder

        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class CellScheduler(TrialScheduler):
    """One copy of a trial scheduler per cell: a trial is only ever compared with its own cell's trials.

    ``make_one`` builds one scheduler (the space's: ASHA, FIFO, any registered one); ``rungs_path`` (local
    experiments) receives one JSON line per rung a trial reaches under an ASHA-like scheduler.
    """

    def __init__(self, make_one: Callable[[], TrialScheduler], cells: list[str], rungs_path: str | Path | None = None):
        super().__init__()
        self.schedulers = {cell: make_one() for cell in cells}
        self.rungs_path = str(rungs_path) if rungs_path is not None else None
        self._logged: set[tuple[str, float]] = set()
        self._turn = 0

    @property
    def supports_buffered_results(self):
        return all(s.supports_buffered_results for s in self.schedulers.values())

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
        self._metric, self._mode = metric, mode
        return all(ok)

    def _of(self, trial) -> TrialScheduler:
        cell = (trial.config or {}).get(CELL_KEY)
        if cell not in self.schedulers:
            raise KeyError(f"trial {trial.trial_id} has no known cell ({cell!r}): it was not proposed by CellSearcher")
        return self.schedulers[cell]

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        decision = self._of(trial).on_trial_result(tune_controller, trial, result)
        self._record(trial, result, decision)
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        # schedulers that hold their own queues (Hyperband's brackets) each get a turn first
        order = list(self.schedulers.values())
        self._turn = (self._turn + 1) % len(order)
        for sched in order[self._turn:] + order[:self._turn]:
            trial = sched.choose_trial_to_run(tune_controller)
            if trial is not None:
                return trial
        return None

    def debug_string(self) -> str:
        return "\n".join(f"{cell}: {s.debug_string()}" for cell, s in self.schedulers.items())

    def _record(self, trial, result: dict[str, Any], decision: str) -> None:
        """Append each rung this trial newly reached (ASHA's brackets: ``_trial_info`` -> ``_rungs``)."""
        if self.rungs_path is None:
            return
        sched = self._of(trial)
        bracket = getattr(sched, "_trial_info", {}).get(trial.trial_id)
        cell = trial.config.get(CELL_KEY)
        lines = []
        for milestone, recorded in getattr(bracket, "_rungs", ()):
            key = (trial.trial_id, float(milestone))
            if trial.trial_id in recorded and key not in self._logged:
                self._logged.add(key)
                lines.append({"trial_id": trial.trial_id, "cell": cell, "rung": milestone,
                              "score": recorded[trial.trial_id], "decision": decision,
                              "peers": sorted(recorded)})
        if lines:
            try:
                with open(self.rungs_path, "a") as f:
                    for line in lines:
                        f.write(json.dumps(line) + "\n")
            except OSError as exc:  # an audit trail must not stop a search
                log.warning("could not append to %s: %s", self.rungs_path, exc)
