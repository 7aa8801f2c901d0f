"""The parameter-efficiency frontier: every cell (a method at a budget level) with its confirmed test score, the
tuning effort it got, the comparisons within and across levels, and what would make the comparison unsettled.

Per cell, from the records:

- the confirmed winner (``records.winners``: chosen on validation): its actual adapter parameter count, seeds, test
  mean with its Student-t interval, validation mean;
- the effort: the cell's search trials, the epochs they trained (each trial's last ``epoch``) and their compute
  seconds (run wall time), so a reader sees that every cell was tuned alike;
- the best search trial's learning rate (where the cell's good range lies).

Comparisons: within a level, every pair of methods (``report.confirmed.compare_winners``); across levels, each
method's winner against every other method's winner at a larger level, paired by seed on test (every cell was
confirmed on the same seeds), e.g. "MELoRA at 9,216 parameters cannot be told apart from LoRA at 36,864".

Warnings say what to change: a cell's best learning rate at an edge of the searched range (widen the range), the
winners still improving at their last epoch (more epochs), no cell beating the linear probe (budget, epochs or
learning rates), cells with no feasible configuration, cells that got unequal numbers of trials.

Written next to the report as ``frontier.csv`` and ``frontier.json`` (``write_files``): one row per cell.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora_tune.records import finite
from melora_tune.records import read
from melora_tune.records.schema import cell_label
from melora_tune.records.winners import cell_budget, completed_seeds
from melora_tune.report.confirmed import ConfirmedResults, method_label, seed_scores
from melora_tune.report.stats import format_difference, in_points, metric_label, paired_difference

EDGE_SHARE = 0.1  # the outer tenth of the searched learning-rate range (log scale when the search sampled it so)
RISING_TOL = 1e-3  # a last-epoch gain above this (score units) counts as still improving
CSV_COLUMNS = ("method", "budget", "cell", "status", "adapter_params", "configuration", "seeds", "test_mean", "test_lo",
               "test_hi", "val_mean", "trials", "completed", "stopped_early", "epochs", "compute_s", "best_lr",
               "best_search_score", "reason")


@dataclass
class Frontier:
    """What the report's frontier sections show, and what frontier.csv / frontier.json hold."""

    levels: list[int]
    methods: list[str]
    cells: list[dict[str, Any]]  # one per (method, level), CSV_COLUMNS
    within: list[str] = field(default_factory=list)  # sentences: methods compared at one level
    across: list[str] = field(default_factory=list)  # sentences: a smaller cell against a larger one
    across_data: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metric: str = "score"
    level: float = 0.95

    def cell(self, method: str, budget: int) -> dict[str, Any] | None:
        return next((c for c in self.cells if c["method"] == method and c["budget"] == budget), None)

    def to_json(self) -> dict[str, Any]:
        return {"levels": self.levels, "methods": self.methods, "metric": self.metric, "ci_level": self.level,
                "cells": [_jsonable(c) for c in self.cells], "within_level": self.within, "across_levels": self.across,
                "across_levels_data": [_jsonable(c) for c in self.across_data], "warnings": self.warnings}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _methods(search: read.SearchInfo, trials, confirmed: ConfirmedResults | None) -> list[str]:
    """The space's order (the parent's ``methods`` param), else the confirmed table's, then the trials'."""
    named = [m.strip() for m in str(search.params.get("methods") or "").strip("[]").replace("'", "").split(",") if m.strip()]
    ranked = list(confirmed.table["method"]) if confirmed is not None and not confirmed.table.empty else []
    seen = list(dict.fromkeys([*named, *ranked, *(trials["method"] if not trials.empty else [])]))
    return [m for m in seen if m and m != "?"]


