"""The confirmed winner rule, read from a search's confirmation runs (``read.confirmations_frame``): which runs count
as seeds, and which configuration wins a cell. The report's confirmed table (``report.confirmed``), the export
and the Model Registry (``search.model_registry``) all choose with these functions.

A cell is (method, budget level): a search over one level has one cell per method, so there a cell's winner is
the method's winner. A cell's winner is its configuration with the highest mean *validation* score over its
completed seeds (ties: more seeds, then the configuration confirmed first); of the winner's seeds, the one with the
best validation score gives the weights. Test never takes part in choosing.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

COMPLETED = "completed"  # only a confirmation that trained every epoch counts as a seed


def config_keys(confirmations):
    # A run without the config tag is its own trial's configuration: its seeds retrain the same trial.
    return confirmations["config"].fillna(confirmations["confirms"]).fillna(confirmations["run_id"])


def completed_seeds(confirmations):
    """The confirmation runs that count as seeds: completed, with a finite validation score; a seed confirmed
    twice for one configuration (a retried run) counts once, its latest run (the frame is oldest first)."""
    import numpy as np  # heavy: numpy, loaded where arrays are used

    confirmations = confirmations.assign(config=config_keys(confirmations))
    ok = (confirmations["status"] == COMPLETED) & np.isfinite(confirmations["val_score"].astype(float))
    done = confirmations[ok]
    repeated = done["seed"].notna() & done.duplicated(["config", "seed"], keep="last")
    return done[~repeated]


def by_validation(table):
    """Configurations (columns val_mean, seeds, first_start), highest mean validation score first; ties: more
    seeds, then confirmed first. Test is never looked at."""
    key = table.assign(_val=table["val_mean"].fillna(-math.inf), _start=table["first_start"].fillna(math.inf))
    return key.sort_values(["_val", "seeds", "_start"], ascending=[False, False, True], kind="mergesort")


def best_seed(seeds, config: str) -> dict[str, Any]:
    """The winner's weights: the configuration's completed seed with the best validation score (then the earliest)."""
    mine = seeds[seeds["config"] == config].sort_values(["val_score", "start_time"], ascending=[False, True],
                                                        kind="mergesort")
    return mine.iloc[0].to_dict()


def _stats(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


CELL_KEYS = ["method", "budget"]  # what a winner is chosen within


def cell_budget(value) -> int | None:
    """A frame's budget cell as an int (None: the run did not say, as records before budgets did not)."""
    try:
        return None if value is None or value != value else int(value)
    except (TypeError, ValueError):
        return None


def confirmed_winners(confirmations) -> list[dict[str, Any]]:
    """Per cell with a completed seed, its winner: ``{"method", "budget", "config", "run" (the seed run's row),
    "seeds", "val_mean", "val_std", "test_mean", "test_std"}``, in the frame's cell order."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    if confirmations is None or confirmations.empty:
        return []
    runs = confirmations.assign(config=config_keys(confirmations))
    seeds = completed_seeds(runs)
    rows = []
    for key, group in runs.groupby("config", sort=False):
        done = seeds[seeds["config"] == key]
        val_mean, val_std = _stats(list(done["val_score"]))
        test_mean, test_std = _stats(list(done["test_score"]))
        rows.append({"config": key, "method": group.iloc[0]["method"],
                     "budget": cell_budget(group.iloc[0]["budget"]) if "budget" in group else None, "seeds": len(done),
                     "first_start": group["start_time"].min(), "val_mean": val_mean, "val_std": val_std,
                     "test_mean": test_mean, "test_std": test_std})
    table = pd.DataFrame(rows)
    out = []
    for (method, budget), group in table.groupby(CELL_KEYS, sort=False, dropna=False):
        top = by_validation(group).iloc[0].to_dict()
        if not math.isfinite(top["val_mean"]):  # no completed seed: no winner
            continue
        out.append({"method": method, "budget": cell_budget(budget), "config": top["config"],
                    "run": best_seed(seeds, top["config"]),
                    **{k: top[k] for k in ("seeds", "val_mean", "val_std", "test_mean", "test_std")}})
    return out
