"""Confirmed results: the search's best configurations retrained on several seeds and scored once on test.

From the confirmation runs (``read.confirmations_frame``), per configuration (the ``melora.config``
key its seeds share) over its completed seeds s = 1..k:

    validation  mean_ci(val_score_s)    test  mean_ci(test_score_s)      (``stats.mean_ci``: x̄ ± t·s/√k)

The confirmed winner of a cell (a method at a budget level; one level: one cell per method) is its configuration
with the highest mean *validation* score. Test never
takes part in choosing: a winner picked on test would make its test score an optimistic estimate, the
very bias confirming on held-out data is there to remove. Ties go to more seeds, then the configuration
confirmed first.

Winners of two methods at one level are compared on test seed by seed (``stats.paired_difference``): both were
retrained on the same seeds, so d_s = test_a,s - test_b,s pairs what the seed does to both. Across levels the
frontier (``report.frontier``) pairs them the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from melora_tune.adapters.registry import describe, get_method
from melora_tune.errors import UsageError
from melora_tune.records.read import DEFAULT_SCORE_METRIC, Baselines, hp_columns
from melora_tune.records.winners import CELL_KEYS, by_validation, cell_budget, completed_seeds, config_keys
from melora_tune.report.stats import PairedDifference, mean_ci, paired_difference, verdict



@dataclass
class Comparison:
    """The paired test comparison of two methods' confirmed winners at one level (``diff`` = a - b)."""

    method_a: str
    method_b: str
    config_a: str
    config_b: str
    diff: PairedDifference
    sentence: str
    budget: int | None = None  # the level both winners belong to (None: records before cells)


@dataclass
class ConfirmedResults:
    """What the report shows of the confirmations."""

    table: Any  # DataFrame of confirmed_table: one row per configuration
    comparisons: list[Comparison] = field(default_factory=list)
    baselines: Baselines | None = None
    level: float = 0.95

    @property
    def winners(self):
        return self.table[self.table["winner"]].reset_index(drop=True)


def method_label(name: str) -> str:
    """The method's label from the registry ("MELoRA"), its name when it is not registered."""
    try:
        return get_method(name).label
    except UsageError:
        return str(name)


def _plain(value: Any) -> Any:
    """A pandas cell as a Python value: None for missing, int for whole numbers (describe prints them)."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value.item() if hasattr(value, "item") else value


def configuration_text(row) -> str:
    """'melora n=4 r=2 lr=1.0e-3': the method's hyperparameters and lr, as run names and the trial tables write them."""
    hp = {key: _plain(row.get(key)) for key in ("method", *hp_columns(), "lr")}
    return describe(hp)


def confirmed_table(confirmations, level: float = 0.95):
    """One row per configuration: its hyperparameters, seeds, validation and test mean/std/interval, ``winner``.

    Columns: config, method, budget (the cell's level), cell, configuration, n, r, u, m, m_b, lr, adapter_params,
    equivalent_rank, confirms, confirms_trial, runs (confirmation runs), seeds (completed ones), and for split in
    (val, test): {split}_n, {split}_mean, {split}_std, {split}_lo, {split}_hi; winner (bool: the cell's highest mean
    validation score). Ordered by level (ascending), then method (the method whose winner validates best first),
    then mean validation score, best first.
    """
    import pandas as pd  # heavy: pandas, loaded where tables are built

    runs = confirmations.assign(config=config_keys(confirmations))
    seeds = completed_seeds(runs)
    rows = []
    for key, group in runs.groupby("config", sort=False):
        first = group.iloc[0]
        done = seeds[seeds["config"] == key]
        row = {"config": key, "method": first["method"], "budget": cell_budget(first.get("budget")),
               "cell": first.get("cell") or first["method"], "configuration": configuration_text(first),
               **{k: first[k] for k in (*hp_columns(), "lr", "adapter_params", "equivalent_rank", "confirms", "confirms_trial")},
               "runs": len(group), "seeds": len(done), "first_start": group["start_time"].min()}
        for split, column in (("val", "val_score"), ("test", "test_score")):
            ci = mean_ci(done[column], level)
            row.update({f"{split}_n": ci.n, f"{split}_mean": ci.mean, f"{split}_std": ci.std, f"{split}_lo": ci.lo,
                        f"{split}_hi": ci.hi})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["winner"] = False
    for _, group in table.groupby(CELL_KEYS, sort=False, dropna=False):
        ranked = by_validation(group)
        if math.isfinite(ranked.iloc[0]["val_mean"]):  # a method none of whose seeds completed has no winner
            table.loc[ranked.index[0], "winner"] = True
    return _ordered(table).drop(columns=["first_start"]).reset_index(drop=True)


def _ordered(table):
    ranked = by_validation(table)
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(ranked["method"]))}  # a method's place: its best config's
    level = ranked["budget"].astype(float).fillna(-1.0)  # one level (or none recorded): the order is by method alone
    return ranked.assign(_m=ranked["method"].map(method_rank), _b=level).sort_values(["_b", "_m"], kind="mergesort").drop(
        columns=["_m", "_b", "_val", "_start"])


def seed_scores(confirmations, config: str, column: str = "test_score") -> dict[int, float]:
    """{seed: score} of a configuration's completed seeds (the last run of a seed when one was retried)."""
    import numpy as np  # heavy: numpy, loaded where arrays are used

    runs = completed_seeds(confirmations)
    runs = runs[(runs["config"] == config) & runs["seed"].notna() & np.isfinite(runs[column].astype(float))]
    return {int(s): float(v) for s, v in zip(runs["seed"], runs[column])}


def compare_winners(confirmations, table, metric: str, level: float = 0.95) -> list[Comparison]:
    """Every pair of methods' winners at the same budget level, paired by seed on test, in the table's order, with
    the verdict. With several levels each sentence starts with its level."""
    winners = table[table["winner"]] if not table.empty else table
    levels = {cell_budget(b) for b in winners["budget"]} if "budget" in winners else {None}
    out = []
    for (_, a), (_, b) in combinations(winners.iterrows(), 2):
        budget = cell_budget(a.get("budget"))
        if budget != cell_budget(b.get("budget")):  # two levels: the frontier compares those
            continue
        diff = paired_difference(seed_scores(confirmations, a["config"]), seed_scores(confirmations, b["config"]), level)
        sentence = verdict(method_label(a["method"]), method_label(b["method"]), diff, metric)
        if len(levels) > 1:
            sentence = f"At budget level {budget:,}: {sentence}" if budget is not None else sentence
        out.append(Comparison(a["method"], b["method"], a["config"], b["config"], diff, sentence, budget))
    return out


def confirmed_results(confirmations, baselines: Baselines | None = None, level: float = 0.95) -> ConfirmedResults | None:
    """The confirmed table, its winners and their comparisons; None when the search has no confirmation run."""
    if confirmations is None or confirmations.empty:
        return None
    table = confirmed_table(confirmations, level)
    metric = baselines.score_metric if baselines is not None else DEFAULT_SCORE_METRIC
    return ConfirmedResults(table, compare_winners(confirmations, table, metric, level), baselines, level)