def effort(trials) -> dict[tuple[str, int | None], dict[str, Any]]:
    """{(method, level): trials, completed, stopped_early, epochs, compute_s, best_lr, best_search_score}."""
    out: dict[tuple[str, int | None], dict[str, Any]] = {}
    if trials.empty:
        return out
    best = {(r["method"], cell_budget(r["budget"])): r for _, r in read.best_per_cell(trials).iterrows()}
    for (method, budget), group in trials.groupby(["method", "budget"], sort=False, dropna=False):
        key = (method, cell_budget(budget))
        top = best.get(key)
        out[key] = {
            "trials": int(len(group)),
            "completed": int((group["status"] == "completed").sum()),
            "stopped_early": int((group["status"] == "stopped_early").sum()),
            "epochs": float(group["epoch"].fillna(0).sum()),
            "compute_s": float(group["duration_s"].astype(float).fillna(0).sum()),
            "best_lr": read.as_number(top["lr"]) if top is not None else math.nan,
            "best_search_score": read.as_number(top["score"]) if top is not None else math.nan,
        }
    return out


def build_frontier(search: read.SearchInfo, trials, confirmations, confirmed: ConfirmedResults | None,
                   baselines: read.Baselines | None = None, curves: dict[str, list[list[float]]] | None = None,
                   level: float = 0.95) -> Frontier:
    """The frontier of a search from its records. ``curves``: {confirmation run id: its validation scores in step
    order} (``read.score_histories``) of the winners' seeds, for the still-rising warning."""
    metric = baselines.score_metric if baselines is not None else read.DEFAULT_SCORE_METRIC
    infeasible = read.infeasible_of(search)
    spent = effort(trials)
    levels = sorted(set(read.levels_of(search)) | {b for _, b in spent if b is not None} | {b for _, b in infeasible})
    methods = _methods(search, trials, confirmed)
    methods += [m for m, _ in infeasible if m not in methods]
    winners = confirmed.winners if confirmed is not None else None
    won = {}
    if winners is not None:
        for _, w in winners.iterrows():
            won[(w["method"], cell_budget(w["budget"]))] = w
    cells = []
    keys = [(m, b) for m in methods for b in levels] or list(spent)
    keys += [k for k in spent if k not in keys]  # a trial without a level (records before budgets): its own cell
    for method, budget in keys:
        if (method, budget) not in spent and (method, budget) not in infeasible and (method, budget) not in won:
            continue  # a level this method was never given (a search of one level per method)
        row: dict[str, Any] = {c: None for c in CSV_COLUMNS}
        row.update(method=method, budget=budget, cell=cell_label(method, budget) if budget is not None else method)
        row.update({k: 0 for k in ("trials", "completed", "stopped_early")}, epochs=0.0, compute_s=0.0)
        row.update(spent.get((method, budget), {}))
        w = won.get((method, budget))
        if (method, budget) in infeasible:
            row.update(status="infeasible", reason=infeasible[(method, budget)])
        elif w is not None:
            row.update(status="confirmed", adapter_params=_int(w["adapter_params"]), configuration=w["configuration"],
                       seeds=int(w["seeds"]), test_mean=read.as_number(w["test_mean"]), test_lo=read.as_number(w["test_lo"]),
                       test_hi=read.as_number(w["test_hi"]), val_mean=read.as_number(w["val_mean"]))
        else:
            row.update(status="searched" if row["trials"] else "no trial")
        cells.append(row)
    out = Frontier(levels, methods, cells, metric=metric, level=level)
    if confirmed is not None:
        out.within = [c.sentence for c in confirmed.comparisons]
        out.across, out.across_data = across_levels(confirmations, list(won.values()), metric, level)
    out.warnings = warnings(search, trials, out, baselines, curves or {}, won,
                            winner_seed_runs(confirmations, confirmed))
    return out


def _int(value: Any) -> int | None:
    v = read.as_number(value)
    return int(round(v)) if math.isfinite(v) else None


# ---- across levels -------------------------------------------------------------------------------------------

def _ratio(big: float, small: float) -> str:
    return f"{big / small:.3g}x" if small else "?x"


def across_levels(confirmations, winners: list, metric: str, level: float = 0.95) -> tuple[list[str], list[dict]]:
    """A smaller cell's winner against each other method's winner at a larger level, paired by seed on test."""
    sentences, data = [], []
    unit = " points" if in_points(metric) else ""
    what = f"test {metric_label(metric)}"
    pct = f"{100 * level:g}%"
    ordered = sorted(winners, key=lambda w: (cell_budget(w["budget"]) or 0, str(w["method"])))
    for a in ordered:
        for b in ordered:
            la, lb = cell_budget(a["budget"]), cell_budget(b["budget"])
            if la is None or lb is None or la >= lb or a["method"] == b["method"]:
                continue
            diff = paired_difference(seed_scores(confirmations, a["config"]), seed_scores(confirmations, b["config"]), level)
            pa, pb = _int(a["adapter_params"]) or la, _int(b["adapter_params"]) or lb
            na, nb = method_label(a["method"]), method_label(b["method"])
            head = f"{na} at {pa:,} parameters"
            other = f"{nb} at {pb:,} ({_ratio(pb, pa)} the parameters)"
            d, lo, hi = (format_difference(v, metric) for v in (diff.mean, diff.lo, diff.hi))
            ci = f"{pct} CI [{lo}, {hi}]{unit} over {diff.n} paired seeds"
            if diff.n < 2:
                text = f"{head} vs {other}: fewer than two paired seeds, no interval."
                kind = "no interval"
            elif not diff.excludes_zero:
                text = f"{head} cannot be told apart from {other} on {what}: difference {d}{unit}, {ci}."
                if finite(a["test_mean"]) and finite(b["test_lo"]) and b["test_lo"] <= a["test_mean"] <= b["test_hi"]:
                    text += f" {na} at {pa:,} is within the CI of {nb} at {pb:,}."
                kind = "cannot be told apart"
            elif diff.mean > 0:
                text = f"{head} beats {other} on {what} by {d}{unit} ({ci})."
                kind = "smaller wins"
            else:
                nd, nlo, nhi = (format_difference(-v, metric) for v in (diff.mean, diff.hi, diff.lo))
                text = (f"{nb} at {pb:,} parameters beats {na} at {pa:,} on {what} by {nd}{unit} "
                        f"({pct} CI [{nlo}, {nhi}]{unit} over {diff.n} paired seeds): the larger adapter pays off.")
                kind = "larger wins"
            sentences.append(text)
            data.append({"smaller": cell_label(a["method"], la), "larger": cell_label(b["method"], lb),
                         "difference": diff.mean, "ci_low": diff.lo, "ci_high": diff.hi, "seeds": diff.n, "verdict": kind})
    return sentences, data


# ---- warnings ------------------------------------------------------------------------------------------------

def lr_edge(lr: float, low: float, high: float, log: bool) -> str | None:
    """'lower' / 'upper' when lr lies in the outer EDGE_SHARE of [low, high] (log scale when ``log``), else None."""
    if not (finite(lr) and finite(low) and finite(high)) or high <= low or (log and low <= 0):
        return None
    f = (lambda x: math.log(x)) if log else (lambda x: x)
    if lr <= 0 and log:
        return None
    share = (f(lr) - f(low)) / (f(high) - f(low))
    return "lower" if share <= EDGE_SHARE else "upper" if share >= 1 - EDGE_SHARE else None


def warnings(search: read.SearchInfo, trials, frontier: Frontier, baselines, curves: dict, won: dict,
             seed_runs: dict[str, list[str]]) -> list[str]:
    out = []
    p = search.params
    low, high = read.as_number(p.get("lr_low")), read.as_number(p.get("lr_high"))
    log = str(p.get("lr_log", "True")) != "False"
    for c in frontier.cells:
        edge = lr_edge(read.as_number(c["best_lr"]), low, high, log)
        if edge:
            bound, change = ("lr_low", "lower") if edge == "lower" else ("lr_high", "raise")
            out.append(f"{c['cell']}: the best learning rate {c['best_lr']:.2e} sits at the {edge} edge of the searched "
                       f"range ({low:.2g} .. {high:.2g}): the cell's best may lie outside it; {change} {bound} "
                       "(search.lr in the space file) and search again.")
    rising = []
    for key, w in won.items():
        mine = set(seed_runs.get(w["config"], []))
        gains = [runs[-1] - runs[-2] for rid, runs in curves.items() if rid in mine and len(runs) >= 2]
        if gains and sum(gains) / len(gains) > RISING_TOL:
            rising.append(f"{_cell(key)} (+{sum(gains) / len(gains):.3g} over the last epoch)")
    if rising:
        out.append(f"The confirmed winners of {', '.join(rising)} were still improving at their last epoch: the "
                   "comparison is not settled; raise training.epochs (the search's max fidelity) and search again.")
    probe = (baselines.scores.get("probe") or {}) if baselines is not None else {}
    confirmed = [c for c in frontier.cells if c["status"] == "confirmed" and finite(c["test_mean"])]
    if confirmed and finite(probe.get("test")):
        best = max(confirmed, key=lambda c: c["test_mean"])
        if best["test_mean"] <= probe["test"]:
            out.append(f"No cell beats the linear probe on frozen features (test {probe['test']:.4f}; best cell "
                       f"{best['cell']} {best['test_mean']:.4f}): the adapters learned nothing the frozen features do "
                       "not already give; raise the budget levels, the epochs or the learning-rate range.")
    elif not confirmed and finite(probe.get("val")):
        searched = [c for c in frontier.cells if finite(c["best_search_score"])]
        if searched:
            best = max(searched, key=lambda c: c["best_search_score"])
            if best["best_search_score"] <= probe["val"]:
                out.append(f"No cell's best trial beats the linear probe on frozen features (validation {probe['val']:.4f}; "
                           f"best cell {best['cell']} {best['best_search_score']:.4f}): raise the budget levels, the "
                           "epochs or the learning-rate range.")
    for c in frontier.cells:
        if c["status"] == "infeasible":
            out.append(f"{c['cell']} has no feasible configuration ({c['reason']}): it is not in the comparison; lower "
                       "budget.min_fraction, change the level or the method's choices to include it.")
    counts = {c["cell"]: c["trials"] for c in frontier.cells if c["status"] != "infeasible"}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        out.append(f"The cells were not tuned alike ({listed} trials): a cell with fewer trials may lose for want of "
                   "tuning; give every cell the same share (trials_per_cell) and search again.")
    for c in frontier.cells:
        if c["status"] == "searched":
            out.append(f"{c['cell']} was searched but has no confirmed winner: run melora-tune confirm SPACE.yaml.")
    return out


def _cell(key) -> str:
    method, budget = key
    return cell_label(method, budget) if budget is not None else method


def winner_seed_runs(confirmations, confirmed: ConfirmedResults | None) -> dict[str, list[str]]:
    """{config key of each winner: the run ids of its completed seeds} (whose curves the rising check reads)."""
    if confirmed is None or confirmations is None or confirmations.empty:
        return {}
    seeds = completed_seeds(confirmations)
    return {w["config"]: list(seeds.loc[seeds["config"] == w["config"], "run_id"]) for _, w in confirmed.winners.iterrows()}


# ---- files ---------------------------------------------------------------------------------------------------

def write_files(frontier: Frontier, out: Path) -> list[Path]:
    """frontier.csv (one row per cell) and frontier.json (the cells, the sentences, the warnings) in ``out``."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    csv_path, json_path = out / "frontier.csv", out / "frontier.json"
    pd.DataFrame([{k: c.get(k) for k in CSV_COLUMNS} for c in frontier.cells], columns=list(CSV_COLUMNS)).to_csv(
        csv_path, index=False)
    json_path.write_text(json.dumps(frontier.to_json(), indent=1) + "\n")
    return [csv_path, json_path]


def cell_text(c: dict[str, Any], level: float = 0.95) -> str:
    """A method x budget table cell: '0.8123 [0.7953, 0.8293], 9,216 params, 3 seeds', or why there is none."""
    if c is None:
        return ""
    if c["status"] == "infeasible":
        return "infeasible"
    if c["status"] != "confirmed":
        best = c.get("best_search_score")
        return f"not confirmed (best trial {best:.4f} on validation)" if finite(best) else c["status"]
    ci = f" [{c['test_lo']:.4f}, {c['test_hi']:.4f}]" if finite(c["test_lo"]) else " (one seed)"
    params = f", {c['adapter_params']:,} params" if c["adapter_params"] is not None else ""
    return f"{c['test_mean']:.4f}{ci}{params}, {c['seeds']} seeds"
